"""One config tree: dataclasses loaded from YAML, with dotted ``key=value`` overrides.

Unknown keys and values of the wrong type raise a ValueError naming the dotted key.
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
    name: str = "kv_arithmetic"
    output_dir: str = "runs"
    cache_dir: str = ".cache/calm_dist"
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # ray: composition on Ray workers (a cluster, or an embedded local Ray); local: one process, no Ray
    launcher: str = "ray"


@dataclass
class DataConfig:
    num_keys: int = 200
    key_min_len: int = 2
    key_max_len: int = 4
    value_max: int = 20
    min_operands: int = 2
    max_operands: int = 3
    heldin_fraction: float = 0.2
    val_fraction: float = 0.0
    base_train_examples: int = 60000  # per base-model task
    composition_train_examples: int = 60000
    # m_A's KV-Substitution data: probability that an operand is a number literal (which
    # substitutes to itself), so m_A reads numbers and keys alike as values. Never arithmetic.
    augment_number_operand_prob: float = 0.0
    # Fraction of D_C that is plain Numeric-Arithmetic (0 = the paper's D_C, KV-Arithmetic only).
    composition_numeric_fraction: float = 0.0
    eval_examples: int = 400  # per evaluation set


@dataclass
class ModelConfig:
    path: str | None = None  # a saved HF model to load instead of training one from scratch
    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256


@dataclass
class OptimConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class BaseModelConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: OptimConfig = field(default_factory=OptimConfig)
    # After pretraining, set the input embedding of every token absent from the model's training data
    # to zero: tokens the model never read are indistinguishable to it (random untrained embeddings
    # are not, and a composition can memorise them). See docs/investigation.md, rows 13-16.
    zero_unseen_embeddings: bool = False


@dataclass
class CompositionConfig:
    every_n: int | None = None
    connections: list[list[int]] | None = None  # [[augment_layer, anchor_layer], ...]
    relative_scale: bool = False  # bridge output scaled by the anchor's per-token RMS (see README)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0 = evaluate at the end only


@dataclass
class EvalConfig:
    batch_size: int = 256
    max_new_tokens: int = 8


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = no checkpoints; > 0: the run directory is runs/<run.name> and a rerun resumes
    keep: int = 2  # complete checkpoints kept; older ones go only after a newer one is complete
    # where they go: "" = <run dir>/checkpoints; multi-node: a shared directory or a pyarrow.fs URI (s3://...)
    dir: str = ""


@dataclass
class ParallelConfig:
    anchor_ranks: int = 1
    augment_stages: int = 1
    min_anchor_ranks: int = 1
    backend: str = "auto"  # auto = nccl with CUDA, else gloo
    wire_dtype: str = "float32"  # dtype of activations on the wire: float32 or bfloat16
    pipeline_depth: int = 4  # micro-batches the augment pipeline may run ahead of the anchor
    timeout_s: int = 300  # a rank that waits longer than this on a peer fails (no hangs)


@dataclass
class DeepSpeedConfig:
    bf16: bool = False
    param_persistence_threshold: int = 100000  # anchor params smaller than this are not partitioned
    prefetch_bucket_size: int = 50000000
    max_live_parameters: int = 1000000000
    activation_checkpointing: bool = False  # recompute anchor layers in backward
    # CPU ranks: allocate buffers >= 64 KiB with mmap so freed gathered parameters go back to the OS
    # (resident memory tracks the partitions) at the cost of page faults on every large activation.
    return_freed_memory: bool = False


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
class ExtraAugmentConfig:
    """A further augmenting model for the distributed runtime, beside the ``augment`` section's."""

    path: str = ""  # a saved HF model (save_pretrained) that uses the task's tokenizer
    connections: list[list[int]] | None = None  # [[augment_layer, anchor_layer], ...]; null = every 4th layer
    stages: int = 1  # its augment pipeline stages (ranks)


@dataclass
class BaselinesConfig:
    # The paper's baselines, each an extra row of the results, trained on D_C with the composition's
    # budget (train.*) in the driver process after the composition.
    lora: bool = False  # LoRA on the anchor with as many trainable parameters as the composition
    random_augment: bool = False  # CALM whose m_A is untrained (m_A's architecture and initial weights)
    vanilla_augment: bool = False  # CALM whose m_A is trained on Numeric-Arithmetic instead of the keys
    two_augments: bool = False  # CALM over two m_As (m_A's architecture), each knowing half of the keys
    different_tokenizer: bool = False  # CALM whose m_A reads characters while the anchor reads words
    lora_target_modules: list[str] | None = None  # None = every linear layer of the anchor but the LM head
    lora_alpha_per_rank: float = 2.0  # lora_alpha = this x the rank that matches the parameter count


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: BaseModelConfig = field(default_factory=BaseModelConfig)
    anchor: BaseModelConfig = field(default_factory=BaseModelConfig)
    composition: CompositionConfig = field(default_factory=CompositionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    extra_augments: list[ExtraAugmentConfig] = field(default_factory=list)


def _check_value(key: str, value: Any, annotation: Any) -> Any:
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
        return _build(annotation, value, f"{key}.")
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


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ValueError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(
                f"unknown config key '{prefix}{key}' (known under '{prefix or '<root>'}': {sorted(names)})"
            )
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            values[name] = _check_value(f"{prefix}{name}", value, hint)
    return cls(**values)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


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
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value)
    config = _build(Config, tree, "")
    validate(config)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


SUPPORTED_ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")

_POSITIVE = (
    "data.num_keys", "data.key_min_len", "data.value_max", "data.min_operands",
    "data.base_train_examples", "data.composition_train_examples", "data.eval_examples",
    "train.max_steps", "train.batch_size", "train.log_every", "eval.batch_size", "eval.max_new_tokens",
    "checkpoint.keep", "parallel.anchor_ranks", "parallel.augment_stages", "parallel.min_anchor_ranks",
    "parallel.pipeline_depth", "parallel.timeout_s",
)
_NON_NEGATIVE = (
    "run.seed", "run.threads", "train.warmup_steps", "train.eval_every", "checkpoint.every_steps",
    "train.weight_decay", "train.grad_clip", "deepspeed.param_persistence_threshold",
    "deepspeed.prefetch_bucket_size", "deepspeed.max_live_parameters", "ray.max_failures",
)


def _get(config: Config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"config key '{key}': {message}")


def _validate_base(config: BaseModelConfig, side: str) -> None:
    model, optim = config.model, config.pretrain
    _require(model.arch in SUPPORTED_ARCHS, f"{side}.model.arch", f"{model.arch!r} is not one of {SUPPORTED_ARCHS}")
    for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
        _require(getattr(model, name) > 0, f"{side}.model.{name}", "must be > 0")
    _require(model.hidden_size % model.num_heads == 0, f"{side}.model.hidden_size",
             f"{model.hidden_size} must be divisible by num_heads={model.num_heads}")
    for name in ("steps", "batch_size"):
        _require(getattr(optim, name) > 0, f"{side}.pretrain.{name}", "must be > 0")
    _require(optim.lr > 0, f"{side}.pretrain.lr", "must be > 0")


def _validate_baselines(config: Config) -> None:
    baselines = config.baselines
    _require(baselines.lora_alpha_per_rank > 0, "baselines.lora_alpha_per_rank", "must be > 0")
    _require(baselines.lora_target_modules is None or len(baselines.lora_target_modules) > 0,
             "baselines.lora_target_modules", "must name at least one module, or be null (every linear layer)")
    for flag in ("random_augment", "vanilla_augment", "two_augments", "different_tokenizer"):
        _require(not (getattr(baselines, flag) and config.augment.model.path), f"baselines.{flag}",
                 "needs an m_A the job builds from augment.model (unset augment.model.path)")


def validate(config: Config) -> None:
    """Value checks that types alone cannot express; raises ValueError naming the key."""
    for key in _POSITIVE:
        _require(_get(config, key) > 0, key, f"must be > 0, got {_get(config, key)}")
    for key in _NON_NEGATIVE:
        _require(_get(config, key) >= 0, key, f"must be >= 0, got {_get(config, key)}")
    data = config.data
    _require(data.key_max_len >= data.key_min_len, "data.key_max_len", "must be >= data.key_min_len")
    _require(data.max_operands >= data.min_operands, "data.max_operands", "must be >= data.min_operands")
    _require(0 < data.heldin_fraction < 1, "data.heldin_fraction", "must be in (0, 1)")
    _require(0 <= data.val_fraction < 1 - data.heldin_fraction, "data.val_fraction",
             "must be in [0, 1 - heldin_fraction)")
    _require(0 <= data.augment_number_operand_prob <= 1, "data.augment_number_operand_prob", "must be in [0, 1]")
    _require(0 <= data.composition_numeric_fraction < 1, "data.composition_numeric_fraction", "must be in [0, 1)")
    _require(config.train.lr > 0, "train.lr", "must be > 0")
    _require(config.parallel.min_anchor_ranks <= config.parallel.anchor_ranks, "parallel.min_anchor_ranks",
             "must be <= parallel.anchor_ranks")
    _require(config.parallel.backend in ("auto", "gloo", "nccl"), "parallel.backend", "must be auto, gloo or nccl")
    _require(config.parallel.wire_dtype in ("float32", "bfloat16"), "parallel.wire_dtype",
             "must be float32 or bfloat16")
    _require(config.run.launcher in ("ray", "local"), "run.launcher", "must be ray or local")
    _require(config.ray.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
             "ray.placement_strategy", "must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    _require(config.ray.cpus_per_worker >= 0 and config.ray.gpus_per_worker >= 0, "ray.cpus_per_worker",
             "resources per worker must be >= 0")
    composition = config.composition
    _require(composition.every_n is None or composition.connections is None, "composition.connections",
             "set either composition.every_n or composition.connections, not both")
    if composition.connections is not None:
        for index, pair in enumerate(composition.connections):
            _require(len(pair) == 2, f"composition.connections[{index}]", "expected [augment_layer, anchor_layer]")
    for side in ("augment", "anchor"):
        _validate_base(getattr(config, side), side)
    _validate_baselines(config)
    for index, extra in enumerate(config.extra_augments):
        _validate_extra_augment(extra, f"extra_augments[{index}]")


def _validate_extra_augment(extra: ExtraAugmentConfig, key: str) -> None:
    _require(bool(extra.path), f"{key}.path", "must name a saved Hugging Face model directory")
    _require(extra.stages >= 1, f"{key}.stages", f"must be >= 1, got {extra.stages}")
    for index, pair in enumerate(extra.connections or []):
        _require(len(pair) == 2, f"{key}.connections[{index}]", "expected [augment_layer, anchor_layer]")
