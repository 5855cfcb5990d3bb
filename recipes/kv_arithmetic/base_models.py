"""Building, training and caching the two frozen base models (m_A and m_B)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from calm_dist.config import BaseModelConfig, ModelConfig, to_dict
from calm_dist.identity import weights_checksum  # noqa: F401  (re-exported for the job's callers)

_ARCH_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size="hidden_size", num_hidden_layers="num_layers",
                                   num_attention_heads="num_heads", intermediate_size="intermediate_size")),
    "qwen2": ("Qwen2Config", dict(hidden_size="hidden_size", num_hidden_layers="num_layers",
                                   num_attention_heads="num_heads", intermediate_size="intermediate_size")),
    "gpt2": ("GPT2Config", dict(n_embd="hidden_size", n_layer="num_layers", n_head="num_heads",
                                 n_inner="intermediate_size")),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size="hidden_size", num_hidden_layers="num_layers",
                                        num_attention_heads="num_heads", intermediate_size="intermediate_size")),
}


def hf_config(model: ModelConfig, vocab_size: int, special_ids: dict, max_positions: int = 64):
    """A small Hugging Face config for a model trained from scratch."""
    import transformers

    class_name, mapping = _ARCH_CONFIGS[model.arch]
    kwargs = {hf_name: getattr(model, ours) for hf_name, ours in mapping.items()}
    if model.arch == "gpt2":
        kwargs.update(n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif model.arch == "gpt_neox":
        kwargs.update(max_position_embeddings=max_positions)
    else:
        kwargs.update(max_position_embeddings=max_positions, num_key_value_heads=model.num_heads)
    config = getattr(transformers, class_name)(vocab_size=vocab_size, **kwargs, **special_ids)
    return config


def build_model(model: ModelConfig, vocab_size: int, special_ids: dict, seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(model, vocab_size, special_ids))


def load_pretrained(path: str | os.PathLike, role: str):
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{role} model path {str(path)!r} holds no saved Hugging Face model (no config.json); "
            f"set {role}.model.path to a directory written by save_pretrained, or leave it empty to train one"
        )
    return AutoModelForCausalLM.from_pretrained(path).eval()


def cache_key(base: BaseModelConfig, task_fingerprint: str, seed: int) -> str:
    blob = json.dumps({"base": to_dict(base), "data": task_fingerprint, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_atomically(model, tokenizer, target: Path, extra: dict) -> None:
    """save_pretrained into a temporary sibling directory, then rename: no half-written model."""
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    (temporary / "calm_dist_base.json").write_text(json.dumps(extra, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)
