"""DeepSpeed's accelerator: CUDA wherever a CUDA device exists, the CPU accelerator only where none does."""
from __future__ import annotations

import os


def choose_deepspeed_accelerator() -> str:
    """Sets ``DS_ACCELERATOR=cpu`` on a machine without CUDA (DeepSpeed would otherwise warn and guess) and
    leaves a GPU machine, or an explicit setting, alone. Call before anything imports deepspeed."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")
