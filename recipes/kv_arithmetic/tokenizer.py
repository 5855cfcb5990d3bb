"""The recipe's tokenizers, saved as ordinary Hugging Face fast tokenizers.

The word-level tokenizer gives one token per key, number and operator; the character-level one (the
"different tokenizer" row) one per non-space character. Both put BOS first themselves (a
TemplateProcessing post-processor): the framework adds BOS only when the tokenizer does, and the base
models are trained on rows that start with it. EOS is the framework's to add after a completion.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .tasks import OPERATORS, number_token_range

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789+-="


def build_vocab(keys: Iterable[str], *, value_max: int, max_operands: int) -> dict[str, int]:
    """Token -> id: specials, operators, ``=``, every reachable number, then ``keys``."""
    low, high = number_token_range(value_max, max_operands)
    words = [*SPECIAL_TOKENS, *OPERATORS, "="] + [str(n) for n in range(low, high + 1)]
    vocab = {word: index for index, word in enumerate(words)}
    for key in keys:
        if not (key.isascii() and key.isalpha() and key.islower()):
            raise ValueError(f"key {key!r} is not a lowercase ascii word; keys must be [a-z]+")
        if key in vocab:
            raise ValueError(f"key {key!r} appears twice in `keys`; keys must be unique")
        vocab[key] = len(vocab)
    return vocab


def _fast_tokenizer(vocab: dict[str, int], pre_tokenizer) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                        unk_token=UNK, padding_side="right")
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tokenizer


def build_tokenizer(keys: Iterable[str], *, value_max: int, max_operands: int) -> PreTrainedTokenizerFast:
    """Words split on whitespace, one id each; BOS first."""
    vocab = build_vocab(keys, value_max=value_max, max_operands=max_operands)
    return _fast_tokenizer(vocab, pre_tokenizers.WhitespaceSplit())


def character_tokenizer() -> PreTrainedTokenizerFast:
    """One token per non-space character (offsets refer to the original text); BOS first."""
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    return _fast_tokenizer(vocab, pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]))


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` into ``directory``, which appears atomically; replaces an old one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-", dir=directory.parent))
    try:
        tokenizer.save_pretrained(staging)
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is swapped out, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer saved in ``directory``, loaded as the job loads it (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    if not (Path(directory) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}; save one with save_tokenizer")
    return AutoTokenizer.from_pretrained(str(directory))
