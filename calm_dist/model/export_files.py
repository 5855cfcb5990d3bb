"""The files of an export directory: bridges, config, generation config and the anchor's tokenizer."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

WEIGHTS_NAME = "composition.safetensors"
# What a saved tokenizer may consist of (fast and slow, BPE, WordPiece, SentencePiece, tiktoken, chat templates).
_TOKENIZER_FILE = re.compile(r"(.*token.*|.*vocab.*|merges\.txt|.*\.model|.*\.tiktoken|chat_template\.(jinja|json)"
                             r"|additional_chat_templates)")


class TokenizerNotFoundError(FileNotFoundError):
    """The directory given for the anchor's tokenizer holds none."""


def write_export_files(directory: Path, config, composition_state: Mapping[str, torch.Tensor], generation_config,
                       tokenizer=None, augment_tokenizers=()) -> None:
    """Writes an export's files into ``directory`` (created if needed): the bridges as fp32 safetensors,
    ``config.json`` (a ``CALMConfig``), ``generation_config.json`` and, when given, the anchor's tokenizer
    (a tokenizer object, or the directory it was saved to: its files are copied as they are), set up for
    batched generation: padding on the left and, if it has no pad token, its EOS token as pad.
    ``augment_tokenizers``: per augmenting model whose config entry names a ``tokenizer`` directory, its own
    tokenizer (object or directory), written there."""
    from safetensors.torch import save_file

    expected = sum(len(entry["connections"]) for entry in config.augments)
    bridges = {key.split(".")[1] for key in composition_state if key.count(".") >= 2}
    if any(not key.startswith("bridges.") for key in composition_state) or len(bridges) != expected:
        raise ValueError(f"composition_state must hold the weights of {expected} bridges (keys 'bridges.<i>.…', "
                         f"from CALMModel.composition_state_dict()), got {len(bridges)} bridges in "
                         f"{sorted(composition_state)[:4]}…")
    directory.mkdir(parents=True, exist_ok=True)
    loaded = write_tokenizer(tokenizer, directory, config.vocab_size) if tokenizer is not None else None
    own = [(entry["tokenizer"], index) for index, entry in enumerate(config.augments) if entry.get("tokenizer")]
    given = list(augment_tokenizers) or [None] * len(config.augments)
    for name, index in own:
        if given[index] is None:
            raise ValueError(f"augmenting model {index} reads its own tokenizer: give it (augment_tokenizers[{index}])")
        write_tokenizer(given[index], directory / name, None, f"augmenting model {index}'s", pad_left=False)
    weights = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in composition_state.items()}
    save_file(weights, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(directory)
    if generation_config.pad_token_id is None and loaded is not None and loaded.pad_token_id is not None:
        generation_config.pad_token_id = loaded.pad_token_id
    generation_config.save_pretrained(directory)


def write_tokenizer(tokenizer, directory: Path, vocab_size: int | None, whose: str = "the anchor's",
                    pad_left: bool = True):
    """Writes the tokenizer into ``directory`` for generation (``pad_left``: padding on the left, EOS as pad
    when it has none) and returns it as ``AutoTokenizer`` loads it from there; TokenizerNotFoundError (a
    FileNotFoundError) when ``tokenizer`` is a directory without one, ValueError when it has more tokens than
    the anchor's vocabulary (then it is not the anchor's)."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, os.PathLike)):
        files = [path for path in Path(tokenizer).iterdir() if _TOKENIZER_FILE.fullmatch(path.name)] \
            if Path(tokenizer).is_dir() else []
        if not any(path.name in ("tokenizer.json", "tokenizer_config.json") for path in files):
            raise TokenizerNotFoundError(f"tokenizer: {str(tokenizer)!r} holds no Hugging Face tokenizer (no "
                                    f"tokenizer.json or tokenizer_config.json); give the directory {whose} "
                                    "tokenizer was saved to")
        for path in files:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, directory / path.name)
    else:
        tokenizer.save_pretrained(directory)
    if pad_left:
        _pad_left_with_eos(directory / "tokenizer_config.json")
    loaded = AutoTokenizer.from_pretrained(directory)
    if vocab_size is not None and len(loaded) > vocab_size:
        raise ValueError(f"tokenizer: it has {len(loaded)} tokens, the anchor's vocabulary {vocab_size}: it is not "
                         "the anchor's tokenizer")
    return loaded


def _pad_left_with_eos(tokenizer_config: Path) -> None:
    settings = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    settings["padding_side"] = "left"  # a decoder generates after each row's last token
    if settings.get("pad_token") is None and settings.get("eos_token") is not None:
        settings["pad_token"] = settings["eos_token"]
    handle, name = tempfile.mkstemp(dir=tokenizer_config.parent, prefix=".tokenizer_config.")
    os.close(handle)
    temporary = Path(name)
    temporary.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    os.replace(temporary, tokenizer_config)
