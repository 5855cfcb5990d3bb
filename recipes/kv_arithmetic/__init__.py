"""The paper's KV-arithmetic experiment (CALM, section 4.1) at CPU scale: a recipe on the generic job.

``recipe`` is what ``python -m launcher.train`` finds under the name ``kv_arithmetic`` (the
``calm_dist.recipes`` entry point): its settings live under ``recipe:`` in the config (see
``settings.py`` and configs/kv_arithmetic.yaml).
"""
from .recipe import KVArithmeticRecipe, recipe

__all__ = ["KVArithmeticRecipe", "recipe"]
