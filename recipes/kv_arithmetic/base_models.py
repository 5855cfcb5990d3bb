"""Small Hugging Face causal LMs built from the recipe's architecture settings, and their cache entries.

A saved base model is an ordinary model directory: ``save_pretrained``'s files, the tokenizer it was
trained with (copied byte for byte, so ``AutoTokenizer.from_pretrained(model_dir)`` gives that
tokenizer), and ``calm_dist_base.json`` (what it was trained on, for how long, its loss curve).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from calm_dist.identity import file_sha256

from .settings import ArchitectureSettings, BaseModelSettings

TRAINING_RECORD = "calm_dist_base.json"
DEFAULT_POSITIONS = 64

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


@dataclass(frozen=True)
class Vocabulary:
    """What a model needs to know of its tokenizer."""

    size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int

    @classmethod
    def of(cls, tokenizer) -> "Vocabulary":
        return cls(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)


def hf_config(model: ArchitectureSettings, vocabulary: Vocabulary, max_positions: int = DEFAULT_POSITIONS):
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
    return getattr(transformers, class_name)(
        vocab_size=vocabulary.size, pad_token_id=vocabulary.pad_token_id, bos_token_id=vocabulary.bos_token_id,
        eos_token_id=vocabulary.eos_token_id, **kwargs)


def build_model(model: ArchitectureSettings, vocabulary: Vocabulary, seed: int,
                max_positions: int = DEFAULT_POSITIONS):
    """An untrained model; its initial weights depend on ``seed`` alone."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config(model, vocabulary, max_positions))


def cache_key(base: BaseModelSettings, training_file: Path, tokenizer_dir: Path, seed: int, max_positions: int) -> str:
    """Identity of a trained base model: its settings, seed, and the content of its data and tokenizer."""
    blob = json.dumps({"base": asdict(base), "seed": seed, "positions": max_positions,
                       "data": file_sha256(training_file), "tokenizer": file_sha256(tokenizer_dir / "tokenizer.json")},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_saved(directory: Path) -> bool:
    return (directory / TRAINING_RECORD).is_file()


def save_atomically(model, tokenizer_dir: Path, target: Path, record: dict) -> None:
    """The model, its tokenizer's files and its training record into ``target``, which appears at once."""
    temporary = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, temporary / item.name)
    (temporary / TRAINING_RECORD).write_text(json.dumps(record, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)


@dataclass(frozen=True)
class TrainingRecord:
    """``calm_dist_base.json`` of a saved base model."""

    role: str
    trained_on: str
    seconds: float
    losses: list[float]
    zeroed_embeddings: int = 0

    @classmethod
    def read(cls, directory: Path) -> "TrainingRecord":
        return cls(**json.loads((directory / TRAINING_RECORD).read_text()))

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    def curve(self) -> list[tuple[int, float]]:
        return list(enumerate(self.losses, start=1))
