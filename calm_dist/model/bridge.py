"""The trainable part of CALM: one cross-attention bridge per connection.

For a connection (augment layer i -> anchor layer j):
    H_B^j <- H_B^j + W_o · MHA(q = W_q H_B^j, k = W_k f_proj(H_A^i), v = W_v f_proj(H_A^i))
with f_proj: Linear(D_A -> D_B), the anchor's head count, and W_o zero-initialised so that the
composed model equals the anchor at initialisation.

With ``position_buckets`` (not in the paper) each head also adds a learned logit for the distance between
the anchor position and the augment position (one bucket per distance, the last for every longer one),
bucket 0 starting at ``aligned_logit``: a bridge then starts out reading the augment state of the same
token, which its content alone cannot single out where the anchor's state carries nothing of that token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from calm_dist.model.cache import BridgeMemory

ALIGNED_LOGIT = 8.0  # position logits' default start at distance 0: e^8 ≈ 3,000 × any other position


@dataclass
class CrossMask:
    """Which positions of one augmenting model the anchor's queries may read in one forward.

    Shared by every bridge fed by that model; models with their own tokenizer have their own
    sequence length, hence their own mask.
    """

    allowed: torch.Tensor | None  # [B or 1, 1, Q, S] bool: query q may read position s (None: every position)
    query_has_key: torch.Tensor | None  # [B, 1, Q, 1] bool: rows with at least one allowed key (None: all)
    _additive: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_allowed(cls, allowed: torch.Tensor) -> "CrossMask":
        return cls(allowed, allowed.any(dim=-1, keepdim=True))

    @classmethod
    def causal(cls, query_start: int, query_len: int, device) -> "CrossMask":
        """Without padding: query t reads positions <= t, so every query has a key, and a single query at
        the end reads everything."""
        if query_len == 1:
            return cls(None, None)
        keys = torch.arange(query_start + query_len, device=device)
        queries = torch.arange(query_start, query_start + query_len, device=device)
        return cls((keys[None, :] <= queries[:, None])[None, None], None)

    def additive(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The mask as SDPA adds it (0 where allowed, the dtype's minimum elsewhere), made once per forward
        for all the bridges that read this model."""
        if self.allowed is None:
            return None
        key = (dtype, device)
        if key not in self._additive:
            blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
            self._additive[key] = torch.where(self.allowed.to(device), torch.zeros((), dtype=dtype, device=device),
                                              blocked)
        return self._additive[key]


@dataclass
class BridgeInput:
    """What a bridge reads in one forward: the new augment positions, the mask of their model and,
    when generating, its cache."""

    augment_hidden: torch.Tensor
    mask: CrossMask
    cache: BridgeMemory | None = None


@dataclass
class CompositionContext:
    """Per-forward inputs of every bridge, handed to the anchor's wrapped layers as a keyword."""

    inputs: list[BridgeInput]
    extras: dict = field(default_factory=dict)


def _per_head(x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """[B, H, Q, m] times each head's own [H, m, n] map: [B, H, Q, n], as one batched matmul over heads
    (broadcasting the maps over the batch would copy them for every row)."""
    batch, heads, length, _ = x.shape
    by_head = x.transpose(0, 1).reshape(heads, batch * length, -1)
    return torch.bmm(by_head, maps).view(heads, batch, length, -1).transpose(0, 1)


def _added(mask: torch.Tensor | None, logits: torch.Tensor | None) -> torch.Tensor | None:
    if logits is None:
        return mask
    return logits if mask is None else mask + logits


class CrossAttentionBridge(nn.Module):
    def __init__(self, augment_dim: int, anchor_dim: int, num_heads: int, relative_scale: bool = False,
                 position_buckets: int = 0, aligned_logit: float = ALIGNED_LOGIT):
        super().__init__()
        self.relative_scale = relative_scale
        if anchor_dim % num_heads != 0:
            raise ValueError(
                f"anchor hidden size {anchor_dim} is not divisible by its head count {num_heads}"
            )
        self.num_heads = num_heads
        self.head_dim = anchor_dim // num_heads
        self.proj = nn.Linear(augment_dim, anchor_dim)
        self.q_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.k_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.v_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        self.o_proj = nn.Linear(anchor_dim, anchor_dim, bias=False)
        nn.init.zeros_(self.o_proj.weight)
        self.position_bias = None
        if position_buckets:
            bias = torch.zeros(num_heads, position_buckets)
            bias[:, 0] = aligned_logit
            self.position_bias = nn.Parameter(bias)  # [H, buckets]: logit by anchor position - augment position

    def _position_logits(self, query_len: int, key_len: int, like: torch.Tensor) -> torch.Tensor | None:
        """[1, H, Q, S]: each head's logit for the distance from each query (the last Q of S positions) to each
        key; positions after the query are masked anyway and share bucket 0."""
        if self.position_bias is None:
            return None
        queries = torch.arange(key_len - query_len, key_len, device=like.device)
        distance = queries[:, None] - torch.arange(key_len, device=like.device)[None, :]
        buckets = self.position_bias.shape[1]
        return self.position_bias.to(device=like.device, dtype=like.dtype)[:, distance.clamp(0, buckets - 1)][None]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_memory(self, augment_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.proj(self._as_weights(augment_hidden))
        return self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))

    def _as_weights(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values as maps of the raw augment state a: head h scores a_s by q_h · (W_k,h W_p) a_s
        (the bias's W_k,h b_p adds the same to every key of a query, which softmax ignores) and mixes
        c_h = sum_s p_s a_s into W_v,h W_p c_h + W_v,h b_p. Returns ([H, d, D_A], [H, d, D_A], [H, 1, d])."""
        with torch.no_grad(), torch.autocast(self.proj.weight.device.type, enabled=False):
            projection = self.proj.weight.float()
            key_map = self.k_proj.weight.float().view(self.num_heads, self.head_dim, -1) @ projection
            value_weight = self.v_proj.weight.float().view(self.num_heads, self.head_dim, -1)
            value_map = value_weight @ projection
            value_bias = (value_weight @ self.proj.bias.float()).unsqueeze(1)
        dtype = self.proj.weight.dtype
        return key_map.to(dtype), value_map.to(dtype), value_bias.to(dtype)

    def _attend(self, queries: torch.Tensor, bridge_input: BridgeInput) -> torch.Tensor:
        """[B, H, Q, d] queries over the bridge's keys and values: projected from this forward's augment
        states, or (generating) folded onto every augment state its memory holds."""
        mask = bridge_input.mask.additive(queries.dtype, queries.device)
        memory = bridge_input.cache
        if memory is None:
            keys, values = self.project_memory(bridge_input.augment_hidden)
            mask = _added(mask, self._position_logits(queries.shape[2], keys.shape[2], queries))
            return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        states = memory.extend(self._as_weights(bridge_input.augment_hidden).unsqueeze(1))  # [B, 1, S, D_A]
        if memory.folded is None:
            memory.folded = self.folded_weights()
        key_map, value_map, value_bias = memory.folded
        batch, heads, length, _ = queries.shape
        # every head reads the same states: the heads become query rows of one single-head attention
        folded = _per_head(queries, key_map.to(queries.dtype)).reshape(batch, 1, heads * length, -1)
        if mask is not None:
            mask = mask.repeat(1, 1, heads, 1)
        positions = self._position_logits(length, states.shape[2], folded)
        if positions is not None:
            mask = _added(mask, positions.reshape(1, 1, heads * length, -1))
        states = states.to(folded.dtype)
        mixed = F.scaled_dot_product_attention(folded, states, states, attn_mask=mask, scale=self.head_dim ** -0.5)
        mixed = mixed.view(batch, heads, length, -1)
        return _per_head(mixed, value_map.to(mixed.dtype).transpose(1, 2)) + value_bias.to(mixed.dtype)

    def forward(self, hidden: torch.Tensor, bridge_input: BridgeInput):
        local = hidden.to(self.q_proj.weight.device)
        queries = self._heads(self.q_proj(local.to(self.q_proj.weight.dtype)))
        attended = self._attend(queries, bridge_input)
        if bridge_input.mask.query_has_key is not None:  # a query with no key to read gets no residual
            attended = attended * bridge_input.mask.query_has_key.to(device=attended.device, dtype=attended.dtype)
        batch, _, length, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        output = self.o_proj(attended)
        if self.relative_scale:  # residual measured in units of the anchor's own per-token RMS
            output = output * local.float().pow(2).mean(-1, keepdim=True).sqrt().detach().to(output.dtype)
        return output.to(device=hidden.device, dtype=hidden.dtype)
