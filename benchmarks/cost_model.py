"""A cost model of one training step of a composition: bytes gathered by ZeRO-3, bytes on the activation
wire, memory per GPU, and the micro-batch at which compute hides the gathers.

Run: ``python -m benchmarks.cost_model`` prints the table of docs/scaling.md (a 70B anchor over 2 x 8 GPUs
+ a 7B augmenting model in 4 stages, bf16). ``bench_gather_bytes`` checks the gathered-bytes formula
against the bytes each anchor rank really receives.

What one anchor rank does per step (see docs/scaling.md for why):
* forward: ZeRO-3 gathers every partitioned parameter of the composed model once (anchor and bridges);
* backward: it gathers again the parameters of every module backward runs through: the bridges, the
  anchor layers *above* the first bridge, the final norm and the LM head (the layers below the first
  bridge see no gradient, the embedding neither), except the LM head (or its last piece) when it fits in
  ``max_live_parameters``: it is still gathered from the end of forward (``gathered_elements_per_step``);
* gradients of the bridges only are reduce-scattered (the anchor is frozen).
An all-gather of S bytes brings (N-1)/N x S to each of the N ranks; the rest is its own partition.
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, replace

GB = 1e9


@dataclass(frozen=True)
class DecoderSize:
    """A Llama-style decoder: parameter counts by part."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    def layer_params(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate \
            + 2 * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params() + self.hidden


def bridge_params(augment_hidden: int, anchor_hidden: int) -> int:
    """``CrossAttentionBridge``: f_proj (D_A -> D_B, with bias) and q, k, v, o (D_B x D_B, no bias)."""
    return augment_hidden * anchor_hidden + anchor_hidden + 4 * anchor_hidden * anchor_hidden


@dataclass(frozen=True)
class Composition:
    anchor: DecoderSize
    augment: DecoderSize
    connections: tuple[tuple[int, int], ...]  # (augment_layer, anchor_layer), 0-based

    @property
    def bridges(self) -> int:
        return len(self.connections)

    def bridge_params(self) -> int:
        return self.bridges * bridge_params(self.augment.hidden, self.anchor.hidden)

    def first_bridge_layer(self) -> int:
        return min(anchor for _, anchor in self.connections)

    def backward_anchor_params(self) -> int:
        """Anchor parameters of the modules backward runs through."""
        above = self.anchor.layers - 1 - self.first_bridge_layer()
        head = self.anchor.head_params() if not self.anchor.tied else self.anchor.embedding_params()
        return above * self.anchor.layer_params() + self.anchor.hidden + head

    def last_forward_params(self, head_piece_rows: int | None = None) -> int:
        """Elements of the last module forward runs: the LM head, or its last piece (``deepspeed.vocab_piece_rows``)."""
        rows = self.anchor.vocab if not head_piece_rows else self.anchor.vocab - (
            math.ceil(self.anchor.vocab / head_piece_rows) - 1) * head_piece_rows
        return rows * self.anchor.hidden

    def gathered_elements_per_step(self, max_live_parameters: int | None = None,
                                   head_piece_rows: int | None = None) -> dict[str, int]:
        """Elements all-gathered per step (each rank ends up with all of them), by phase.

        Backward begins with the module forward ended with. When that module was fetched, DeepSpeed's
        prefetcher scanned the trace ahead while ``max_live_parameters`` (default: the auto 3 decoder layers of
        accelerators) left room, found that next use already gathered and marked it, so the module is not
        released in between and backward does not gather it again."""
        live = max_live_parameters or 3 * self.anchor.layer_params()
        last = self.last_forward_params(head_piece_rows)
        kept = last if last < live else 0
        return {"forward": self.anchor.params() + self.bridge_params(),
                "backward": self.backward_anchor_params() + self.bridge_params() - kept}

    def tapped_layers(self) -> int:
        return len({augment for augment, _ in self.connections})


def even_connections(anchor_layers: int, augment_layers: int, every_n: int = 4) -> tuple[tuple[int, int], ...]:
    """The paper's choice (as ``composition.every_n``): every n-th augment layer, as many evenly spaced anchor
    layers, the i-th to the i-th (the last layer of each block of n / of anchor_layers / count)."""
    taps = [every_n * (i + 1) - 1 for i in range(augment_layers // every_n)]
    count = len(taps)
    return tuple((tap, (i + 1) * anchor_layers // count - 1) for i, tap in enumerate(taps))


def received_bytes(gathered_elements: int, ranks: int, bytes_per_element: float) -> float:
    """What one rank receives from an all-gather of ``gathered_elements`` over ``ranks`` ranks."""
    return gathered_elements * bytes_per_element * (ranks - 1) / ranks


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    inter_node_gbit: float = 400.0  # per GPU (one NIC per GPU)
    intra_node_gbyte: float = 450.0  # NVLink, per GPU, one direction
    flops: float = 989e12  # dense bf16 peak per GPU (H100 SXM)
    mfu: float = 0.4  # fraction of peak a step reaches

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Step:
    """The step's shape: tokens per anchor GPU (micro-batch rows x sequence length)."""

    rows: int
    seq_len: int
    labelled_fraction: float = 0.5  # share of positions whose label counts (a prompt/completion set)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len


@dataclass(frozen=True)
class ZeroPlusPlus:
    hpz_partition_size: int = 1  # zero_hpz_partition_size: the backward gathers stay inside groups of this size
    quantized_weights: bool = False  # zero_quantized_weights: int8 forward gathers (+ one fp32 scale per 2048)


def gather_bytes(model: Composition, cluster: Cluster, zpp: ZeroPlusPlus, element_bytes: int = 2) -> dict:
    """Bytes one anchor GPU receives per step, split by link. Without hpZ every gather spans all GPUs
    (15/16 of it arrives over the inter-node link share: 8 of the 15 peers are remote, the rest over NVLink;
    a ring all-gather moves (N-1)/N of the data through each GPU's slowest link, the NIC)."""
    n = cluster.gpus
    phases = model.gathered_elements_per_step()
    forward_bytes = element_bytes if not zpp.quantized_weights else 1 + 4 / 2048
    forward = received_bytes(phases["forward"], n, forward_bytes)
    if zpp.hpz_partition_size > 1:
        backward = received_bytes(phases["backward"], zpp.hpz_partition_size, element_bytes)
        backward_link = "intra" if zpp.hpz_partition_size <= cluster.gpus_per_node else "inter"
    else:
        backward = received_bytes(phases["backward"], n, element_bytes)
        backward_link = "inter" if cluster.nodes > 1 else "intra"
    inter = forward + (backward if backward_link == "inter" else 0.0)
    intra = backward if backward_link == "intra" else 0.0
    return {"forward": forward, "backward": backward, "inter_node": inter, "intra_node": intra,
            "total": forward + backward}


def gather_seconds(traffic: dict, cluster: Cluster) -> float:
    return traffic["inter_node"] / (cluster.inter_node_gbit / 8 * GB) + traffic["intra_node"] / (
        cluster.intra_node_gbyte * GB)


def step_flops_per_token(model: Composition) -> float:
    """Frozen anchor: forward 2 x params, backward only the input gradient (2 x params above the first
    bridge, no weight gradients); the bridges train (6 x their params, attention over the augment states
    ignored). The LM head runs on labelled positions only (counted in full here: an upper bound)."""
    forward = 2 * model.anchor.params() + 2 * model.bridge_params()
    backward = 2 * model.backward_anchor_params() + 4 * model.bridge_params()
    return forward + backward


def hiding_tokens(model: Composition, cluster: Cluster, zpp: ZeroPlusPlus) -> float:
    """Tokens per anchor GPU and step at which compute time equals gather time (above it, prefetching can
    hide the gathers behind compute)."""
    seconds = gather_seconds(gather_bytes(model, cluster, zpp), cluster)
    return seconds * cluster.flops * cluster.mfu / step_flops_per_token(model)


def activation_wire_bytes(model: Composition, step: Step, wire_bytes: int = 2, stages: int = 4) -> dict:
    """Per anchor GPU and step: the tapped augment layers' outputs (each distinct layer once) into the anchor
    rank, and the hidden states between augment stages (stages - 1 hops) for that rank's micro-batch."""
    taps = model.tapped_layers() * step.tokens * model.augment.hidden * wire_bytes
    hops = (stages - 1) * step.tokens * model.augment.hidden * wire_bytes
    return {"taps_into_anchor_rank": taps, "between_augment_stages": hops}


def saved_activation_elements(model: Composition, step: Step, checkpointing: bool = False) -> dict[str, float]:
    """Elements autograd keeps for backward per token of the micro-batch, by part (``bench_activation_memory``
    checks it against what autograd really keeps). With frozen linear layers nothing is kept for their
    weights' gradients, so an anchor layer above the first bridge keeps its two norm inputs, the attention's
    q, k, v and output, the MLP's gate, up and SiLU(gate), a norm scale each and a log-sum-exp per head;
    all layers share the rotary cos and sin; the final norm keeps its input; each bridge its input, the
    augment state, the projected memory, q, k, v, attention output and the output projection's input (its
    weights train); each augmenting model read by bridges one row of the cross-attention mask (one element
    per key position); the loss the log-probabilities of labelled positions (fp32). With activation
    checkpointing (``CALMModel.checkpoint_activations``) each anchor layer above the first bridge keeps only
    its input, and its bridges nothing; one such layer with its bridges is recomputed at a time in backward.
    Only the bridges after the first bridge's layer keep their activations then (none when it is -1)."""
    anchor, hidden = model.anchor, model.anchor.hidden
    kv = hidden // anchor.heads * anchor.kv_heads
    first = model.first_bridge_layer()
    above = anchor.layers - 1 - first
    layer = 4 * hidden + 2 * kv + 3 * anchor.intermediate + 2 + anchor.heads
    bridge = 7 * hidden + model.augment.hidden + anchor.heads
    # with checkpointing, bridges into the embeddings (-1, run with layer 0) or above the first bridge's layer
    # are recomputed with their layer
    recomputed = Counter(max(anchor_layer, 0) for _, anchor_layer in model.connections
                         if anchor_layer > first or anchor_layer < 0)
    if checkpointing:
        layers = above * hidden + layer + max(recomputed.values(), default=0) * bridge
        bridges = (model.bridges - sum(recomputed.values())) * bridge
    else:
        layers, bridges = above * layer, model.bridges * bridge
    return {"anchor_layers": layers, "rotary": 2 * hidden // anchor.heads, "final_norm": hidden + 1,
            "bridges": bridges,
            "cross_masks": step.seq_len,  # one augmenting model here
            "labelled_log_probs": step.labelled_fraction * anchor.vocab}


def memory_per_gpu(model: Composition, cluster: Cluster, step: Step, zpp: ZeroPlusPlus,
                   max_live_parameters: int | None = None, checkpointing: bool = True) -> dict:
    """Bytes per anchor GPU. Anchor bf16 partition 1/N; bridges: bf16 weights + bf16 gradients + fp32 master
    + Adam's two fp32 moments (16 B/param) over N; gathered parameters live at once: bounded by
    max_live_parameters (bf16; auto, as ``zero_anchor.gather_limits``: 3 decoder layers); hpZ keeps a secondary
    partition of 1/hpz; activations: ``saved_activation_elements`` in bf16; logits and their gradient in fp32
    for labelled positions only."""
    n = cluster.gpus
    anchor = model.anchor
    partition = anchor.params() * 2 / n
    secondary = anchor.params() * 2 / zpp.hpz_partition_size if zpp.hpz_partition_size > 1 else 0.0
    bridges = model.bridge_params() * 16 / n
    live = (max_live_parameters or 3 * anchor.layer_params()) * 2
    saved = saved_activation_elements(model, step, checkpointing)
    activations = step.tokens * 2 * sum(value for part, value in saved.items() if part != "labelled_log_probs")
    logits = step.tokens * step.labelled_fraction * anchor.vocab * 4 * 2  # logits + their gradient, fp32
    total = partition + secondary + bridges + live + activations + logits
    return {"anchor_partition": partition, "hpz_secondary_partition": secondary, "bridges_and_adam": bridges,
            "live_gathered_parameters": live, "activations": activations, "labelled_logits": logits,
            "total": total}


# ---------------------------------------------------------------------------------------------
# The case of docs/scaling.md

LLAMA_70B = DecoderSize(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256)
LLAMA_7B = DecoderSize(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
CASE = Composition(LLAMA_70B, LLAMA_7B, even_connections(LLAMA_70B.layers, LLAMA_7B.layers))
CLUSTER = Cluster(nodes=2, gpus_per_node=8)
STEP = Step(rows=4, seq_len=2048)


def table(model: Composition = CASE, cluster: Cluster = CLUSTER, step: Step = STEP) -> str:
    settings = {"ZeRO-3": ZeroPlusPlus(), "hpZ 8": ZeroPlusPlus(hpz_partition_size=8),
                "qwZ": ZeroPlusPlus(quantized_weights=True), "hpZ 8 + qwZ": ZeroPlusPlus(8, True)}
    lines = [f"anchor {model.anchor.params() / 1e9:.1f}B, augment {model.augment.params() / 1e9:.2f}B, "
             f"{model.bridges} bridges ({model.bridge_params() / 1e9:.2f}B trainable), first bridge at anchor layer "
             f"{model.first_bridge_layer()}, {cluster.gpus} anchor GPUs ({cluster.nodes} x {cluster.gpus_per_node}), "
             f"{step.rows} x {step.seq_len} tokens per GPU",
             f"gathered elements per step: {', '.join(f'{k} {v / 1e9:.1f}B' for k, v in model.gathered_elements_per_step().items())}",
             f"compute per token: {step_flops_per_token(model) / 1e9:.0f} GFLOP",
             "",
             "| setting | GB in per GPU per step (inter-node / NVLink) | gather s | compute s at "
             f"{step.tokens} tok | tokens/GPU that hide the gathers | memory per GPU GB |",
             "|---|---|---|---|---|---|"]
    compute = step.tokens * step_flops_per_token(model) / (cluster.flops * cluster.mfu)
    for name, zpp in settings.items():
        traffic = gather_bytes(model, cluster, zpp)
        memory = memory_per_gpu(model, cluster, step, zpp)
        lines.append(f"| {name} | {traffic['total'] / GB:.0f} ({traffic['inter_node'] / GB:.0f} / "
                     f"{traffic['intra_node'] / GB:.0f}) | {gather_seconds(traffic, cluster):.2f} | {compute:.2f} | "
                     f"{hiding_tokens(model, cluster, zpp):,.0f} | {memory['total'] / GB:.1f} |")
    memory = memory_per_gpu(model, cluster, step, ZeroPlusPlus())
    lines += ["", "memory per GPU (ZeRO-3): " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in memory.items())]
    wire = activation_wire_bytes(model, step)
    lines.append("activation wire per anchor GPU and step: " + ", ".join(
        f"{k} {v / GB:.2f} GB" for k, v in wire.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=STEP.rows)
    parser.add_argument("--seq-len", type=int, default=STEP.seq_len)
    args = parser.parse_args(argv)
    print(table(step=replace(STEP, rows=args.rows, seq_len=args.seq_len)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
