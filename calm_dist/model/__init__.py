"""Single-device CALM over any Hugging Face causal LM. Imports nothing distributed."""
from calm_dist.model.alignment import AugmentInput, aligned_allowed, token_end_offsets
from calm_dist.model.bridge import CrossAttentionBridge
from calm_dist.model.cache import CALMCache
from calm_dist.model.composed import CALMModel, compose
from calm_dist.model.connections import every_n_connections, resolve_connections, resolve_per_model_connections
from calm_dist.model.generation import GeneratedText, generate_text
from calm_dist.model.hf import CALMConfig, CALMForCausalLM
from calm_dist.model.layers import find_decoder_layers, model_shape
from calm_dist.model.loss import causal_lm_loss, per_example_loss

__all__ = [
    "AugmentInput",
    "CALMCache",
    "CALMConfig",
    "CALMForCausalLM",
    "CALMModel",
    "CrossAttentionBridge",
    "GeneratedText",
    "aligned_allowed",
    "causal_lm_loss",
    "compose",
    "every_n_connections",
    "find_decoder_layers",
    "generate_text",
    "model_shape",
    "per_example_loss",
    "resolve_connections",
    "resolve_per_model_connections",
    "token_end_offsets",
]
