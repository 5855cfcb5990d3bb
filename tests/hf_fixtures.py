"""Saved tiny base models with a real BPE tokenizer (no BOS, no pad token, a chat template), and exports of
compositions over them, as a user would have them on disk."""
from __future__ import annotations

from pathlib import Path

import transformers

from tests.tiny_models import tiny_model

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "a quick brown fox jumps over the lazy dog",
    "compose two models and train only the bridges between them",
    "the anchor reads the augmenting model through cross attention",
    "numbers like 12 and 345 are split into pieces",
] * 4
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}</s>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def bpe_tokenizer(vocab_size: int = 96) -> transformers.PreTrainedTokenizerFast:
    """A byte-pair-encoding tokenizer trained on ``CORPUS``: Metaspace pieces (words keep their leading
    space), only ``<unk>`` and ``</s>`` as special tokens: no BOS, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="</s>",
                                                chat_template=CHAT_TEMPLATE)


def save_base_models(root: Path, anchor_arch: str, augment_archs: list[str], tokenizer) -> tuple[Path, list[Path]]:
    """The anchor (with the tokenizer saved beside it, as models usually are) and the augmenting models,
    all reading the tokenizer's ids; their token ids are the tokenizer's (no BOS, no pad)."""
    vocab = len(tokenizer)
    special = dict(bos_token_id=None, pad_token_id=None, eos_token_id=tokenizer.eos_token_id)
    anchor = tiny_model(anchor_arch, hidden=48, layers=3, heads=6, seed=1, vocab=vocab)
    anchor.config.update(special)
    anchor.generation_config.update(**special)
    anchor_dir = root / "anchor"
    anchor.save_pretrained(anchor_dir)
    tokenizer.save_pretrained(anchor_dir)
    augment_dirs = []
    for index, arch in enumerate(augment_archs):
        augment = tiny_model(arch, hidden=32 + 8 * index, layers=4, heads=4, seed=2 + index, vocab=vocab)
        augment.config.update(special)
        augment_dirs.append(root / f"augment_{index}")
        augment.save_pretrained(augment_dirs[-1])
    return anchor_dir, augment_dirs
