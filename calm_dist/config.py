"""One config tree: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Unknown keys and values of the wrong type raise a ValueError naming the dotted key. This module
checks what a config can say about itself; what needs the disk (model directories, tokenizers,
data files) is checked by ``calm_dist.train.preflight`` before any worker starts.

A recipe (e.g. the KV-arithmetic reproduction) keeps its own settings under ``recipe:``, a mapping
with a ``name``; the recipe checks the rest of that section with ``build_section``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    name: str = "calm"
    output_dir: str = "runs"
    cache_dir: str = ".cache/calm_dist"  # tokenised data (and a recipe's own files), keyed by fingerprint
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # ray: composition on Ray workers (a cluster, or an embedded local Ray); local: one process, no Ray
    launcher: str = "ray"


@dataclass
class ModelSource:
    path: str = ""  # a directory written by save_pretrained (a recipe may fill it in)
    tokenizer: str | None = None  # the model's tokenizer directory; null = the model's own directory


@dataclass
class AnchorConfig:
    model: ModelSource = field(default_factory=ModelSource)


@dataclass
class AugmentConfig:
    """One augmenting model. ``augment:`` in YAML is one such mapping or a list of them."""

    model: ModelSource = field(default_factory=ModelSource)
    every_n: int | None = None  # null: composition.every_n / composition.connections
    connections: list[list[int]] | None = None  # [[augment_layer, anchor_layer], ...]
    stages: int | None = None  # its augment pipeline stages; null: parallel.augment_stages


@dataclass
class CompositionConfig:
    every_n: int | None = None  # the default of every augmenting model (null and no connections: 4)
    connections: list[list[int]] | None = None  # [[augment_layer, anchor_layer], ...]; 0-based, anchor -1 = embeddings
    relative_scale: bool = False  # bridge output scaled by the anchor's per-token RMS (see README)
    seed: int | None = None  # the bridges' initial weights and the order of training batches; null = run.seed
    position_buckets: int = 0  # > 0: a learned logit per head by anchor-augment position distance (see README)
    aligned_logit: float = 8.0  # its starting value at distance 0: each position starts reading its own token


@dataclass
class DataConfig:
    train: str = ""  # a .jsonl/.json/.parquet/.arrow/.csv file, a glob, or a directory written by save_to_disk
    eval: str | dict[str, str] | None = None  # one evaluation set, or {name: path}; null: eval_fraction of train
    eval_fraction: float = 0.05  # held out of train (seeded by run.seed) when data.eval is not given
    columns: dict[str, str] = field(default_factory=dict)  # renames, e.g. {instruction: prompt, output: completion}
    max_length: int = 512  # tokens per row, special tokens included
    overlong: str = "drop"  # rows over max_length: drop, or truncate (rows left with no labelled token are dropped)
    num_proc: int = 0  # processes that tokenise; 0 = one per 50,000 rows, at most the CPU count


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64  # global: rows per optimizer step over all anchor ranks
    lr: float = 1e-4
    warmup_steps: int = 50
    min_lr_rate: float = 0.1  # where the cosine ends, as a fraction of lr (transformers' cosine_with_min_lr)
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = at step 0 (the anchor alone) and at the end only
    batch_size: int = 32  # rows per anchor rank and forward


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = no checkpoints; > 0: the run directory is runs/<run.name> and a rerun resumes
    keep: int = 2  # complete checkpoints kept; older ones go only after a newer one is complete
    # where they go: "" = <run dir>/checkpoints; multi-node: a shared directory or a pyarrow.fs URI (s3://...)
    dir: str = ""


@dataclass
class ParallelConfig:
    anchor_ranks: int = 1
    augment_stages: int = 1  # per augmenting model without its own augment[i].stages
    min_anchor_ranks: int = 1
    backend: str = "auto"  # auto = nccl with CUDA, else gloo
    wire_dtype: str = "float32"  # dtype of activations on the wire: float32 or bfloat16
    pipeline_depth: int = 4  # micro-batches the augment pipeline may run ahead of the anchor
    timeout_s: int = 300  # a rank that waits longer than this on a peer fails (no hangs)


@dataclass
class DeepSpeedConfig:
    # bf16 frozen base models and bridge compute, fp32 bridge weights and optimizer state; every launcher
    bf16: bool = False
    param_persistence_threshold: int = 100000  # anchor params smaller than this are not partitioned
    # null = auto: one anchor decoder layer ahead; on CPU, where no gather overlaps compute, the largest weight of
    # one (never 0: DeepSpeed's trace then fails on resume). DeepSpeed refills the bucket after every module, so
    # prefetched weights pile up to max_live_parameters
    prefetch_bucket_size: int | None = None
    # null = auto: 3 anchor decoder layers; on CPU the largest weight of one (DeepSpeed's default, 1e9, lets
    # prefetch gather a whole small anchor)
    max_live_parameters: int | None = None
    # elements of the gradient bucket DeepSpeed allocates up front (its default 5e8 is 2 GB in fp32 per GPU).
    # null = auto: the composition's parameter count (at most 5e8); on CPU its largest weight
    reduce_bucket_size: int | None = None
    # a gathered parameter is kept (not re-partitioned) if the step uses it again within this many elements;
    # DeepSpeed's default, 1e9, keeps a whole small anchor gathered from forward to backward
    max_reuse_distance: int = 0
    # ZeRO++: hpZ keeps a second copy of the partitions inside groups of this many ranks (a node), so the
    # backward gathers stay inside them (1 = off; must divide parallel.anchor_ranks); qwZ gathers int8 weights
    zero_hpz_partition_size: int = 1
    zero_quantized_weights: bool = False
    activation_checkpointing: bool = False  # recompute anchor layers in backward
    # the anchor's nn.Linear layers keep a reference to their weight for backward, not its gathered storage
    # (ZeRO-3 re-gathers it there); false: plain F.linear, which keeps every gathered weight alive until backward
    frozen_linear: bool = True
    # rows per piece of the anchor's embedding and LM head on anchor ranks: ZeRO-3 gathers one piece at a time
    # instead of a whole vocabulary matrix. null = auto: no piece larger than a decoder layer's largest weight, whole
    # matrices with bf16 (pieces round their input gradients to bf16 before summing them); 0 = whole matrices
    vocab_piece_rows: int | None = None
    # CPU ranks: allocate buffers >= 64 KiB with mmap so freed gathered parameters go back to the OS
    # (resident memory tracks the partitions) at the cost of page faults on every large activation.
    return_freed_memory: bool = False

    @property
    def base_model_dtype(self):
        """The dtype the frozen base models are loaded in outside ZeRO-3: bf16 with ``bf16``, else None (their own)."""
        import torch

        return torch.bfloat16 if self.bf16 else None


@dataclass
class RayConfig:
    address: str | None = None  # a cluster to join; default: $RAY_ADDRESS, else an embedded local Ray
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    anchor_resources: dict[str, float] = field(default_factory=dict)  # extra per anchor rank, e.g. {anchor: 1}
    augment_resources: dict[str, float] = field(default_factory=dict)  # extra per augment stage
    placement_strategy: str = "PACK"  # PACK fills a node before using the next; SPREAD, STRICT_SPREAD, ...
    placement_timeout_s: int = 120
    dashboard_host: str = "127.0.0.1"
    embedded_dashboard: bool = False
    max_failures: int = 3  # lost worker processes/nodes survived by restarting (errors of worker code stop the job)
    grow_back: bool = True  # after shrinking, go back to parallel.anchor_ranks once the cluster can hold it


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    augment: list[AugmentConfig] = field(default_factory=lambda: [AugmentConfig()])
    composition: CompositionConfig = field(default_factory=CompositionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    recipe: dict[str, Any] | None = None  # {name: <recipe>, ...its own keys}; see calm_dist.recipes


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_value(key, value, option)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}': expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_check_value(f"{key}.{k}", k, key_type): _check_value(f"{key}.{k}", v, value_type)
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}': expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_value(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, value, f"{key}.")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "3e-3" as a string
        except ValueError:
            pass
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ValueError(
                f"config key '{key}': expected {annotation.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    raise ValueError(f"config key '{key}': unsupported type {annotation}")


# Keys of earlier configs of the framework, with what replaces them.
_MOVED = {
    "extra_augments": "list every augmenting model under 'augment:' instead, e.g. augment: [{model: {path: "
                      "/models/a1}}, {model: {path: /models/a2}, connections: [[2, 0]], stages: 2}]",
    "train.eval_every": "use eval.every_steps",
    "train.log_every": "progress is shown every step; remove the key",
    "eval.max_new_tokens": "evaluation is teacher-forced (no generation); a recipe that generates sets its own",
}


def _unknown_key_message(prefix: str, key: str, names: set[str]) -> str:
    text = f"unknown config key '{prefix}{key}' (known under '{prefix or '<root>'}': {sorted(names)})"
    hint = _MOVED.get(f"{prefix}{key}")
    if hint is None and not prefix:
        hint = "a recipe's own settings go under its 'recipe:' section"
    return f"{text}; {hint}" if hint else text


def build_section(cls, data: dict, prefix: str):
    """An instance of the dataclass ``cls`` from a mapping, every key checked; errors name ``prefix + key``."""
    if not isinstance(data, dict):
        raise ValueError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(_unknown_key_message(prefix, key, names))
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build_section(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", value, hint)
    return cls(**values)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for index, part in enumerate(parts[:-1]):
        if part == "augment" and index + 1 < len(parts):
            node = _first_augment(node)  # augment.model.path = the first (or only) augmenting model's
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _first_augment(tree: dict) -> dict:
    augment = tree.setdefault("augment", {})
    if isinstance(augment, list):
        if not augment:
            augment.append({})
        return augment[0]
    return augment


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a config file is a mapping of sections, got {type(tree).__name__}")
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> Config:
    tree = dict(tree)
    if isinstance(tree.get("augment"), dict):
        tree["augment"] = [tree["augment"]]
    config = build_section(Config, tree, "")
    validate(config)
    return config


def composition_seed(config: Config) -> int:
    """What seeds the bridges' initial weights and the training batches' order: ``composition.seed``, else
    ``run.seed`` (which alone seeds data preparation and held-out splits, so a second composition seed
    keeps the data and the base models)."""
    return config.run.seed if config.composition.seed is None else config.composition.seed


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


_POSITIVE = (
    "train.max_steps", "train.batch_size", "eval.batch_size", "data.max_length", "checkpoint.keep",
    "parallel.anchor_ranks", "parallel.augment_stages", "parallel.min_anchor_ranks", "parallel.pipeline_depth",
    "parallel.timeout_s",
)
_NON_NEGATIVE = (
    "run.seed", "composition.seed", "composition.position_buckets", "run.threads", "train.warmup_steps", "eval.every_steps",
    "checkpoint.every_steps",
    "train.weight_decay", "train.grad_clip", "data.num_proc", "deepspeed.param_persistence_threshold",
    "deepspeed.prefetch_bucket_size", "deepspeed.max_live_parameters", "deepspeed.max_reuse_distance",
    "deepspeed.vocab_piece_rows", "ray.max_failures",
)


def _get(config: Config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config key '{key}': {message}")


def _validate_pairs(pairs: list[list[int]] | None, key: str) -> None:
    for index, pair in enumerate(pairs or []):
        _require(len(pair) == 2, f"{key}[{index}]", "expected [augment_layer, anchor_layer]")


def _validate_connection_choice(every_n, connections, key: str) -> None:
    _require(every_n is None or connections is None, f"{key}.connections",
             f"set either {key}.every_n or {key}.connections, not both")
    _require(every_n is None or every_n >= 1, f"{key}.every_n", f"must be >= 1, got {every_n}")
    _validate_pairs(connections, f"{key}.connections")


def validate(config: Config) -> None:
    """Value checks that types alone cannot express; raises ValueError naming the key."""
    for key in _POSITIVE:
        _require(_get(config, key) > 0, key, f"must be > 0, got {_get(config, key)}")
    for key in _NON_NEGATIVE:
        value = _get(config, key)
        _require(value is None or value >= 0, key, f"must be >= 0, got {value}")
    bucket = config.deepspeed.reduce_bucket_size
    _require(bucket is None or bucket > 0, "deepspeed.reduce_bucket_size", f"must be > 0 or null (auto), got {bucket}")
    _require(config.train.lr > 0, "train.lr", "must be > 0")
    _require(0 <= config.train.min_lr_rate <= 1, "train.min_lr_rate", f"must be in [0, 1], got {config.train.min_lr_rate}")
    data = config.data
    _require(data.overlong in ("drop", "truncate"), "data.overlong", f"must be drop or truncate, got {data.overlong!r}")
    if data.eval is None:
        _require(0 < data.eval_fraction < 1, "data.eval_fraction",
                 f"must be in (0, 1) when data.eval is not given, got {data.eval_fraction}")
    if isinstance(data.eval, dict):
        _require(len(data.eval) > 0, "data.eval", "give at least one {name: path} entry, or a single path")
    _require(config.parallel.min_anchor_ranks <= config.parallel.anchor_ranks, "parallel.min_anchor_ranks",
             "must be <= parallel.anchor_ranks")
    _require(config.parallel.backend in ("auto", "gloo", "nccl"), "parallel.backend", "must be auto, gloo or nccl")
    _require(config.parallel.wire_dtype in ("float32", "bfloat16"), "parallel.wire_dtype",
             "must be float32 or bfloat16")
    _require(config.train.batch_size % config.parallel.anchor_ranks == 0, "train.batch_size",
             f"{config.train.batch_size} must be divisible by parallel.anchor_ranks={config.parallel.anchor_ranks} "
             "(each anchor rank takes an equal micro-batch)")
    hpz = config.deepspeed.zero_hpz_partition_size
    _require(hpz >= 1 and config.parallel.anchor_ranks % hpz == 0, "deepspeed.zero_hpz_partition_size",
             f"must be >= 1 and divide parallel.anchor_ranks={config.parallel.anchor_ranks}, got {hpz} "
             "(use the GPUs per node)")
    _require(config.run.launcher in ("ray", "local"), "run.launcher", "must be ray or local")
    _require(config.ray.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "ray.placement_strategy", "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    _require(config.ray.cpus_per_worker >= 0 and config.ray.gpus_per_worker >= 0, "ray.cpus_per_worker",
             "resources per worker must be >= 0")
    composition = config.composition
    _validate_connection_choice(composition.every_n, composition.connections, "composition")
    _require(len(config.augment) >= 1, "augment", "give at least one augmenting model")
    for index, augment in enumerate(config.augment):
        key = f"augment[{index}]"
        _validate_connection_choice(augment.every_n, augment.connections, key)
        _require(augment.stages is None or augment.stages >= 1, f"{key}.stages", f"must be >= 1, got {augment.stages}")
    if config.recipe is not None:
        _require(isinstance(config.recipe.get("name"), str) and bool(config.recipe.get("name")), "recipe.name",
                 "name the recipe, e.g. recipe: {name: kv_arithmetic, ...}")


def augment_stages(config: Config, index: int) -> int:
    """Pipeline stages of augmenting model ``index``."""
    own = config.augment[index].stages
    return own if own is not None else config.parallel.augment_stages


def stages_key(config: Config, index: int) -> str:
    """The config key that sets augmenting model ``index``'s stage count (for error messages)."""
    return f"augment[{index}].stages" if config.augment[index].stages is not None else "parallel.augment_stages"
