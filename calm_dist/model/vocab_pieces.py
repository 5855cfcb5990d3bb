"""An LM's vocabulary matrices (input embedding, LM head) split by rows into pieces, computing the same.

Under ZeRO-3 a parameter is gathered whole when its module runs. The embedding and the LM head are
usually an anchor's largest tensors (vocabulary x hidden: 9% of a 0.55B Llama each, 1B parameters in
Llama 3 70B's head), so each gather of them tops every anchor rank's memory by far more than a decoder
layer does. Split into pieces no larger than a layer's largest weight, each piece is gathered, used and
released in turn. Plain PyTorch: the distributed loader decides where pieces are built
(``calm_dist.distributed.zero_anchor.load_partitioned``).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PieceSource:
    """Where a parameter's values live in the unsplit model's state dict: ``rows`` rows from ``start_row`` of
    the tensor named ``name``, which has ``total_rows`` (None: the whole tensor)."""

    name: str
    start_row: int = 0
    rows: int | None = None
    total_rows: int | None = None


def piece_bounds(total_rows: int, rows_per_piece: int) -> list[tuple[int, int]]:
    """``[start, end)`` row ranges of at most ``rows_per_piece`` rows covering ``total_rows``."""
    if rows_per_piece <= 0:
        raise ValueError(f"rows per piece must be > 0, got {rows_per_piece}")
    return [(start, min(start + rows_per_piece, total_rows)) for start in range(0, total_rows, rows_per_piece)]


class PiecewiseEmbedding(nn.Module):
    """``nn.Embedding`` whose table is ``pieces`` (consecutive row ranges): each id is looked up in its piece."""

    def __init__(self, pieces: list[nn.Embedding]):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        starts = [0]
        for piece in pieces[:-1]:
            starts.append(starts[-1] + piece.num_embeddings)
        self.starts = tuple(starts)
        self.num_embeddings = starts[-1] + pieces[-1].num_embeddings
        self.embedding_dim = pieces[0].embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = None
        for start, piece in zip(self.starts, self.pieces):
            local = input_ids - start
            inside = ((local >= 0) & (local < piece.num_embeddings)).unsqueeze(-1)
            rows = piece(local.clamp(0, piece.num_embeddings - 1))
            out = torch.where(inside, rows, 0.0 if out is None else out)
        return out


class PiecewiseLinear(nn.Module):
    """``nn.Linear`` whose output features are ``pieces`` (consecutive ranges), concatenated."""

    def __init__(self, pieces: list[nn.Linear]):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.in_features = pieces[0].in_features
        self.out_features = sum(piece.out_features for piece in pieces)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not (hidden.requires_grad and hidden.dtype in (torch.bfloat16, torch.float16)):
            return torch.cat([piece(hidden) for piece in self.pieces], dim=-1)
        # Each piece reads its own cast of an fp32 copy, so that the pieces' input gradients are summed in
        # fp32, as one matmul over the whole head accumulates them, not rounded to bf16 at every sum.
        wide = hidden.float()
        return torch.cat([piece(wide.to(hidden.dtype)) for piece in self.pieces], dim=-1)


def _splittable_embedding(module) -> bool:
    return type(module) is nn.Embedding and module.max_norm is None  # subclasses may scale or compute otherwise


def _splittable_linear(module) -> bool:
    return type(module) is nn.Linear


def split_vocab_matrices(model: nn.Module, rows_per_piece: int) -> dict[str, PieceSource]:
    """Replaces ``model``'s input embedding and LM head (``get_input_embeddings`` / ``get_output_embeddings``)
    by piecewise modules of at most ``rows_per_piece`` rows each, in place. A head tied to the embedding
    shares its pieces' weights. Only exact ``nn.Embedding`` / ``nn.Linear`` modules are split (a subclass may
    compute otherwise), and only those longer than one piece.

    The new pieces start uninitialised (the caller fills them, e.g. from the checkpoint); the old matrices
    are freed before they are allocated. Returns, for each new parameter name, where its rows live in the
    unsplit model's state dict.
    """
    names = {module: name for name, module in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and embedding is not None and getattr(head, "weight", None) is getattr(embedding, "weight", 0)
    split_embedding = (embedding is not None and _splittable_embedding(embedding)
                       and embedding.num_embeddings > rows_per_piece)
    split_head = (head is not None and _splittable_linear(head) and head.out_features > rows_per_piece
                  and (split_embedding or not tied))  # a tied head is split with its embedding or not at all
    embedding_spec = (names[embedding], embedding.num_embeddings, embedding.embedding_dim, embedding.weight.dtype,
                      embedding.weight.device) if split_embedding else None
    head_spec = (names[head], head.in_features, head.out_features, head.bias is not None, head.weight.dtype,
                 head.weight.device) if split_head else None
    if split_embedding:
        model.set_input_embeddings(nn.Identity())
    if split_head:
        model.set_output_embeddings(nn.Identity())
    del embedding, head, names
    gc.collect()  # ZeRO-3's parameters sit in reference cycles
    sources: dict[str, PieceSource] = {}
    embedding_pieces = None
    if embedding_spec:
        name, rows, width, dtype, device = embedding_spec
        bounds = piece_bounds(rows, rows_per_piece)
        embedding_pieces = [nn.Embedding(end - start, width, dtype=dtype, device=device) for start, end in bounds]
        _record(sources, name, bounds, ("weight",))
        model.set_input_embeddings(PiecewiseEmbedding(embedding_pieces))
    if head_spec:
        name, width, rows, bias, dtype, device = head_spec
        bounds = piece_bounds(rows, rows_per_piece)
        head_pieces = [nn.Linear(width, end - start, bias=bias, dtype=dtype, device=device) for start, end in bounds]
        if tied:
            for linear, table in zip(head_pieces, embedding_pieces, strict=True):
                linear.weight = table.weight
        attributes = [] if tied else ["weight"]  # a tied weight is the embedding's, recorded with it
        if bias:
            attributes.append("bias")
        _record(sources, name, bounds, attributes)
        model.set_output_embeddings(PiecewiseLinear(head_pieces))
    return sources


def _record(sources: dict[str, PieceSource], module_name: str, bounds: list[tuple[int, int]], attributes) -> None:
    """Sizes come from the row bounds: a parameter that ZeRO-3 partitioned at construction has no data."""
    total_rows = bounds[-1][1]
    for index, (start, end) in enumerate(bounds):
        for attribute in attributes:
            sources[f"{module_name}.pieces.{index}.{attribute}"] = PieceSource(
                f"{module_name}.{attribute}", start, end - start, total_rows)
