"""Library output that would bury a run's own progress and results, turned off once at the source."""
from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Per-file and per-step chatter of the libraries the job drives; their warnings and errors stay."""
    # DeepSpeed's ZeRO-3 calls torch.distributed.all_gather_into_tensor / reduce_scatter_tensor, which torch
    # deprecates with a FutureWarning from its c10d logger on every call: thousands of identical lines per
    # rank in a run, nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" per model
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    for name in ("DeepSpeed", "deepspeed", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.WARNING)
