"""The anchor side under DeepSpeed ZeRO-3: partitioned loading, the engine, composition-only optimizer.

The composed model is the plain ``CALMModel`` (no augmenting model: its tapped activations arrive
over the wire); DeepSpeed partitions the frozen anchor over the anchor ranks and keeps optimizer
state for the bridges only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from calm_dist.config import DeepSpeedConfig, TrainConfig
from calm_dist.model.vocab_pieces import PieceSource, split_vocab_matrices
from calm_dist.optim import OptimSettings, warmup_cosine


DEEPSPEED_PREFETCH_BUCKET, DEEPSPEED_MAX_LIVE, DEEPSPEED_REDUCE_BUCKET = 50_000_000, 1_000_000_000, 500_000_000  # its defaults
LIVE_LAYERS = 3  # auto max_live_parameters on accelerators: the layer in use, the one prefetched, one in release


@dataclass(frozen=True)
class EngineSizes:
    """Elements of the anchor's largest decoder layer and largest decoder-layer weight (full sizes, also when
    ZeRO-3 partitioned), and of the composition's parameters in all and its largest one."""

    layer_numel: int
    weight_numel: int
    trainable_numel: int
    trainable_weight_numel: int


def _decoder_layer_numels(anchor) -> list[list[int]]:
    from calm_dist.model.layers import find_decoder_layers

    return [[getattr(p, "ds_numel", p.numel()) for p in layer.parameters()] for layer in find_decoder_layers(anchor)]


def engine_sizes(model) -> EngineSizes:
    """``model``: the composed model an anchor rank trains."""
    layers = _decoder_layer_numels(model.anchor)
    trainable = [getattr(p, "ds_numel", p.numel()) for p in model.trainable_parameters()]
    return EngineSizes(max(map(sum, layers)), max(map(max, layers)), sum(trainable), max(trainable, default=0))


def gather_limits(ds: DeepSpeedConfig, sizes: EngineSizes | None, on_cpu: bool = False) -> tuple[int, int]:
    """(prefetch bucket, max live parameters) in elements: the configured values, or for ``null`` (auto)
    derived from the anchor's layer sizes (unknown: DeepSpeed's defaults).

    DeepSpeed's prefetcher tops the bucket up again after every module, so prefetched weights accumulate
    until ``max_live_parameters``; its default (1e9 elements) holds a whole small anchor gathered on every
    rank. Each layer of that limit is a layer's weights in every rank's peak (0.05 of a 16-layer anchor;
    docs/scaling.md). On accelerators auto prefetches one layer, so that gathers overlap compute. On CPU
    no gather overlaps compute: both limits are one weight (the largest), which bounds what is gathered
    beyond the module in use; each coalesced gather also holds its flat buffer and the per-parameter
    copies at once, twice what it gathers. The prefetch is never 0: with a bucket of 0 DeepSpeed's fetch
    queue stays empty while its trace is complete, and the first step after a resume fails with "tracing
    error" (tests/test_driver_restart.py)."""
    prefetch, live = ds.prefetch_bucket_size, ds.max_live_parameters
    if sizes is None:
        auto_prefetch, auto_live = DEEPSPEED_PREFETCH_BUCKET, DEEPSPEED_MAX_LIVE
    elif on_cpu:
        auto_prefetch = auto_live = sizes.weight_numel
    else:
        auto_prefetch, auto_live = sizes.layer_numel, LIVE_LAYERS * sizes.layer_numel
    return (auto_prefetch if prefetch is None else prefetch), (auto_live if live is None else live)


def reduce_bucket(ds: DeepSpeedConfig, sizes: EngineSizes | None, on_cpu: bool = False) -> int:
    """Elements of DeepSpeed's gradient bucket: the configured value, or for ``null`` (auto) no more than
    the composition needs. DeepSpeed allocates the whole bucket up front (its default, 5e8 elements, is
    2 GB in fp32 on a GPU) and copies gradients into it until it is full. On CPU one weight: only the
    pages written become resident, and a reduction does not overlap backward there."""
    if ds.reduce_bucket_size is not None:
        return ds.reduce_bucket_size
    if sizes is None or not sizes.trainable_numel:
        return DEEPSPEED_REDUCE_BUCKET
    return sizes.trainable_weight_numel if on_cpu else min(DEEPSPEED_REDUCE_BUCKET, sizes.trainable_numel)


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, micro_batch: int, load_universal: bool = False,
                     sizes: EngineSizes | None = None, on_cpu: bool = False) -> dict:
    """``load_universal``: the engine will load a checkpoint in DeepSpeed's universal form (written at
    another anchor rank count). ``sizes``, ``on_cpu``: for the auto gather limits and bucket (``gather_limits``,
    ``reduce_bucket``)."""
    prefetch, live = gather_limits(ds, sizes, on_cpu)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "stage3_prefetch_bucket_size": prefetch,
            "stage3_max_live_parameters": live,
            "stage3_max_reuse_distance": ds.max_reuse_distance,
            "reduce_bucket_size": reduce_bucket(ds, sizes, on_cpu),
            "zero_hpz_partition_size": ds.zero_hpz_partition_size,
            "zero_quantized_weights": ds.zero_quantized_weights,
            # DeepSpeed's memory-efficient linear replaces F.linear process-wide for good; the anchor's own
            # linear layers do the same job instead (deepspeed.frozen_linear, see frozen_linear.py).
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

    On CPU DeepSpeed would JIT-compile a shared-memory all-reduce op (g++, ~35 s); gloo suffices. Over
    gloo, large parameter gathers run in chunks (``chunked_gloo_all_gather``). DeepSpeed's CPU accelerator
    counts its devices by running ``numactl --hardware`` in a subprocess on every call (ZeRO-3 calls it for
    every gradient reduce) unless ``LOCAL_SIZE`` is set, as DeepSpeed's own launcher sets it: it is set to the
    ranks on this node (``LOCAL_WORLD_SIZE`` under torchrun, else 1, the one rank of a Ray actor).
    """
    import importlib

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # Not `import deepspeed.comm.torch as m`: that resolves the package attribute `torch`, i.e. torch itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend)
    if backend == "gloo":
        from deepspeed.comm import comm

        if not getattr(comm.cdb.all_gather_into_tensor, "chunked", False):
            comm.cdb.all_gather_into_tensor = chunked_gloo_all_gather(comm.cdb.all_gather_into_tensor)


GLOO_GATHER_CHUNK_BYTES = 16 << 20


class _Done:
    """The handle of a collective that has already finished."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def chunked_gloo_all_gather(original, chunk_bytes: int = GLOO_GATHER_CHUNK_BYTES):
    """DeepSpeed's ``all_gather_into_tensor`` for gloo, in pieces of at most ``chunk_bytes`` of output.

    Gloo's all-gather receives into a flat buffer of its own and then copies it into the output, so
    gathering a parameter costs twice its size; for the largest tensors (an embedding or LM head, ~9% of a
    0.55B anchor each) that transient doubled an anchor rank's peak memory beyond its partitions. In
    pieces, gloo's own buffer is at most ``chunk_bytes``. (NCCL gathers in place: GPUs keep the original.)
    """
    import torch.distributed as dist

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        size = input_tensor.numel()
        if output_tensor.numel() * output_tensor.element_size() <= chunk_bytes or output_tensor.device.type != "cpu" \
                or not (output_tensor.is_contiguous() and input_tensor.is_contiguous()):
            return original(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)
        world = dist.get_world_size(group)
        rows, given = output_tensor.view(world, size), input_tensor.view(-1)
        step = max(1, chunk_bytes // (world * input_tensor.element_size()))
        for start in range(0, size, step):
            end = min(start + step, size)
            dist.all_gather([rows[rank, start:end] for rank in range(world)], given[start:end], group=group)
        return _Done() if async_op else None

    all_gather_into_tensor.chunked = True
    return all_gather_into_tensor


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


def load_partitioned(path: str | Path, ds_config: dict, return_freed_memory: bool = False,
                     vocab_piece_rows: int | None = None):
    """Build the anchor straight into ZeRO-3 partitions, then fill them one parameter at a time.

    Every rank reads its own slice of each tensor (``_fill_from_checkpoint``): no rank holds more than its
    partitions plus a few rows; every anchor rank must see the model directory.
    ``return_freed_memory``: see ``release_freed_memory_to_the_os``. ``vocab_piece_rows``: the embedding
    and LM head are built as pieces of this many rows (``calm_dist.model.vocab_pieces``), so that ZeRO-3
    gathers one piece at a time; None: auto (``auto_vocab_piece_rows``); 0: whole.
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
            no_init_weights(), _without_init_broadcast():
        model = model_class(hf_config)  # every weight is filled from the checkpoint below
        model.tie_weights()
        low_precision = ds_config.get("bf16", {}).get("enabled", False)
        rows = auto_vocab_piece_rows(model, low_precision) if vocab_piece_rows is None else vocab_piece_rows
        pieces = split_vocab_matrices(model, rows) if rows else {}
    _fill_from_checkpoint(model, path, pieces)
    return model.eval()


@contextlib.contextmanager
def _without_init_broadcast():
    """zero.Init partitions each new parameter after broadcasting its initial values from rank 0, so that
    ranks agree. Every value here is read from the checkpoint afterwards, so the broadcast is skipped: it
    would send the whole anchor over the network at load and make each receiving rank hold a whole tensor
    (the largest, the embedding, set those ranks' loading peak)."""
    from deepspeed.runtime.zero.partition_parameters import Init

    original = Init._zero_init_param

    def partition_only(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()

    Init._zero_init_param = partition_only
    try:
        yield
    finally:
        Init._zero_init_param = original


def auto_vocab_piece_rows(model, low_precision: bool = False) -> int:
    """Rows per vocabulary piece such that a piece is no larger than the model's largest decoder-layer weight;
    0 (whole matrices) for a bf16 anchor: there each piece's input gradient is rounded to bf16 before the
    pieces' sum, and the bf16 anchor rank then strays from its one-process twin (tests/test_distributed_runtime.py:
    1.3e-4 in loss over 3 steps against 3.4e-5 with a whole head)."""
    if low_precision:
        return 0
    largest = max(map(max, _decoder_layer_numels(model)))
    embedding = model.get_input_embeddings()
    width = getattr(embedding, "embedding_dim", None) or model.config.get_text_config().hidden_size
    return max(1, largest // width)


def _fill_from_checkpoint(model, path: Path, pieces: dict[str, PieceSource]) -> None:
    """Each rank reads only its own partition of each tensor from the safetensors files (a slice of rows
    plus at most two partial rows), straight into its ZeRO-3 partition: no rank ever holds a whole tensor
    or a whole shard, and nothing is communicated. ``pieces``: parameters that are row ranges of a stored
    tensor (``split_vocab_matrices``)."""
    from safetensors import safe_open

    parameters = dict(model.named_parameters())
    sources = {name: pieces.get(name, PieceSource(name)) for name in parameters}
    files = _weight_files(path)
    missing = sorted(name for name, source in sources.items() if source.name not in files)
    if missing:
        raise ValueError(f"anchor checkpoint {path} has no tensors {missing[:5]}")
    for file in sorted(set(files.values())):  # one shard open at a time
        with safe_open(file, "pt") as handle:
            for name in (n for n, source in sources.items() if files[source.name] == file):
                _fill_partition(parameters[name], handle, sources[name])


def _fill_partition(parameter, handle, source: PieceSource) -> None:
    import torch.distributed as dist

    if getattr(parameter, "ds_secondary_tensor", None) is not None or not hasattr(parameter, "ds_tensor"):
        _fill_gathered(parameter, handle, source)  # not the plain stage-3 layout: gather, copy, re-partition
        return
    partition = parameter.ds_tensor
    size = partition.numel()
    start = size * dist.get_rank(group=parameter.ds_process_group)
    end = min(start + size, parameter.ds_numel)
    with torch.no_grad():
        if start < end:
            values = _read_flat_range(handle, source, start, end, tuple(parameter.ds_shape))
            partition[: end - start].copy_(values.to(partition.dtype))
        partition[max(end - start, 0):].zero_()  # ZeRO-3's padding


def _read_flat_range(handle, source: PieceSource, start: int, end: int, shape: tuple) -> torch.Tensor:
    """Elements ``[start, end)`` of the flattened parameter of ``shape`` that ``source`` locates in the
    checkpoint, reading only the stored rows that hold them."""
    tensor_slice = handle.get_slice(source.name)
    stored = tuple(tensor_slice.get_shape())
    expected = shape if source.rows is None else (source.total_rows, *shape[1:])
    if stored != expected:
        raise ValueError(f"anchor tensor {source.name} has shape {list(stored)} in the checkpoint, the model "
                         f"expects {list(expected)}")
    row = math.prod(stored[1:])
    start, end = start + source.start_row * row, end + source.start_row * row
    if len(stored) <= 1:
        return tensor_slice[start:end].reshape(-1)
    first, last = start // row, -(-end // row)
    rows = tensor_slice[first:last].reshape(-1)
    offset = start - first * row
    return rows[offset: offset + end - start]


def _fill_gathered(parameter, handle, source: PieceSource) -> None:
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
        with torch.no_grad():
            shape = tuple(parameter.shape)
            values = _read_flat_range(handle, source, 0, math.prod(shape), shape)
            parameter.data.copy_(values.view(shape).to(parameter.dtype))


def configure_anchor(anchor, ds: DeepSpeedConfig):
    """Options applied to the loaded anchor: its linear layers save no gathered weight for backward
    (``frozen_linear.py``). Activation checkpointing is the composed model's (``CALMModel.checkpoint_activations``)."""
    if ds.frozen_linear:
        from calm_dist.distributed.frozen_linear import use_frozen_linear

        use_frozen_linear(anchor)
    return anchor


def build_engine(model, ds: DeepSpeedConfig, train: TrainConfig, micro_batch: int, load_universal: bool = False):
    """deepspeed.initialize over the composed model; only the bridges reach the optimizer. With
    ``deepspeed.frozen_linear`` the bridges' linear layers keep no gathered weight for backward either."""
    import deepspeed

    if ds.frozen_linear:
        from calm_dist.distributed.frozen_linear import use_frozen_linear

        use_frozen_linear(model.bridges)

    ds_config = deepspeed_config(ds, train, micro_batch, load_universal, engine_sizes(model),
                                 next(model.parameters()).device.type == "cpu")
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
