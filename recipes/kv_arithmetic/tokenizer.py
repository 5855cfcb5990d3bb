"""Word-level tokenizer for the KV-arithmetic tasks: one token per key, number and operator."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .tasks import OPERATORS, number_token_range

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TOKENIZER_FILE = "tokenizer.json"


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


def build_tokenizer(
    keys: Iterable[str], *, value_max: int, max_operands: int
) -> PreTrainedTokenizerFast:
    """A WordLevel/WhitespaceSplit tokenizer that never adds bos/eos by itself."""
    vocab = build_vocab(keys, value_max=value_max, max_operands=max_operands)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="right",
    )
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    return tokenizer


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


def load_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer`."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} in {directory}; build one with "
            f"data_pipeline.build_tokenizer + save_tokenizer"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def tokenizer_hash(tokenizer_or_dir: PreTrainedTokenizerFast | str | os.PathLike) -> str:
    """sha256 hex of the ``tokenizer.json`` that ``save_pretrained`` writes."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        path = Path(tokenizer_or_dir) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {tokenizer_or_dir}")
        return hashlib.sha256(path.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_or_dir.save_pretrained(scratch)
        return hashlib.sha256((Path(scratch) / TOKENIZER_FILE).read_bytes()).hexdigest()


def encode_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Ids of ``text`` without special tokens; ValueError on a word outside the vocabulary."""
    return encode_many(tokenizer, [text])[0]


def encode_many(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """:func:`encode_words` for many texts; each distinct text is encoded once."""
    unique = list(dict.fromkeys(texts))
    encodings = tokenizer.backend_tokenizer.encode_batch(unique, add_special_tokens=False)
    ids = {text: encoding.ids for text, encoding in zip(unique, encodings)}
    unk_id = tokenizer.unk_token_id
    for text, text_ids in ids.items():
        if unk_id in text_ids:
            unknown = [w for w in text.split() if tokenizer.convert_tokens_to_ids(w) == unk_id]
            raise ValueError(
                f"{text!r} has words outside the tokenizer vocabulary: {unknown}; rebuild "
                f"the tokenizer with these keys / a larger value_max or max_operands"
            )
    return [ids[text] for text in texts]
