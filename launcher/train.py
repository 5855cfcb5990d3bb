"""python -m launcher.train --config my_composition.yaml [--set key=value ...]

Composes a frozen anchor with frozen augmenting model(s) through trainable cross-attention bridges,
trains the bridges on your data, evaluates, and prints the run directory as the last line.

With run.launcher=ray (the default) the composition runs on Ray workers — ZeRO-3 anchor ranks and
forward-only augment pipeline stages — on the cluster named by $RAY_ADDRESS (as `ray job submit` sets
it) or on an embedded local Ray; run.launcher=local runs it in this one process. Under torchrun
(`torchrun --nproc_per_node K -m launcher.train ... --set parallel.anchor_ranks=N parallel.augment_stages=S`,
K = N + S for one augmenting model) the same runtime runs on the launched processes. With
checkpoint.every_steps > 0 the run directory is runs/<run.name>, sharded checkpoints go to its
checkpoints/ (or checkpoint.dir), lost workers or nodes are survived, and the same command again resumes.

A config with a recipe: section (e.g. configs/kv_arithmetic.yaml, the paper's KV-arithmetic experiment)
runs that recipe: it makes its data and base models, runs this same job on them, then reports.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/example_composition.yaml")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=100 parallel.anchor_ranks=2 "
                             "(--set may be repeated)")
    return parser.parse_args(argv)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(config, recipe=None) -> Path | None:
    """The job on the configured launcher (a recipe's preparation first, its report last); returns the
    run directory (None on a torchrun rank other than 0)."""
    if launched_by_torchrun():
        from launcher.torchrun_job import run_torchrun_job

        return run_torchrun_job(config, recipe)
    if recipe is not None:
        config = recipe.prepare(config)
    if config.run.launcher == "ray":
        from launcher.ray_job import run_ray_job

        run_dir = run_ray_job(config)
    else:
        from calm_dist.train.job import run_local_job

        run_dir = run_local_job(config)
    if recipe is not None:
        recipe.finish(config, run_dir)
    return run_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    from calm_dist.distributed.accelerator import choose_deepspeed_accelerator

    choose_deepspeed_accelerator()
    from calm_dist.config import load_config
    from calm_dist.quiet import quiet_libraries
    from launcher.recipes import find_recipe

    quiet_libraries()
    try:
        config = load_config(args.config, args.overrides)
        recipe = find_recipe(config)
        run_dir = run(config, recipe)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if run_dir is not None:
        print(run_dir.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    exit_code = main()
    if launched_by_torchrun():  # a rank process: its outputs are written; see end_rank_process
        from calm_dist.distributed.groups import end_rank_process

        end_rank_process(exit_code)
    sys.exit(exit_code)
