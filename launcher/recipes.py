"""Recipes: experiments built on the generic job, found by name through the ``calm_dist.recipes`` entry-point
group (``pyproject.toml``), so the launcher imports none of them and a user's package can add its own.

A recipe is an object with ``prepare(config) -> config`` (make what the job needs — data, base models —
and fill in the config's paths; runs once, in the driver or launch rank 0) and ``finish(config, run_dir)``
(its own evaluation and report, after the generic job). Its settings live under ``recipe:`` in the config.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from calm_dist.config import Config

GROUP = "calm_dist.recipes"


class Recipe(Protocol):
    def prepare(self, config: Config) -> Config: ...

    def finish(self, config: Config, run_dir: Path) -> None: ...


def available() -> dict[str, object]:
    return {entry.name: entry for entry in entry_points(group=GROUP)}


def find_recipe(config: Config) -> Recipe | None:
    """The recipe the config names under ``recipe.name`` (None without a recipe section)."""
    if config.recipe is None:
        return None
    name = config.recipe["name"]
    entries = available()
    if name not in entries:
        raise ValueError(f"config key 'recipe.name': no recipe {name!r} is installed (known: {sorted(entries)}); "
                         f"a package registers one under the {GROUP!r} entry-point group")
    return entries[name].load()
