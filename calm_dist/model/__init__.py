"""Single-device CALM over any Hugging Face causal LM. Imports nothing distributed."""
from calm_dist.model.bridge import CrossAttentionBridge
from calm_dist.model.composed import CALMModel, compose
from calm_dist.model.connections import every_n_connections, resolve_connections
from calm_dist.model.layers import find_decoder_layers, model_shape
from calm_dist.model.loss import causal_lm_loss, per_example_loss

__all__ = [
    "CALMModel",
    "CrossAttentionBridge",
    "causal_lm_loss",
    "compose",
    "every_n_connections",
    "find_decoder_layers",
    "model_shape",
    "per_example_loss",
    "resolve_connections",
]
