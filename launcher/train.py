"""python -m launcher.train --config configs/<name>.yaml [--set key=value ...]

Runs the job and prints the run directory as the last line.
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
    from calm_dist.train.job import run_job

    run_dir = run_job(config)
    print(run_dir.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
