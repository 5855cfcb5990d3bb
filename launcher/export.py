"""python -m launcher.export --run runs/<name> --out DIR [--checkpoint step_000000400]

Consolidates a sharded checkpoint (default: the latest complete one) into one process's composition
weights and writes an export that ``calm_dist.load_exported(DIR)`` loads for evaluation and generation.
``--checkpoints URI`` reads a checkpoint store directly (e.g. when checkpoint.dir was an s3:// URI).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory (its checkpoints/ or the checkpoint.dir in its config.yaml)")
    source.add_argument("--checkpoints", help="a checkpoint store: directory or pyarrow.fs URI")
    parser.add_argument("--checkpoint", help="checkpoint name, e.g. step_000000400 (default: latest)")
    parser.add_argument("--out", required=True, help="export directory to write")
    return parser.parse_args(argv)


def store_root(args) -> str:
    if args.checkpoints:
        return args.checkpoints
    import yaml

    run_dir = Path(args.run)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    configured = (yaml.safe_load(config_file.read_text()).get("checkpoint") or {}).get("dir") or ""
    return configured or str(run_dir / "checkpoints")


def export(args) -> Path:
    import yaml

    from calm_dist.checkpoint import CheckpointStore, consolidated_composition
    from calm_dist.export import write_export

    store = CheckpointStore(store_root(args))
    name = args.checkpoint or store.latest()
    if name is None:
        raise FileNotFoundError(f"no complete checkpoint in {store.uri}")
    if name not in store.complete():
        raise FileNotFoundError(f"{name} is not a complete checkpoint in {store.uri}; complete: {store.complete()}")
    meta = store.meta(name)
    weights = consolidated_composition(store, name)
    info = {"step": meta["step"], "checkpoint": name, "base_models": meta["base_models"],
            "connections": meta["connections"], "bridge_sources": meta.get("bridge_sources"),
            "relative_scale": meta["config"]["composition"]["relative_scale"]}
    return write_export(Path(args.out), weights, info, yaml.safe_dump(meta["config"], sort_keys=False))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        target = export(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(target.resolve(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
