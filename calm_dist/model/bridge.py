"""The trainable part of CALM: one cross-attention bridge per connection.

For a connection (augment layer i -> anchor layer j):
    H_B^j <- H_B^j + W_o · MHA(q = W_q H_B^j, k = W_k f_proj(H_A^i), v = W_v f_proj(H_A^i))
with f_proj: Linear(D_A -> D_B), the anchor's head count, and W_o zero-initialised so that the
composed model equals the anchor at initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ProjectedKV:
    """Projected keys/values of one bridge, grown by one chunk per forward during generation."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (an augmenting model re-cut its later tokens)."""
        if self.keys is not None and self.keys.shape[2] > length:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


@dataclass
class CrossMask:
    """Which positions of one augmenting model the anchor's queries may read in one forward.

    Shared by every bridge fed by that model; models with their own tokenizer have their own
    sequence length, hence their own mask.
    """

    allowed: torch.Tensor  # [B, 1, Q, S] bool: anchor query q may read augment position s
    query_has_key: torch.Tensor  # [B, 1, Q, 1] bool: rows with at least one allowed key

    @classmethod
    def from_allowed(cls, allowed: torch.Tensor) -> "CrossMask":
        return cls(allowed, allowed.any(dim=-1, keepdim=True))


@dataclass
class BridgeInput:
    """What a bridge reads in one forward: the new augment positions, the mask of their model and,
    when generating, its cache."""

    augment_hidden: torch.Tensor
    mask: CrossMask
    cache: ProjectedKV | None = None


@dataclass
class CompositionContext:
    """Per-forward inputs of every bridge, handed to the anchor's wrapped layers as a keyword."""

    inputs: list[BridgeInput]
    extras: dict = field(default_factory=dict)


class CrossAttentionBridge(nn.Module):
    def __init__(self, augment_dim: int, anchor_dim: int, num_heads: int, relative_scale: bool = False):
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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_memory(self, augment_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.proj(augment_hidden.to(self.proj.weight.dtype))
        return self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))

    def forward(self, hidden: torch.Tensor, bridge_input: BridgeInput):
        keys, values = self.project_memory(bridge_input.augment_hidden)
        if bridge_input.cache is not None:
            keys, values = bridge_input.cache.extend(keys, values)
        queries = self._heads(self.q_proj(hidden.to(self.q_proj.weight.dtype)))
        zero = torch.zeros((), dtype=queries.dtype, device=queries.device)
        blocked = torch.full((), torch.finfo(queries.dtype).min, dtype=queries.dtype, device=queries.device)
        mask = torch.where(bridge_input.mask.allowed, zero, blocked)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        attended = attended * bridge_input.mask.query_has_key.to(attended.dtype)
        batch, _, length, _ = attended.shape
        attended = attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        output = self.o_proj(attended)
        if self.relative_scale:  # residual measured in units of the anchor's own per-token RMS
            output = output * hidden.float().pow(2).mean(-1, keepdim=True).sqrt().detach().to(output.dtype)
        return output.to(hidden.dtype)
