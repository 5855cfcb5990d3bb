"""python -m launcher.export --run runs/<name> --out DIR [--checkpoint step_000000400] [--tokenizer DIR]

Consolidates a sharded checkpoint (default: the latest complete one) into one process's composition
weights and writes an export that ``calm_dist.CALMForCausalLM.from_pretrained(DIR)`` loads (and
``AutoTokenizer.from_pretrained(DIR)`` its tokenizer: the anchor's, unless ``--tokenizer`` names another).
An augmenting model that read its own tokenizer (the checkpoint records which) keeps that tokenizer in
``augment<i>/`` (from ``augment[i].model.tokenizer`` of the run's config, else the model's directory), so the
export generates with ``generate_text``.
``--checkpoints URI`` reads a checkpoint store directly (e.g. when checkpoint.dir was an s3:// URI).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from calm_dist.model.export_files import TokenizerNotFoundError
from calm_dist.model.hf import BaseModelRef


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launcher.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a run directory (its checkpoints/ or the checkpoint.dir in its config.yaml)")
    source.add_argument("--checkpoints", help="a checkpoint store: directory or pyarrow.fs URI")
    parser.add_argument("--checkpoint", help="checkpoint name, e.g. step_000000400 (default: latest)")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--tokenizer", help="the anchor's tokenizer directory (default: the checkpoint's, else the "
                                            "anchor model directory)")
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


@dataclass(frozen=True)
class CheckpointComposition:
    """What an export needs from a checkpoint's meta.json, whatever its layout."""

    anchor: BaseModelRef
    augments: tuple[BaseModelRef, ...]  # in bridge order
    connections: tuple[tuple[tuple[int, int], ...], ...]  # one tuple of pairs per augmenting model
    relative_scale: bool
    tokenizer: str | None  # the anchor's tokenizer directory, when the checkpoint names one
    # per augmenting model reading its own tokenisation: its tokenizer's directory (None: the anchor's ids)
    augment_tokenizers: tuple[str | None, ...] = ()
    position_buckets: int = 0


def composition_from_meta(meta: dict) -> CheckpointComposition:
    """The one reader of the checkpoint meta layout: ``base_models`` (``anchor``, ``augment``, ``augment_1``, …
    each ``{path, sha256}``), the composition (``composition``: one list of pairs per augmenting model and
    ``relative_scale``; or, in earlier checkpoints, the flat ``connections`` with each bridge's augmenting
    model in ``bridge_sources`` and ``config.composition.relative_scale``) and ``tokenizer``."""
    def dir_key(model: int) -> str:
        return "augment" if model == 0 else f"augment_{model}"

    bases = meta["base_models"]
    if "composition" in meta:
        per_model = [[(int(a), int(b)) for a, b in pairs] for pairs in meta["composition"]["connections"]]
        relative_scale = meta["composition"].get("relative_scale", False)
    else:
        pairs = [(int(a), int(b)) for a, b in meta["connections"]]
        sources = meta.get("bridge_sources") or [0] * len(pairs)
        per_model = [[pair for pair, source in zip(pairs, sources) if source == model]
                     for model in range(max(sources) + 1)]
        relative_scale = meta["config"]["composition"].get("relative_scale", False)
    missing = [dir_key(model) for model in range(len(per_model)) if dir_key(model) not in bases]
    if missing:
        raise ValueError(f"checkpoint meta names no base model for {missing} (its base_models: {sorted(bases)})")

    def ref(key: str) -> BaseModelRef:
        return BaseModelRef(str(bases[key]["path"]), bases[key].get("sha256"))

    own = (meta.get("composition") or {}).get("own_tokenizer") or []
    configured = (meta.get("config") or {}).get("augment") or []
    if isinstance(configured, dict):
        configured = [configured]

    def own_tokenizer_dir(model: int) -> str:  # augment[i].model.tokenizer, else the model's own directory
        source = (configured[model].get("model") or {}) if model < len(configured) else {}
        return str(source.get("tokenizer") or bases[dir_key(model)]["path"])

    return CheckpointComposition(
        anchor=ref("anchor"),
        augments=tuple(ref(dir_key(model)) for model in range(len(per_model))),
        connections=tuple(tuple(pairs) for pairs in per_model),
        relative_scale=bool(relative_scale),
        tokenizer=meta.get("tokenizer"),
        augment_tokenizers=tuple(own_tokenizer_dir(model) if flag else None for model, flag in enumerate(own)),
        position_buckets=int((meta.get("composition") or {}).get("position_buckets", 0)),
    )


def export(args) -> Path:
    from calm_dist.checkpoint import CheckpointStore, consolidated_composition
    from calm_dist.export import save_composition

    store = CheckpointStore(store_root(args))
    name = args.checkpoint or store.latest()
    if name is None:
        raise FileNotFoundError(f"no complete checkpoint in {store.uri}")
    if name not in store.complete():
        raise FileNotFoundError(f"{name} is not a complete checkpoint in {store.uri}; complete: {store.complete()}")
    meta = store.meta(name)
    composition = composition_from_meta(meta)
    tokenizer = args.tokenizer or composition.tokenizer or composition.anchor.path
    try:
        return save_composition(
            Path(args.out), consolidated_composition(store, name), composition.anchor, composition.augments,
            composition.connections, relative_scale=composition.relative_scale,
            position_buckets=composition.position_buckets, tokenizer=tokenizer,
            metadata={"step": meta["step"], "checkpoint": name, "run_config": meta.get("config")},
            # the checkpoint records which models read their own tokens; none recorded: all read the anchor's
            augment_tokenizers=list(composition.augment_tokenizers) or [None] * len(composition.augments),
        )
    except TokenizerNotFoundError as error:
        if args.tokenizer:
            raise
        raise TokenizerNotFoundError(f"{error} (pass --tokenizer DIR)") from None


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
