"""Your data to batches: loading (``datasets``), tokenising with offsets, caching, rank-sharded readers,
and the order in which a run consumes them. Knows no model, task or tokenizer of its own."""

from .formats import ACCEPTED_COLUMNS, RowFormat, detect_format
from .prepare import (
    AugmentTokenizer,
    DataSource,
    DataSpec,
    PreparedData,
    SplitSummary,
    Tokenisation,
    load_prepared,
    load_rows,
    pad_id_of,
    prepare_data,
    tokenizer_fingerprint,
)
from .reader import (
    BatchLayout,
    EvalBatches,
    ShardedReader,
    TokenisedRows,
    anchor_layout,
    augment_layout,
    collate_prompts,
    collate_rows,
    epoch_order,
    pad_batch,
)
from .schedule import EVAL, TRAIN, Unit, evaluates_at, run_units, step_ends_after
from .tokenize import IGNORE_INDEX, Retokenisation, TokenizeSettings, encode_rows

__all__ = [
    "ACCEPTED_COLUMNS", "AugmentTokenizer", "BatchLayout", "Retokenisation", "Tokenisation", "anchor_layout",
    "augment_layout", "DataSource", "DataSpec", "EVAL", "EvalBatches", "IGNORE_INDEX", "PreparedData", "RowFormat",
    "ShardedReader", "SplitSummary", "TRAIN", "TokenisedRows", "TokenizeSettings", "Unit", "collate_prompts",
    "collate_rows", "detect_format", "encode_rows", "epoch_order", "evaluates_at", "load_prepared", "load_rows",
    "pad_batch", "pad_id_of", "prepare_data", "run_units", "step_ends_after", "tokenizer_fingerprint",
]
