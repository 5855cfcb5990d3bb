"""The anchor side under DeepSpeed ZeRO-3: partitioned loading, the engine, composition-only optimizer.

The composed model is the plain ``CALMModel`` (no augmenting model: its tapped activations arrive
over the wire); DeepSpeed partitions the frozen anchor over the anchor ranks and keeps optimizer
state for the bridges only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from calm_dist.config import DeepSpeedConfig, TrainConfig
from calm_dist.optim import OptimSettings, warmup_cosine


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, micro_batch: int, load_universal: bool = False) -> dict:
    """``load_universal``: the engine will load a checkpoint in DeepSpeed's universal form (written at
    another anchor rank count)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
            "stage3_max_live_parameters": ds.max_live_parameters,
            # DeepSpeed's memory-efficient linear replaces F.linear process-wide for good; not wanted here.
            "memory_efficient_linear": False,
        },
        # torch's AdamW: DeepSpeed's FusedAdam would compile an op at start-up.
        "optimizer": {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay,
                                                  "torch_adam": True}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def init_deepspeed(backend: str) -> None:
    """DeepSpeed's communication layer over the anchor group that is already initialised.

    On CPU DeepSpeed would JIT-compile a shared-memory all-reduce op (g++, ~35 s); gloo suffices.
    """
    import importlib

    import deepspeed

    # Not `import deepspeed.comm.torch as m`: that resolves the package attribute `torch`, i.e. torch itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend)


def _weight_files(path: Path) -> dict[str, Path]:
    """Parameter name -> safetensors file, for single-file and sharded checkpoints."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}: save the anchor with save_pretrained")
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def release_freed_memory_to_the_os() -> None:
    """glibc keeps freed large buffers (gathered parameters) in its heap unless they are mmap-allocated;
    a lower mmap threshold returns them, so an anchor rank's resident memory tracks its partitions.
    The price: every large activation is a fresh mmap (page faults); a small anchor's step measured
    ~1.5x slower on CPU, hence opt-in (``deepspeed.return_freed_memory``)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


def _model_class(hf_config):
    import torch._dynamo  # noqa: F401  (imported before zero.Init patches tensor constructors)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]


def load_partitioned(path: str | Path, ds_config: dict, return_freed_memory: bool = False):
    """Build the anchor straight into ZeRO-3 partitions, then fill them one parameter at a time.

    No rank holds more than its partitions plus one gathered parameter (and rank 0 one open
    shard); only anchor rank 0 reads the weight files: DeepSpeed scatters what it reads.
    ``return_freed_memory``: see ``release_freed_memory_to_the_os``.
    """
    import deepspeed
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    if return_freed_memory:
        release_freed_memory_to_the_os()
    path = Path(path)
    hf_config = AutoConfig.from_pretrained(path)
    model_class = _model_class(hf_config)
    # prevent_arange_dtype_change keeps RoPE buffers at their explicit dtype (entered before zero.Init).
    # The parameter dtype comes from the config's bf16 section: zero.Init's own ``dtype`` argument is
    # ignored on accelerators without fp16 (DeepSpeed 0.19 then always picks bf16).
    with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config), \
            no_init_weights():
        model = model_class(hf_config)  # every weight is filled from the checkpoint below
    model.tie_weights()
    _fill_from_checkpoint(model, path)
    return model.eval()


def _fill_from_checkpoint(model, path: Path) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    parameters = dict(model.named_parameters())
    files = _weight_files(path)
    missing = sorted(set(parameters) - set(files))
    if missing:
        raise ValueError(f"anchor checkpoint {path} has no tensors {missing[:5]}")
    reading = dist.get_rank() == 0
    for file in sorted(set(files.values())):  # one shard open at a time, the same order on every rank
        handle = safe_open(file, "pt") if reading else None
        for name in (n for n in parameters if files[n] == file):
            with deepspeed.zero.GatheredParameters([parameters[name]], modifier_rank=0):
                if reading:
                    parameters[name].data.copy_(handle.get_tensor(name).to(parameters[name].dtype))
        del handle


def configure_anchor(anchor, ds: DeepSpeedConfig):
    """Options applied to the loaded anchor: activation checkpointing recomputes each layer in backward,
    so autograd keeps no gathered weights alive between forward and backward."""
    if ds.activation_checkpointing:
        anchor.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return anchor


def build_engine(model, ds: DeepSpeedConfig, train: TrainConfig, micro_batch: int, load_universal: bool = False):
    """deepspeed.initialize over the composed model; only the bridges reach the optimizer."""
    import deepspeed

    ds_config = deepspeed_config(ds, train, micro_batch, load_universal)
    settings = OptimSettings.of(train)
    schedule = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        optimizer, lambda step: warmup_cosine(step, settings))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.trainable_parameters(), config=ds_config, lr_scheduler=schedule)
    return engine, optimizer, scheduler


def optimizer_state_numel(optimizer) -> int:
    """Elements of optimizer state held on this rank (exp_avg + exp_avg_sq over its partitions)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    total = 0
    for state in inner.state.values():
        total += sum(value.numel() for value in state.values() if torch.is_tensor(value) and value.dim() > 0)
    return total


def gathered_composition_state(model) -> dict[str, torch.Tensor]:
    """Full fp32 composition weights gathered from the ZeRO-3 partitions (every anchor rank must call it)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.bridges.parameters())):
        return {name: tensor.detach().clone().float() for name, tensor in model.composition_state_dict().items()}
