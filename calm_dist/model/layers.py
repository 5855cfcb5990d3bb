"""Finding the decoder-layer stack and the shape facts of any HF causal LM."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Where the decoder stack lives, relative to the model's backbone (``model.base_model``).
_STACK_PATHS = ("layers", "h", "decoder.layers", "blocks", "layer")


@dataclass(frozen=True)
class ModelShape:
    """What composition needs to know about one side."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int


def _resolve(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no `.config`: compose() takes Hugging Face "
            "`transformers` causal LMs (e.g. LlamaForCausalLM, GPT2LMHeadModel)."
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of an HF causal LM, or a ValueError naming the class."""
    config = _text_config(model)
    backbone = getattr(model, "base_model", model)
    expected = getattr(config, "num_hidden_layers", None)
    for path in _STACK_PATHS:
        stack = _resolve(backbone, path)
        if isinstance(stack, nn.ModuleList) and len(stack) > 0:
            if expected is None or len(stack) == expected:
                return stack
    raise ValueError(
        f"unsupported model class {type(model).__name__}: no decoder-layer stack found under "
        f"its backbone at any of {list(_STACK_PATHS)}. Supported: HF causal LMs with a standard "
        "decoder stack (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, OPT, Phi, Gemma, ...)."
    )


def model_shape(model: nn.Module) -> ModelShape:
    config = _text_config(model)
    layers = find_decoder_layers(model)
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    vocab = getattr(config, "vocab_size", None)
    if hidden is None or heads is None or vocab is None:
        raise ValueError(
            f"unsupported model class {type(model).__name__}: its config lacks hidden_size, "
            "num_attention_heads or vocab_size."
        )
    return ModelShape(len(layers), int(hidden), int(heads), int(vocab))


def backbone(model: nn.Module) -> nn.Module:
    """The model without its LM head (what produces hidden states)."""
    return getattr(model, "base_model", model)


@dataclass(frozen=True)
class SavedModelFacts:
    """What planning and early checks need of a saved model, read without loading its weights."""

    shape: ModelShape
    layer_sizes: tuple[int, ...]  # parameters of each decoder layer
    parameters: int
    max_positions: int | None  # the longest sequence its position embeddings cover (None: no limit known)
    model_type: str


_POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def saved_model_facts(path) -> SavedModelFacts:
    """Facts of the model saved at ``path`` (``config.json``), from an empty meta-device instance."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = find_decoder_layers(model)
    text = _text_config(model)
    limit = next((getattr(text, key) for key in _POSITION_LIMIT_KEYS if getattr(text, key, None)), None)
    return SavedModelFacts(model_shape(model), tuple(sum(p.numel() for p in layer.parameters()) for layer in layers),
                           sum(p.numel() for p in model.parameters()), limit, str(getattr(config, "model_type", "")))
