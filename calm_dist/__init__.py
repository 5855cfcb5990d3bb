"""calm_dist: CALM (Composition to Augment Language Models) at scale.

The public names load on first use, so that ``import calm_dist.<module>`` (the launcher's first step)
does not import transformers or DeepSpeed before the process has chosen its accelerator.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "CALMConfig": "calm_dist.model.hf",
    "CALMForCausalLM": "calm_dist.model.hf",
    "CALMModel": "calm_dist.model.composed",
    "compose": "calm_dist.model.composed",
    "load_exported": "calm_dist.export",
    "save_composition": "calm_dist.export",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'calm_dist' has no attribute {name!r}")
