"""python -m launcher.train --config configs/<name>.yaml [--set key=value ...]

Runs the job and prints the run directory as the last line. With run.launcher=ray (the default,
also the default job's) the composition runs on Ray workers: on the cluster named by $RAY_ADDRESS
(as `ray job submit` sets it) or on an embedded local Ray; run.launcher=local runs it in this one
process. With checkpoint.every_steps > 0 the run directory is runs/<run.name>, sharded checkpoints go
to its checkpoints/ (or checkpoint.dir), lost workers or nodes are survived, and running the same
command again resumes from the latest checkpoint. Under torchrun
(`torchrun --nproc_per_node K -m launcher.train ... --set parallel.anchor_ranks=N
parallel.augment_stages=S`, K = N + S, plus each extra_augments entry's stages) the composition runs
on the distributed runtime: ZeRO-3 anchor ranks plus forward-only augment pipeline stages.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/kv_arithmetic.yaml")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.max_steps=100 parallel.anchor_ranks=2")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from calm_dist.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if launched_by_torchrun():
        from calm_dist.train.distributed_job import run_torchrun_job

        run_dir = run_torchrun_job(config)
    elif config.run.launcher == "ray":
        from launcher.ray_driver import run_ray_job

        run_dir = run_ray_job(config)
    else:
        from calm_dist.train.job import run_job

        run_dir = run_job(config)
    if run_dir is not None:
        print(run_dir.resolve(), flush=True)
    return 0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


if __name__ == "__main__":
    sys.exit(main())
