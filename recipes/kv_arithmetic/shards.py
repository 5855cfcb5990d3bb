"""Tokenised Arrow shards plus ``manifest.json``: writing, validating, loading."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .tokenizer import encode_many, replace_directory, save_tokenizer, tokenizer_hash

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_SUBDIR = "tokenizer"
IGNORE_INDEX = -100
ROW_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("prompt", pa.string()),
        ("answer", pa.string()),
    ]
)
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_REGENERATE = "regenerate the dataset with data_pipeline.write_dataset"


def tokenize_examples(examples: Sequence[Mapping[str, str]], tokenizer) -> pa.Table:
    """Rows ``[bos] + prompt + answer + [eos]``; labels are -100 over bos and the prompt."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for index, example in enumerate(examples):
        fields = ("prompt", "answer")
        if not isinstance(example, Mapping) or not all(
            isinstance(example.get(field), str) for field in fields
        ):
            raise ValueError(f"example {index} is {example!r}; every example must be a dict "
                             f"with 'prompt' and 'answer' strings")
    prompts = [example["prompt"] for example in examples]
    answers = [example["answer"] for example in examples]
    input_ids, labels, prompt_lens = [], [], []
    encoded = zip(encode_many(tokenizer, prompts), encode_many(tokenizer, answers))
    for prompt_ids, answer_ids in encoded:
        input_ids.append([bos, *prompt_ids, *answer_ids, eos])
        labels.append([IGNORE_INDEX] * (1 + len(prompt_ids)) + [*answer_ids, eos])
        prompt_lens.append(1 + len(prompt_ids))
    columns = [input_ids, labels, prompt_lens, prompts, answers]
    return pa.Table.from_arrays(
        [pa.array(column, type=field.type) for column, field in zip(columns, ROW_SCHEMA)],
        schema=ROW_SCHEMA,
    )


def _write_arrow(table: pa.Table, path: Path) -> None:
    # Arrow IPC stream format: the layout `datasets.Dataset.from_file` memory-maps.
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _read_arrow(path: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} is missing; {_REGENERATE}")
    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except pa.ArrowInvalid as error:
        raise ValueError(
            f"{path} is not a readable Arrow stream ({error}); {_REGENERATE}"
        ) from error


def write_dataset(
    out_dir: str | os.PathLike,
    splits: Mapping[str, Sequence[Mapping[str, str]]],
    tokenizer,
    seed: int,
    *,
    shard_rows: int = 100_000,
    metadata: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenise ``splits`` into ``<split>-NNNNN.arrow`` shards, the tokenizer and a manifest.

    The directory appears atomically; an existing one raises FileExistsError unless
    ``overwrite``. ``metadata`` (JSON-able) is stored in the manifest as is.
    """
    out_dir = Path(out_dir)
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    if not splits:
        raise ValueError("splits is empty; pass at least one {name: examples} entry")
    for name, examples in splits.items():
        if not _SPLIT_NAME.fullmatch(str(name)):
            raise ValueError(f"split name {name!r} must match {_SPLIT_NAME.pattern}")
        if not examples:
            raise ValueError(f"split {name!r} has no examples; drop it or generate some")
    try:
        json.dumps(dict(metadata or {}))
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable ({error}); pass plain "
                         f"dicts, lists, strings and numbers") from error
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; delete it or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _write_contents(staging, splits, tokenizer, seed, shard_rows, metadata)
        with open(staging / MANIFEST_FILE, "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
        replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_contents(staging, splits, tokenizer, seed, shard_rows, metadata) -> dict:
    save_tokenizer(tokenizer, staging / TOKENIZER_SUBDIR)
    split_entries = {}
    for name, examples in splits.items():
        table = tokenize_examples(examples, tokenizer)
        shards = []
        for index, start in enumerate(range(0, table.num_rows, shard_rows)):
            shard_name = f"{name}-{index:05d}.arrow"
            _write_arrow(table.slice(start, shard_rows), staging / shard_name)
            shards.append(shard_name)
        split_entries[name] = {"num_rows": table.num_rows, "shards": shards}
    return {
        "schema_version": SCHEMA_VERSION,
        "seed": seed,
        "tokenizer_hash": tokenizer_hash(staging / TOKENIZER_SUBDIR),
        "tokenizer_dir": TOKENIZER_SUBDIR,
        "vocab_size": len(tokenizer),
        "special_token_ids": {
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        },
        "splits": split_entries,
        "metadata": dict(metadata or {}),
    }


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _malformed(source, row: int, problem: str) -> ValueError:
    return ValueError(f"{source}: row {row}: {problem}; {_REGENERATE}")


def _is_int_list(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) and pa.types.is_integer(arrow_type.value_type)


_COLUMN_KINDS = {
    "input_ids": ("a list of integers", _is_int_list),
    "labels": ("a list of integers", _is_int_list),
    "prompt_len": ("an integer", pa.types.is_integer),
    "prompt": ("a string", pa.types.is_string),
    "answer": ("a string", pa.types.is_string),
}


def _check_columns(table: pa.Table, source) -> None:
    for name, (kind, is_kind) in _COLUMN_KINDS.items():
        if name not in table.column_names:
            raise ValueError(f"{source}: missing column {name!r}; {_REGENERATE}")
        column = table.column(name)
        if not is_kind(column.type):
            raise ValueError(f"{source}: column {name!r} is {column.type}, expected {kind}; "
                             f"{_REGENERATE}")
        if column.null_count:
            row = _first(column.is_null().to_numpy(zero_copy_only=False))
            raise _malformed(source, row, f"{name} is null")


def validate_rows(
    table: pa.Table, source: str | os.PathLike, *, vocab_size: int | None = None
) -> None:
    """Raise ValueError naming ``source`` and the row index of the first malformed row.

    Checks columns, equal input/label lengths, token ids in [0, vocab_size),
    1 <= prompt_len < length, labels -100 over the prompt and equal to the ids after it.
    Vectorised: one pass of numpy over the flattened token columns.
    """
    _check_columns(table, source)
    ids_col, labels_col = table.column("input_ids"), table.column("labels")
    lengths = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False)
    label_lengths = pc.list_value_length(labels_col).to_numpy(zero_copy_only=False)
    row = _first(lengths != label_lengths)
    if row is not None:
        raise _malformed(source, row, f"labels has {label_lengths[row]} entries but "
                                      f"input_ids has {lengths[row]}")
    prompt_len = table.column("prompt_len").to_numpy().astype(np.int64)
    row = _first((prompt_len < 1) | (prompt_len >= lengths))
    if row is not None:
        raise _malformed(source, row, f"prompt_len {prompt_len[row]} is outside "
                                      f"[1, {lengths[row] - 1}]")
    flat_ids, flat_labels = pc.list_flatten(ids_col), pc.list_flatten(labels_col)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    for name, flat in (("input_ids", flat_ids), ("labels", flat_labels)):
        if flat.null_count:
            element = _first(flat.is_null().to_numpy(zero_copy_only=False))
            raise _malformed(source, int(row_of[element]), f"{name} holds a null token")
    ids, labels = flat_ids.to_numpy().astype(np.int64), flat_labels.to_numpy().astype(np.int64)
    limit = np.iinfo(np.int64).max if vocab_size is None else vocab_size
    element = _first((ids < 0) | (ids >= limit))
    if element is not None:
        raise _malformed(source, int(row_of[element]), f"token id {ids[element]} is outside "
                                                       f"the vocabulary [0, {limit})")
    starts = np.cumsum(lengths) - lengths
    in_prompt = (np.arange(ids.size) - starts[row_of]) < prompt_len[row_of]
    bad = np.where(in_prompt, labels != IGNORE_INDEX, labels != ids)
    element = _first(bad)
    if element is not None:
        raise _malformed(source, int(row_of[element]), "labels must be -100 over the prompt "
                                                       "and equal input_ids after it")


def _read_manifest_file(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset directory {directory} does not exist; "
                                f"create it with data_pipeline.write_dataset")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {_REGENERATE}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {_REGENERATE}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path} has no 'splits' mapping; {_REGENERATE}")
    return manifest


def load_manifest(
    dataset_dir: str | os.PathLike,
    *,
    expected_tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
    check_rows: bool = True,
) -> dict:
    """Read and validate ``manifest.json``; with ``check_rows`` also every shard's rows.

    Token ids are checked against ``vocab_size``, or the manifest's own when not given.
    """
    directory = Path(dataset_dir)
    manifest = _read_manifest_file(directory)
    path = directory / MANIFEST_FILE
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r}, this code reads "
                         f"{SCHEMA_VERSION}; {_REGENERATE}")
    found_hash = manifest.get("tokenizer_hash")
    if expected_tokenizer_hash is not None and found_hash != expected_tokenizer_hash:
        raise ValueError(
            f"{path}: tokenizer_hash {found_hash} does not match the expected "
            f"{expected_tokenizer_hash}; the data was tokenised with a different tokenizer, "
            f"regenerate it with the models' tokenizer"
        )
    for name, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not entry.get("num_rows") or not entry.get("shards"):
            raise ValueError(f"{path}: split {name!r} is empty; {_REGENERATE} and "
                             f"give split {name!r} at least one example")
    if check_rows:
        limit = vocab_size if vocab_size is not None else manifest.get("vocab_size")
        for name in manifest["splits"]:
            _load_split_table(directory, manifest, name, limit)
    return manifest


def _load_split_table(directory: Path, manifest: dict, split: str, vocab_size) -> pa.Table:
    entry = manifest["splits"][split]
    tables = []
    for shard in entry["shards"]:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ValueError(f"{directory / MANIFEST_FILE}: shard entry {shard!r} of split "
                             f"{split!r} must be a file name inside {directory}")
        table = _read_arrow(directory / shard)
        validate_rows(table, directory / shard, vocab_size=vocab_size)
        tables.append(table)
    total = sum(table.num_rows for table in tables)
    if total != entry["num_rows"]:
        raise ValueError(f"{directory / MANIFEST_FILE}: split {split!r} lists "
                         f"{entry['num_rows']} rows but its shards hold {total}; {_REGENERATE}")
    return pa.concat_tables(tables)


def load_split(
    dataset_dir: str | os.PathLike,
    split: str,
    *,
    expected_tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
) -> tuple[pa.Table, dict]:
    """The validated, memory-mapped rows of ``split`` and the dataset's manifest."""
    directory = Path(dataset_dir)
    manifest = load_manifest(directory, expected_tokenizer_hash=expected_tokenizer_hash,
                             check_rows=False)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in {directory}; available: "
                         f"{', '.join(sorted(manifest['splits']))}")
    limit = vocab_size if vocab_size is not None else manifest.get("vocab_size")
    return _load_split_table(directory, manifest, split, limit), manifest
