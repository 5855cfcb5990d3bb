"""From the user's files to tokenised datasets on disk, done once and cached by fingerprint.

``datasets`` loads the rows (JSONL, JSON, Parquet, Arrow, CSV, or a ``save_to_disk`` directory),
``Dataset.map`` tokenises them in parallel and ``save_to_disk`` writes the result; the directory is
named by a fingerprint of the sources (paths, sizes, modification times), the tokenizer and the
settings, and appears atomically, so a second run (or every worker) finds it ready. ``prepared.json``
beside the splits records each split's summary and every file's sha256, which are checked before a
run uses them: a corrupted file is refused with its path.

Augmenting models with tokenizers of their own (``augment_tokenizers``): every row's text is also
tokenised, in the same pass, once per distinct tokenizer (told apart by ``tokenizer_fingerprint``), into
columns ``aug<i>_input_ids`` and ``aug<i>_end_offsets`` of the same dataset (``i``: the first augmenting
model with that tokenizer), so every tokenisation of a row stays in that row; the rules are
``tokenize.Retokenisation``'s.
"""
from __future__ import annotations

import glob as globbing
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow.compute as pc

from data_pipeline.formats import RowFormat, detect_format
from data_pipeline.tokenize import RowError, Retokenisation, TokenizeSettings, encode_rows

SCHEMA_VERSION = 2
MANIFEST = "prepared.json"
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
_ROWS_PER_PROCESS = 50_000


@dataclass(frozen=True)
class DataSource:
    key: str  # the config key that names it, for messages
    location: str


@dataclass(frozen=True)
class DataSpec:
    train: DataSource
    evals: dict[str, DataSource] = field(default_factory=dict)  # empty: eval_fraction of train, named "eval"
    eval_fraction: float = 0.05
    columns: dict[str, str] = field(default_factory=dict)
    settings: TokenizeSettings = TokenizeSettings(512)
    num_proc: int = 0
    seed: int = 0


@dataclass(frozen=True)
class AugmentTokenizer:
    """An augmenting model's own tokenizer, and that model's position limit (None: none known)."""

    tokenizer: object
    max_length: int | None = None


@dataclass(frozen=True)
class Tokenisation:
    """One more tokenisation of every row, in columns ``<name>_input_ids`` and ``<name>_end_offsets``."""

    name: str
    fingerprint: str  # tokenizer_fingerprint of its tokenizer
    pad_id: int
    max_length: int | None  # the position limit it was cut to (the smallest of the models reading it)


@dataclass(frozen=True)
class SplitSummary:
    name: str
    source: str
    row_format: str
    rows_in: int
    rows: int
    dropped_overlong: int
    truncated: int
    dropped_unlabelled: int
    tokens: int
    labelled_tokens: int
    longest: int
    # with augmenting tokenizers: rows dropped as longer than an augmenting model's positions (data.overlong:
    # drop) or without one token of it; rows whose augmenting tokenisation was cut (data.overlong: truncate)
    dropped_augment: int = 0
    augment_truncated: int = 0
    augment_longest: dict[str, int] = field(default_factory=dict)  # per tokenisation, its longest row


@dataclass(frozen=True)
class PreparedData:
    directory: Path
    fingerprint: str
    pad_id: int
    splits: dict[str, SplitSummary]  # "train" and every evaluation set
    tokenisations: dict[str, Tokenisation] = field(default_factory=dict)  # beside the anchor's, by column prefix
    augment_columns: tuple[str | None, ...] = ()  # per augmenting model: its tokenisation, None = the anchor's

    @property
    def train(self) -> Path:
        return self.directory / "train"

    @property
    def eval_names(self) -> list[str]:
        return [name for name in self.splits if name != "train"]

    def eval_dir(self, name: str) -> Path:
        return self.directory / f"eval-{name}"

    @property
    def pad_ids(self) -> dict[str, int]:
        """Each tokenisation's pad id, by name."""
        return {name: record.pad_id for name, record in self.tokenisations.items()}


def pad_id_of(tokenizer) -> int:
    """Padding positions are masked, so any id works; the tokenizer's pad, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: the fast tokenizer's full definition, its chat template and specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: the data pipeline needs token offsets "
                         "(install `tokenizers` and save the tokenizer with tokenizer.json)")
    blob = json.dumps({"backend": backend.to_str(), "chat_template": tokenizer.chat_template,
                       "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
                       "class": type(tokenizer).__name__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def source_files(source: DataSource) -> list[Path]:
    """The data files a source names; FileNotFoundError / ValueError naming its key."""
    location = source.location
    if not location:
        raise ValueError(f"config key '{source.key}' is empty: name a data file (.jsonl, .json, .parquet, .arrow, "
                         ".csv), a glob, or a directory written by Dataset.save_to_disk")
    path = Path(location)
    if any(char in location for char in "*?["):
        files = [Path(p) for p in sorted(globbing.glob(location))]
        if not files:
            raise FileNotFoundError(f"config key '{source.key}': no file matches {location!r}")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"config key '{source.key}': {location!r} does not exist (as a file, a glob or "
                                "a directory); paths are read on the machine that runs the driver")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def source_fingerprint(source: DataSource) -> list:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(source)]


def load_rows(source: DataSource, cache_dir: Path):
    """The source's rows as a ``datasets.Dataset``."""
    import datasets

    path = Path(source.location)
    files = source_files(source)
    if _is_saved_dataset(path):
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(f"config key '{source.key}': {path} holds a DatasetDict; name one split's directory, "
                             f"e.g. {path / (splits[0] if splits else 'train')}")
        return datasets.load_from_disk(str(path))
    kinds = {BUILDERS.get(_suffix(p)) for p in files}
    if None in kinds or len(kinds) != 1:
        unsupported = sorted({p.suffix or p.name for p in files if BUILDERS.get(_suffix(p)) is None})
        raise ValueError(f"config key '{source.key}': {source.location!r} has files of kinds "
                         f"{unsupported or sorted(kinds)}; give files of one kind among {sorted(BUILDERS)}, "
                         "or a directory written by Dataset.save_to_disk")
    try:
        return datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train",
                                     cache_dir=str(cache_dir / "hf_datasets"))
    except Exception as error:  # noqa: BLE001  (datasets raises many kinds for unreadable files)
        raise ValueError(f"config key '{source.key}': {source.location!r} could not be read: "
                         f"{type(error).__name__}: {error}") from error


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _rename(dataset, columns: dict[str, str], key: str):
    missing = sorted(set(columns) - set(dataset.column_names))
    if missing:
        raise ValueError(f"config key 'data.columns': {key} has no columns {missing} to rename "
                         f"(it has {dataset.column_names})")
    return dataset.rename_columns(columns) if columns else dataset


def data_fingerprint(spec: DataSpec, tokenizer, tokenisations: Sequence[Tokenisation] = ()) -> str:
    fields = {
        "schema": SCHEMA_VERSION, "tokenizer": tokenizer_fingerprint(tokenizer),
        "train": source_fingerprint(spec.train),
        "evals": {name: source_fingerprint(source) for name, source in spec.evals.items()},
        "eval_fraction": spec.eval_fraction if not spec.evals else None, "seed": spec.seed,
        "columns": spec.columns, "settings": asdict(spec.settings)}
    if tokenisations:
        fields["tokenisations"] = [asdict(tokenisation) for tokenisation in tokenisations]
    return "data-" + hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def plan_tokenisations(anchor_tokenizer, augment_tokenizers: Sequence[AugmentTokenizer | None]
                       ) -> tuple[list[Retokenisation], dict[str, Tokenisation], tuple[str | None, ...]]:
    """One tokenisation per distinct augmenting tokenizer (by fingerprint; the anchor's needs none):
    (what encodes them, their records by name, each augmenting model's tokenisation or None)."""
    anchor = tokenizer_fingerprint(anchor_tokenizer)
    encoders: dict[str, Retokenisation] = {}
    records: dict[str, Tokenisation] = {}
    by_fingerprint: dict[str, str] = {}
    columns: list[str | None] = []
    for index, augment in enumerate(augment_tokenizers):
        fingerprint = None if augment is None else tokenizer_fingerprint(augment.tokenizer)
        if fingerprint is None or fingerprint == anchor:
            columns.append(None)
            continue
        name = by_fingerprint.setdefault(fingerprint, f"aug{index}")
        limits = [limit for limit in (augment.max_length, records[name].max_length if name in records else None)
                  if limit is not None]
        limit = min(limits) if limits else None
        records[name] = Tokenisation(name, fingerprint, pad_id_of(augment.tokenizer), limit)
        encoders[name] = Retokenisation(name, augment.tokenizer, limit)
        columns.append(name)
    return list(encoders.values()), records, tuple(columns)


def _num_proc(requested: int, rows: int) -> int | None:
    count = requested or max(1, min(os.cpu_count() or 1, rows // _ROWS_PER_PROCESS))
    return count if count > 1 else None


def _tokenise(dataset, name: str, source: DataSource, tokenizer, spec: DataSpec, others: Sequence[Retokenisation]):
    row_format = detect_format(dataset.column_names, f"config key '{source.key}' ({source.location})")
    if row_format == RowFormat.MESSAGES and not tokenizer.chat_template:
        raise ValueError(f"config key '{source.key}': the rows are conversations ('messages') but the anchor "
                         "tokenizer has no chat template; give it one (tokenizer.chat_template, saved with "
                         "save_pretrained) or write prompt/completion rows")
    try:
        encoded = dataset.map(
            lambda rows, indices: encode_rows(rows, row_format, tokenizer, spec.settings, indices[0], others),
            batched=True, with_indices=True, remove_columns=dataset.column_names,
            num_proc=_num_proc(spec.num_proc, len(dataset)), desc=f"tokenising {name}")
    except RowError as error:
        raise ValueError(f"config key '{source.key}' ({source.location}): {error}") from None
    counts = {str(item["values"]): int(item["counts"])
              for item in pc.value_counts(encoded.data.column("status")).to_pylist()}
    kept = encoded.filter(lambda rows: [s in ("kept", "truncated") for s in rows], input_columns="status",
                          batched=True)
    augment_truncated = 0
    if others:
        augment_truncated = pc.sum(kept.data.column("others_truncated")).as_py() or 0
        kept = kept.remove_columns("others_truncated")
    kept = kept.remove_columns("status").flatten_indices()
    augment_longest = {other.name: pc.max(pc.list_value_length(kept.data.column(f"{other.name}_input_ids"))).as_py()
                       or 0 for other in others}
    lengths = pc.list_value_length(kept.data.column("input_ids"))
    labels = kept.data.column("labels")
    labelled = 0
    if len(kept):  # a label at position 0 is never predicted
        labelled = pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() \
            - pc.sum(pc.not_equal(pc.list_element(labels, 0), -100)).as_py()
    summary = SplitSummary(name, source.location, row_format.value, len(dataset), len(kept), counts.get("overlong", 0),
                           counts.get("truncated", 0), counts.get("unlabelled", 0), pc.sum(lengths).as_py() or 0,
                           labelled, pc.max(lengths).as_py() or 0, counts.get("other_dropped", 0), augment_truncated,
                           augment_longest)
    return kept, summary


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*.arrow"))}


def prepare_data(spec: DataSpec, tokenizer, cache_dir: str | os.PathLike, log=print,
                 augment_tokenizers: Sequence[AugmentTokenizer | None] = ()) -> PreparedData:
    """Tokenised train and evaluation sets under ``cache_dir/data/<fingerprint>`` (made if missing).
    ``augment_tokenizers``: one entry per augmenting model, None (or the anchor's tokenizer) = it reads the
    anchor's tokens."""
    import datasets

    cache_dir = Path(cache_dir)
    others, tokenisations, augment_columns = plan_tokenisations(tokenizer, augment_tokenizers)
    fingerprint = data_fingerprint(spec, tokenizer, list(tokenisations.values()))
    target = cache_dir / "data" / fingerprint
    if (target / MANIFEST).is_file():
        return load_prepared(target)
    started = time.perf_counter()
    datasets.disable_progress_bars()
    train_rows = _rename(load_rows(spec.train, cache_dir), spec.columns, spec.train.key)
    sources = {"train": (train_rows, spec.train)}
    if spec.evals:
        for name, source in spec.evals.items():
            sources[name] = (_rename(load_rows(source, cache_dir), spec.columns, source.key), source)
    else:
        held = train_rows.train_test_split(test_size=spec.eval_fraction, seed=spec.seed, shuffle=True)
        sources = {"train": (held["train"], spec.train),
                   "eval": (held["test"], DataSource("data.eval_fraction", f"{spec.train.location} (held out)"))}
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        summaries = {}
        for name, (rows, source) in sources.items():
            tokenised, summary = _tokenise(rows, name, source, tokenizer, spec, others)
            if summary.rows == 0:
                augment = (f", {summary.dropped_augment} longer than an augmenting model's positions or without "
                           "one token of its tokenizer") if others else ""
                raise ValueError(f"config key '{source.key}': no row of {source.location} is left after tokenisation "
                                 f"({summary.dropped_overlong} longer than data.max_length={spec.settings.max_length}, "
                                 f"{summary.dropped_unlabelled} with nothing to learn{augment})")
            tokenised.save_to_disk(str(staging / ("train" if name == "train" else f"eval-{name}")))
            summaries[name] = summary
        manifest = {"schema": SCHEMA_VERSION, "fingerprint": fingerprint, "pad_id": pad_id_of(tokenizer),
                    "splits": {name: asdict(summary) for name, summary in summaries.items()},
                    "tokenisations": {name: asdict(record) for name, record in tokenisations.items()},
                    "augment_columns": list(augment_columns), "sha256": _file_checksums(staging)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for rows, _ in sources.values():
        rows.cleanup_cache_files()
    log(f"data: tokenised {', '.join(f'{s.name} {s.rows} rows' for s in summaries.values())} "
        f"in {time.perf_counter() - started:.1f} s -> {target}")
    return load_prepared(target, verify=False)


def load_prepared(directory: str | os.PathLike, verify: bool = True) -> PreparedData:
    """The prepared data in ``directory``; with ``verify`` every file's sha256 is checked first."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{directory} holds no prepared data ({MANIFEST} is missing); delete it to rebuild")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{directory} was prepared by another version of calm_dist; delete it to rebuild")
    if verify:
        for relative, expected in manifest["sha256"].items():
            file = directory / relative
            if not file.is_file() or _sha256(file) != expected:
                raise ValueError(f"prepared data file {file} is {'missing' if not file.is_file() else 'corrupted'} "
                                 f"(its sha256 differs from the one written with it); delete {directory} and run "
                                 "again to tokenise the data afresh")
    splits = {name: SplitSummary(**summary) for name, summary in manifest["splits"].items()}
    tokenisations = {name: Tokenisation(**record) for name, record in manifest.get("tokenisations", {}).items()}
    return PreparedData(directory, manifest["fingerprint"], int(manifest["pad_id"]), splits, tokenisations,
                        tuple(manifest.get("augment_columns", ())))
