"""calm_dist against the reference implementation CALM-Pytorch 0.2.2 (import name ``CALM_pytorch``).

Run: ``python -m benchmarks.bench_vs_calm_pytorch [--quick] [--threads N] [--profile]``. Prints one JSON
line per figure on stdout (nothing else); progress (and with ``--profile`` where generation time goes)
goes to stderr. Only ratios measured side by side in this one process mean anything: repetitions of the
two implementations are interleaved and medians taken.

Figures: training-step time ratio, on every-position-labelled rows of the tiny pair and on composition
batches (below); greedy generation tokens/s ratio at batch 8 and at batch 1 (64 new tokens after a
16-token prompt); and, for calm_dist alone, the time per generated token at 512 new tokens over that at 64
(the cache keeps a step's cost flat as the sequence grows).

How the two are matched
-----------------------
* Base models: one seeded anchor ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads, MLP 512) and one
  seeded augment (hidden 128, 4 layers, 4 heads, MLP 256), vocabulary 300, SDPA attention. Each
  implementation composes its own deep copy, because both patch the anchor in place (calm_dist wraps
  its decoder layers, calm_pytorch registers forward hooks on them).
* Connections: calm_dist's ``(augment_layer, anchor_layer)`` are 0-based decoder-layer indices, each
  meaning "the output of that layer". calm_pytorch's are 1-based indices into the block lists we give it
  (the HF decoder layers, in order, hooked at their 'output'). So ours ``((1, 1), (3, 3))`` is theirs
  ``((2, 2), (4, 4))``: two cross-attention blocks, after anchor layers 2 and 4 (1-based), reading the
  outputs of augment layers 2 and 4.
* Bridge: both project the augment state with Linear(128 -> 256, bias), then multi-head attention with
  4 heads x 64 dims, bias-free q/k/v/o, zero-initialised output, added to the anchor layer output;
  both call ``F.scaled_dot_product_attention`` (calm_pytorch ``flash=True``). We pass
  ``pre_rmsnorm=False`` (calm_pytorch's default turns it on) since our bridge has no pre-norm.
* Wrapping HF models for calm_pytorch: it needs an anchor that returns a logits tensor
  (``_LogitsOnly``) and hooks on the transformer blocks (``model.model.layers``). The augment is given
  as its backbone only (``_AugmentBackbone``, no LM head), as calm_dist runs it; both with
  ``use_cache=False``, and the augment gets the attention mask (``mask_kwarg``) as ours does.
* Training step: every model reads exactly ``train_len`` tokens per row. Ours: ``input_ids =
  data[:, :T]``, ``labels`` the same (shifted inside: T-1 predictions), through the forward every
  calm_dist training path uses (``logits_for="labels"``). Theirs: ``seq = data`` (T+1 tokens; it feeds
  ``seq[:, :-1]`` to the anchor and predicts ``seq[:, 1:]``) and ``prompt = data[:, :T]`` for the
  augment. Same plain loop for both: loss, ``backward()``, ``torch.optim.AdamW`` over the trainable
  parameters only, ``zero_grad(set_to_none=True)`` (not calm_pytorch's ``FineTuner``, which adds
  accelerate, a warm-up schedule and clipping).
* Composition batches: the same step on rows shaped like D_C, a prompt and then the completion that
  carries the loss (``prompt_fraction`` of each row is prompt), and on a pair whose vocabulary is as large
  for the anchor's width as a real LLM's (``composition_vocab``: 32 tokens per hidden unit, Llama 3 8B's
  128,256 / 4,096; the tiny pair's 300 is 1.2). Both get the same models and rows and count the same
  number of targets (``completion_targets``); theirs masks its labels with its own ``mask=`` argument.
  On every-position-labelled rows with a 300-token vocabulary there is nothing to leave out and both do
  the same matmuls; here calm_dist computes logits and cross-entropy only where a label counts, calm_pytorch
  over every position.
* Generation: same prompt batch, greedy, 64 new tokens, no EOS. Ours: ``CALMForCausalLM.generate``
  (transformers' GenerationMixin over a CALMCache: KV caches on both models, each bridge's augment
  states, all grown in place). Theirs: ``CALM.generate``, which runs the
  augment once on the prompt, then re-runs the whole anchor over the whole sequence (plus one padding
  slot) for every new token: no KV cache. It only samples, so we pass a ``filter_fn`` that keeps just
  the top logit: its Gumbel sampling then returns the argmax. Its tqdm bar is turned off.

Differences calm_pytorch cannot turn off (documented, not equalised)
--------------------------------------------------------------------
* A per-head value gate (``gate_value_heads=True``: Linear(256 -> 4) + sigmoid) in each block: +1,028
  trainable parameters per block, 0.35% of the total (see ``reference_trainable_param_count``).
* Its cross-attention is not causal: each anchor position reads every augment position of the prompt
  (ours is causal and padding-aware, through a boolean SDPA mask). Same FLOPs, different semantics.
* During generation its augment never sees the generated tokens (ours extends the augment with them).
* calm_dist taps ``hidden_states[layer + 1]`` of the augment, which for its last layer is the output
  after the final norm; calm_pytorch taps the raw block output. One RMSNorm, no cost difference.
* It puts the (dropout-free) anchor in train mode for the loss; ours keeps both base models in eval.
* CALM's constructor leaves "recorder" hooks on the anchor blocks that append every block output to a
  list that is never emptied (~50 MB per generation call here). We remove them after construction:
  that only makes the reference faster, so the ratios reported are conservative.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import nn

REFERENCE_IMPORT_NAMES = ("CALM_pytorch", "calm_pytorch")
INSTALL_HINT = 'calm_pytorch (CALM-Pytorch) is not installed: run `pip install -e ".[bench]"`'
# Trainable parameter counts of the two setups must agree within this factor (they differ by the
# per-head value gate of calm_pytorch only, 0.35% here); a larger gap means the setups diverged.
PARAM_COUNT_FACTOR = 1.05


@dataclass(frozen=True)
class BenchConfig:
    vocab: int = 300
    anchor_hidden: int = 256
    anchor_layers: int = 4
    anchor_heads: int = 4
    augment_hidden: int = 128
    augment_layers: int = 4
    augment_heads: int = 4
    connections: tuple = ((1, 1), (3, 3))  # calm_dist convention: 0-based (augment, anchor) layers
    train_batch: int = 16
    train_len: int = 32
    prompt_batch: int = 8
    prompt_len: int = 16
    new_tokens: int = 64
    long_new_tokens: int = 512  # the flatness figure: time per token here vs at new_tokens
    composition_vocab: int = 8192  # the composition-batch figure's pair: 32 tokens per anchor hidden unit
    prompt_fraction: float = 0.5  # of each composition-batch row; the rest is the completion that is scored
    lr: float = 1e-4
    seed: int = 0

    @property
    def prompt_tokens(self) -> int:
        return int(self.train_len * self.prompt_fraction)

    @property
    def completion_targets(self) -> int:
        """Targets each implementation scores per composition-batch row."""
        return self.train_len - self.prompt_tokens

    @property
    def reference_connections(self) -> tuple:
        """calm_pytorch counts blocks from 1: our decoder layer i is its block i + 1."""
        return tuple((augment + 1, anchor + 1) for augment, anchor in self.connections)


@dataclass(frozen=True)
class Repeats:
    train_warmup: int
    train: int
    gen_warmup: int
    gen: int
    long: int  # repetitions of each length in the flatness figure


DEFAULT_REPEATS = Repeats(train_warmup=5, train=40, gen_warmup=1, gen=10, long=5)
QUICK_REPEATS = Repeats(train_warmup=1, train=3, gen_warmup=1, gen=1, long=1)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def import_reference():
    """The calm_pytorch package, or None when it is not installed."""
    for name in REFERENCE_IMPORT_NAMES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Models


def tiny_llama(config: BenchConfig, hidden: int, layers: int, heads: int, seed: int) -> nn.Module:
    import transformers

    llama_config = transformers.LlamaConfig(
        vocab_size=config.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    llama_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config).eval()


def base_models(config: BenchConfig) -> tuple[nn.Module, nn.Module]:
    anchor = tiny_llama(config, config.anchor_hidden, config.anchor_layers, config.anchor_heads, config.seed)
    augment = tiny_llama(config, config.augment_hidden, config.augment_layers, config.augment_heads, config.seed + 1)
    return anchor, augment


def build_ours(config: BenchConfig, anchor: nn.Module, augment: nn.Module):
    import calm_dist

    return calm_dist.compose(copy.deepcopy(anchor), copy.deepcopy(augment), connections=list(config.connections))


class _LogitsOnly(nn.Module):
    """An HF causal LM as calm_pytorch wants its anchor: token ids in, logits tensor out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.calls = 0
        self.last_length = 0

    def forward(self, input_ids):
        self.calls += 1
        self.last_length = input_ids.shape[-1]
        return self.model(input_ids=input_ids, use_cache=False).logits


class _AugmentBackbone(nn.Module):
    """The augment without its LM head (what calm_dist runs too); calm_pytorch hooks its layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.model

    def forward(self, input_ids, attention_mask=None):
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def _drop_recorder_hooks(reference, blocks: list[nn.Module]) -> None:
    """Remove CALM's construction-time recorders from the anchor blocks (they leak every output)."""
    recorder_type = importlib.import_module(reference.CALM.__module__).Recorder
    for block in blocks:
        for key in [key for key, hook in block._forward_hooks.items() if isinstance(hook, recorder_type)]:
            del block._forward_hooks[key]


def build_reference(config: BenchConfig, anchor: nn.Module, augment: nn.Module, reference):
    anchor_lm = _LogitsOnly(copy.deepcopy(anchor))
    augment_lm = _AugmentBackbone(copy.deepcopy(augment))
    anchor_blocks = list(anchor_lm.model.model.layers)
    params = reference.AugmentParams(
        model=augment_lm,
        transformer_blocks=list(augment_lm.backbone.layers),
        connections=config.reference_connections,
        mask_kwarg="attention_mask",
    )
    attn_kwargs = dict(
        linear_project_context=True, pre_rmsnorm=False, flash=True,
        heads=config.anchor_heads, dim_head=config.anchor_hidden // config.anchor_heads,
    )
    calm = reference.CALM(anchor_lm, params, attn_kwargs=attn_kwargs, anchor_transformer_blocks=anchor_blocks)
    _drop_recorder_hooks(reference, anchor_blocks)
    return calm


def ours_trainable_param_count(model) -> int:
    return sum(p.numel() for p in model.trainable_parameters())


def reference_trainable_param_count(config: BenchConfig) -> int:
    """What calm_pytorch trains for this config, from its source (CrossAttentionBlock + Attention)."""
    dim, context, heads = config.anchor_hidden, config.augment_hidden, config.anchor_heads
    inner = heads * (dim // heads)
    context_proj = context * dim + dim  # Linear(dim_context, dim), with bias
    qkvo = dim * inner * 3 + inner * dim  # bias-free to_q, to_k, to_v, to_out
    value_head_gate = dim * heads + heads  # gate_value_heads: Linear(dim, heads), with bias
    return len(config.connections) * (context_proj + qkvo + value_head_gate)


# ---------------------------------------------------------------------------------------------
# Workloads: each returns a zero-argument callable doing one timed unit of work.


def make_data(config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(config.seed + 7)
    train = torch.randint(3, config.vocab, (config.train_batch, config.train_len + 1), generator=generator)
    prompt = torch.randint(3, config.vocab, (config.prompt_batch, config.prompt_len), generator=generator)
    return train, prompt


@dataclass(frozen=True)
class TrainBatch:
    """One training batch, as each implementation takes it: ours ``input_ids`` and ``labels`` (-100 = not
    scored), theirs ``seq`` (one token longer: it predicts ``seq[:, 1:]``), the augment's ``prompt`` and
    ``mask`` (None = every label scored; else False where a label of ``seq[:, 1:]`` is not scored)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    seq: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def prompt(self) -> torch.Tensor:
        return self.seq[:, :-1]


def labelled_batch(data: torch.Tensor) -> TrainBatch:
    """Every position scored: ours T-1 targets per row, theirs T."""
    input_ids = data[:, :-1]
    return TrainBatch(input_ids, input_ids, data)


def composition_batch(config: BenchConfig, data: torch.Tensor) -> TrainBatch:
    """Rows of a prompt then a completion: each implementation scores ``completion_targets`` per row (ours
    ``data[:, P:T]``, theirs ``data[:, P+1:T+1]``, P the prompt's tokens) and reads the same T tokens."""
    prompt_tokens = config.prompt_tokens
    input_ids = data[:, :-1]
    labels = input_ids.clone()
    labels[:, :prompt_tokens] = -100
    mask = torch.ones_like(data, dtype=torch.bool)
    mask[:, 1:prompt_tokens + 1] = False
    return TrainBatch(input_ids, labels, data, mask)


def ours_train_step(model, batch: TrainBatch, lr: float) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    attention_mask = torch.ones_like(batch.input_ids)

    def step() -> float:
        model.train()
        loss = model(batch.input_ids, attention_mask=attention_mask, labels=batch.labels, logits_for="labels").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def reference_train_step(calm, batch: TrainBatch, lr: float) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(calm.parameters(), lr=lr)

    def step() -> float:
        loss = calm(batch.seq, prompt=batch.prompt, mask=batch.mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def ours_hf_model(model):
    """The composition behind transformers' interface, as users generate with it; no EOS, so every call
    generates its full length."""
    from calm_dist import CALMForCausalLM

    wrapped = CALMForCausalLM.from_composed(model).eval()
    wrapped.generation_config.eos_token_id = None
    return wrapped


def ours_generate(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], torch.Tensor]:
    mask = torch.ones_like(prompt)

    def generate() -> torch.Tensor:
        out = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens), out.shape
        return out

    return generate


def keep_top_logit(logits: torch.Tensor) -> torch.Tensor:
    """A calm_pytorch ``filter_fn`` that makes its sampling greedy."""
    return logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True), float("-inf"))


def reference_generate(calm, prompt: torch.Tensor, new_tokens: int) -> Callable[[], object]:
    anchor_lm = calm.anchor_llm
    total_len = prompt.shape[1] + new_tokens

    def generate():
        anchor_lm.calls = 0
        out = calm.generate(prompt, seq_len=total_len, filter_fn=keep_top_logit, filter_kwargs={})
        assert anchor_lm.calls == new_tokens, f"calm_pytorch ran {anchor_lm.calls} anchor forwards"
        return out

    return generate


def silence_reference_progress_bar(reference) -> None:
    sampling = importlib.import_module(f"{reference.__name__}.sampling_utils")
    sampling.tqdm = partial(sampling.tqdm, disable=True)


# ---------------------------------------------------------------------------------------------
# Timing


def time_interleaved(ours: Callable, theirs: Callable, warmup: int, repeats: int, label: str):
    """Median seconds of each, after warm-up; repetitions alternate AB, BA, AB, ... ."""
    for _ in range(warmup):
        ours()
        theirs()
    times = {"ours": [], "theirs": []}
    runners = [("ours", ours), ("theirs", theirs)]
    for index in range(repeats):
        for name, run in runners if index % 2 == 0 else runners[::-1]:
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
        log(f"{label} {index + 1}/{repeats}: ours {times['ours'][-1]:.4f}s theirs {times['theirs'][-1]:.4f}s")
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


def figure_line(figure: str, value: float, goal: float, better: str, **extra) -> str:
    if not (math.isfinite(value) and value > 0):
        raise RuntimeError(f"{figure}: measured value {value!r} is not a finite positive number")
    return json.dumps({"figure": figure, "value": round(value, 4), "goal": goal, "better": better, **extra})


def train_figure(config, ours_model, calm, batch: TrainBatch, repeats: Repeats, threads: int, suffix: str = "",
                 **extra) -> str:
    ours_s, theirs_s = time_interleaved(
        ours_train_step(ours_model, batch, config.lr), reference_train_step(calm, batch, config.lr),
        repeats.train_warmup, repeats.train, f"train step{suffix.replace('_', ' ')}",
    )
    return figure_line(
        f"train_step_time_ratio_vs_calm_pytorch{suffix}", ours_s / theirs_s, 0.8, "lower",
        ours_s=round(ours_s, 5), theirs_s=round(theirs_s, 5), repeats=repeats.train, threads=threads,
        ours_trainable_params=ours_trainable_param_count(ours_model),
        theirs_trainable_params=sum(p.numel() for p in calm.parameters()), **extra,
    )


def composition_train_figure(config: BenchConfig, reference, repeats: Repeats, threads: int) -> str:
    """The training-step ratio on composition batches, with the pair built at ``composition_vocab``."""
    pair_config = replace(config, vocab=config.composition_vocab)
    anchor, augment = base_models(pair_config)
    data, _ = make_data(pair_config)
    return train_figure(
        pair_config, build_ours(pair_config, anchor, augment), build_reference(pair_config, anchor, augment, reference),
        composition_batch(pair_config, data), repeats, threads, suffix="_composition_batch",
        vocab=pair_config.vocab, prompt_fraction=pair_config.prompt_fraction,
        targets_per_row=pair_config.completion_targets,
    )


def generation_figure(config, ours_model, calm, prompt, repeats: Repeats, threads: int, suffix: str = "") -> str:
    ours_s, theirs_s = time_interleaved(
        ours_generate(ours_model, prompt, config.new_tokens), reference_generate(calm, prompt, config.new_tokens),
        repeats.gen_warmup, repeats.gen, f"generate batch {prompt.shape[0]}",
    )
    tokens = prompt.shape[0] * config.new_tokens
    return figure_line(
        f"generation_tokens_per_s_ratio_vs_calm_pytorch{suffix}", (tokens / ours_s) / (tokens / theirs_s), 5, "higher",
        batch=prompt.shape[0], new_tokens=config.new_tokens, ours_s=round(ours_s, 4), theirs_s=round(theirs_s, 4),
        repeats=repeats.gen, threads=threads, ours_tokens_per_s=round(tokens / ours_s, 1),
        theirs_tokens_per_s=round(tokens / theirs_s, 1),
    )


def flatness_figure(config, ours_model, prompt, repeats: Repeats, threads: int) -> str:
    """calm_dist's time per generated token at ``long_new_tokens`` over that at ``new_tokens``: runs of the two
    lengths alternate, and each is timed in CPU time of this process (with one thread, the work itself,
    whatever else the machine runs), medians taken."""
    short, long = config.new_tokens, config.long_new_tokens
    runs = {length: ours_generate(ours_model, prompt, length) for length in (short, long)}
    runs[short]()  # warm-up
    times: dict[int, list[float]] = {short: [], long: []}
    for index in range(repeats.long):
        for length in (short, long) if index % 2 == 0 else (long, short):
            start = time.process_time()
            runs[length]()
            times[length].append((time.process_time() - start) / length)
        log(f"time per token {index + 1}/{repeats.long}: {short} new tokens {times[short][-1] * 1e3:.2f} ms, "
            f"{long} new tokens {times[long][-1] * 1e3:.2f} ms")
    per_token_s = {length: statistics.median(values) for length, values in times.items()}
    return figure_line(
        f"generation_time_per_token_ratio_{long}_vs_{short}_new_tokens", per_token_s[long] / per_token_s[short], 1.3,
        "lower", batch=prompt.shape[0], cpu_ms_per_token_short=round(per_token_s[short] * 1e3, 3),
        cpu_ms_per_token_long=round(per_token_s[long] * 1e3, 3), repeats=repeats.long, threads=threads,
    )


# Where generation time goes: (label, file suffix, function) whose cumulative time is that part.
PROFILE_PARTS = {
    "generate": ("generation/utils.py", "generate"),
    "forward": ("calm_dist/model/hf.py", "forward"),
    "step": ("calm_dist/model/composed.py", "step"),
    "augment": ("calm_dist/model/augment.py", "run_augment"),
    "bridges": ("calm_dist/model/bridge.py", "forward"),
    "bridge_cache": ("calm_dist/model/cache.py", "extend"),
    "kv_cache": ("calm_dist/model/cache.py", "update"),
    "anchor_masks": ("masking_utils.py", "create_causal_mask"),
    "cross_masks": ("calm_dist/model/composed.py", "_cross_masks"),
}


def profile_generation(config, ours_model, prompt) -> dict[str, float]:
    """cProfile one generate call; print to stderr, and return, the seconds each part of it took."""
    import cProfile
    import pstats

    run = ours_generate(ours_model, prompt, config.new_tokens)
    run()
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler).stats
    seconds = {part: sum(entry[3] for (file, _, name), entry in stats.items()
                         if file.endswith(suffix) and name == function)
               for part, (suffix, function) in PROFILE_PARTS.items()}
    rows = [
        ("one generate call", seconds["generate"]),
        ("  generation loop outside the model (logits processors, stopping, inputs)",
         seconds["generate"] - seconds["forward"]),
        ("  augmenting model up to its deepest tapped layer", seconds["augment"]),
        ("  anchor layers, LM head and mask (anchor alone)",
         seconds["step"] - seconds["augment"] - seconds["bridges"] - seconds["cross_masks"]),
        ("    of which: anchor attention masks (transformers)", seconds["anchor_masks"]),
        ("    of which: growing both models' KV caches", seconds["kv_cache"]),
        ("  bridges (projection, cross-attention, output)", seconds["bridges"]),
        ("    of which: growing their memories of augment states", seconds["bridge_cache"]),
        ("  cross-attention masks and positions", seconds["cross_masks"]),
    ]
    log(f"profile of one generate call, batch {prompt.shape[0]}, {config.new_tokens} new tokens (cProfile inflates "
        "Python-heavy parts):")
    for label, value in rows:
        log(f"  {label:<76} {value:7.3f} s {100 * value / seconds['generate']:5.1f}%")
    return seconds


def log_floor(config, ours_model, anchor, augment, prompt, repeats: int = 3) -> None:
    """The floor of a cached composed step: the anchor's and the augmenting model's own transformers
    ``generate`` (each with its DynamicCache, its LM head, its loop), CPU time per token, alternating."""
    bases = {}
    for name, model in (("anchor", anchor), ("augment", augment)):
        bases[name] = copy.deepcopy(model).eval()
        bases[name].generation_config.eos_token_id = None
    options = dict(input_ids=prompt, max_new_tokens=config.new_tokens, do_sample=False)
    runs = {"calm_dist": ours_generate(ours_model, prompt, config.new_tokens),
            **{name: partial(model.generate, **options) for name, model in bases.items()}}
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            times[name].append((time.process_time() - start) / config.new_tokens)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    log(f"CPU ms per token step: calm_dist {ms['calm_dist']:.2f}, anchor alone {ms['anchor']:.2f}, augmenting model "
        f"alone {ms['augment']:.2f}; calm_dist / (anchor + augmenting model) = "
        f"{ms['calm_dist'] / (ms['anchor'] + ms['augment']):.2f}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (a smoke test, noisy)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--profile", action="store_true", help="print where calm_dist's generation time goes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    reference = import_reference()
    if reference is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    silence_reference_progress_bar(reference)
    config, repeats = BenchConfig(), QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    anchor, augment = base_models(config)
    ours_model = build_ours(config, anchor, augment)
    calm = build_reference(config, anchor, augment, reference)
    log(f"connections: ours {config.connections} (0-based) = calm_pytorch {config.reference_connections} (1-based)")
    data, prompt = make_data(config)
    start = time.perf_counter()
    print(train_figure(config, ours_model, calm, labelled_batch(data), repeats, args.threads), flush=True)
    print(composition_train_figure(config, reference, repeats, args.threads), flush=True)
    generator = ours_hf_model(ours_model)
    print(generation_figure(config, generator, calm, prompt, repeats, args.threads), flush=True)
    print(generation_figure(config, generator, calm, prompt[:1], repeats, args.threads, suffix="_batch1"), flush=True)
    print(flatness_figure(config, generator, prompt, repeats, args.threads), flush=True)
    if args.profile:
        profile_generation(config, generator, prompt)
        log_floor(config, generator, anchor, augment, prompt)
    log(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
