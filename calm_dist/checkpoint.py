"""Sharded composition-only checkpoints: layout, atomic publication, checksums, retention, resharding.

Layout under the checkpoint root (``checkpoint.dir``: a local or shared directory, or any
``pyarrow.fs`` URI such as ``s3://bucket/run``)::

    latest                      name of the newest published checkpoint; written last
    step_000000040/
        ds/step_000000040/      DeepSpeed's files: composition weights + each rank's optimizer shard
        rng/rank_00000.pt       each anchor rank's RNG states
        meta.json               the completion record, written once every rank's files are in place:
                                step, anchor ranks, data position, base models, config, and every
                                file's size and sha256 (and a checksum of meta.json itself)
        universal/...           DeepSpeed universal form, made on demand to resume at another rank count
        universal.json          its completion record (every universal file's size and sha256)

Publication is the same on every filesystem and never renames a directory (object stores cannot):
every rank uploads its files under their final names, then anchor rank 0 writes ``meta.json``, then
moves ``latest``. A checkpoint without ``meta.json`` (a save that crashed) is never listed as complete
nor loaded, and the next published save removes it. Before resuming, the driver checks every file of
the chosen checkpoint against the sizes and checksums written at save time; a damaged one is skipped
for the previous complete checkpoint, and the caller is told why. The frozen models are never
written: ``save_checkpoint(exclude_frozen_parameters=True)``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

LATEST, META, RECORDS = "latest", "meta.json", "records"
UNIVERSAL = "universal"
FILES, META_CHECKSUM = "files", "meta_sha256"
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def step_of(name: str) -> int:
    return int(name.split("_", 1)[1])


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith("step_") and name[len("step_"):].isdigit()


def _record_bytes(record: dict) -> bytes:
    """A completion record as written: its own checksum over the rest, so a flipped bit is caught too."""
    body = {key: value for key, value in record.items() if key != META_CHECKSUM}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({**body, META_CHECKSUM: digest}, indent=1, sort_keys=True).encode()


def _parse_record(data: bytes) -> dict:
    """The record, or ValueError when it is not one that ``_record_bytes`` wrote."""
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(record, dict) or _record_bytes(record) != data:
        raise ValueError("its checksum does not match its contents")
    return record


class CheckpointStore:
    """One run's checkpoints on a local path or a ``pyarrow.fs`` URI, through the same code for both."""

    def __init__(self, root: str):
        from pyarrow import fs

        self.uri = str(root)
        if "://" in self.uri:
            self.fs, self.root = fs.FileSystem.from_uri(self.uri)
            self.local = False
        else:
            self.fs, self.root, self.local = fs.LocalFileSystem(), os.path.abspath(self.uri), True
        self._fetched: Path | None = None  # local copies of a remote store's checkpoints
        self._intact: dict[tuple[str, str], str] = {}  # (name, part) -> checksum of the record found intact

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(path).type != fs.FileType.NotFound

    def _write_atomic(self, path: str, data: bytes) -> None:
        """Readers see the old file or the whole new one: a temp file, then a move (a rename on POSIX;
        on object stores the new object appears whole once written)."""
        temp = f"{path}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(temp) as out:
            out.write(data)
        self.fs.move(temp, path)

    def _read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as handle:
            return handle.read()

    def _delete_checkpoint(self, name: str) -> None:
        """Its completion record first: a checkpoint half deleted is never taken for a complete one."""
        if self._exists(self.path(name, META)):
            self.fs.delete_file(self.path(name, META))
        if self._exists(self.path(name)):
            self.fs.delete_dir(self.path(name))

    def _names(self) -> list[str]:
        from pyarrow import fs

        if not self._exists(self.root):
            return []
        infos = self.fs.get_file_info(fs.FileSelector(self.root))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory and _is_checkpoint_name(i.base_name))

    def marker(self) -> str | None:
        """The name ``latest`` holds (the last published checkpoint), or None."""
        if not self._exists(self.path(LATEST)):
            return None
        return self._read_bytes(self.path(LATEST)).decode().strip() or None

    def complete(self) -> list[str]:
        """Checkpoints with a completion record, oldest first (their files are checked by ``damage``)."""
        return [name for name in self._names() if self._exists(self.path(name, META))]

    def resume_candidates(self) -> list[str]:
        """Complete checkpoints up to the one ``latest`` names, newest first."""
        marker = self.marker()
        if marker is None:
            return []
        return [name for name in reversed(self.complete()) if name <= marker]

    def latest(self) -> str | None:
        """The newest complete checkpoint up to ``latest`` (without reading its files), or None."""
        return next(iter(self.resume_candidates()), None)

    def meta(self, name: str) -> dict:
        return _parse_record(self._read_bytes(self.path(name, META)))

    # --- writing (anchor ranks) ---

    def begin(self, step: int) -> None:
        """Anchor rank 0, before any rank writes ``step``: removes whatever an earlier save of the same
        step left (a crashed save, or a checkpoint superseded after a resume from an older one)."""
        self._delete_checkpoint(checkpoint_name(step))

    def upload(self, local: Path, name: str, part: str = "") -> dict[str, dict]:
        """Copies every file under ``local`` to ``name/part/...`` under its final name; returns each
        file's ``{"bytes", "sha256"}`` by its path relative to the checkpoint."""
        records = {}
        for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            relative = "/".join(filter(None, [part, file.relative_to(local).as_posix()]))
            records[relative] = self._upload_file(file, self.path(name, relative))
        return records

    def _upload_file(self, source: Path, target: str) -> dict:
        digest, size = hashlib.sha256(), 0
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(source, "rb") as handle, self.fs.open_output_stream(target) as out:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return {"bytes": size, "sha256": digest.hexdigest()}

    def publish(self, step: int, meta: dict, files_by_rank: list[dict[str, dict]], keep: int) -> str:
        """Anchor rank 0, once every rank has uploaded: the completion record, then ``latest``, then pruning."""
        name = checkpoint_name(step)
        files = self._check_every_rank_visible(name, files_by_rank)
        self._write_atomic(self.path(name, META), _record_bytes({**meta, FILES: files}))
        self._write_atomic(self.path(LATEST), name.encode())
        self.prune(keep, name)
        return name

    def _check_every_rank_visible(self, name: str, files_by_rank: list[dict[str, dict]]) -> dict[str, dict]:
        from pyarrow import fs

        seen = {info.path[len(self.path(name)) + 1:]: info.size
                for info in self.fs.get_file_info(fs.FileSelector(self.path(name), recursive=True, allow_not_found=True))
                if info.type == fs.FileType.File}
        missing = [rank for rank, files in enumerate(files_by_rank)
                   if any(seen.get(path) != record["bytes"] for path, record in files.items())]
        if missing:
            raise RuntimeError(
                f"anchor ranks {missing} wrote their checkpoint files where rank 0 cannot see them: "
                f"checkpoint.dir={self.uri!r} must be a shared filesystem or a URI (s3://, gs://, hdfs://) "
                "reachable from every node")
        return {path: record for files in files_by_rank for path, record in files.items()}

    def prune(self, keep: int, newest: str) -> None:
        """After ``newest`` is published: keeps the ``keep`` newest complete checkpoints up to it and removes
        every incomplete one (crashed saves) and any newer one (left by a run that resumed from an older
        checkpoint, e.g. after a damaged one was skipped)."""
        from pyarrow import fs

        complete = set(self.complete())
        kept = [name for name in sorted(complete) if name <= newest][-keep:] if keep > 0 else sorted(complete)
        for name in self._names():
            if name != newest and (name > newest or name not in complete or name not in kept):
                self._delete_checkpoint(name)
        for info in self.fs.get_file_info(fs.FileSelector(self.root)):
            if info.base_name.startswith(f"{LATEST}.tmp-"):  # a marker write that crashed
                self.fs.delete_file(info.path)

    # --- checking ---

    def damage(self, name: str, part: str = "") -> str | None:
        """What is wrong with checkpoint ``name`` (or its ``part``, e.g. ``universal``), or None when its
        completion record is intact and every file it lists has the size and sha256 written at save time."""
        record_name = f"{part}.json" if part else META
        try:
            record = _parse_record(self._read_bytes(self.path(name, record_name)))
        except FileNotFoundError:
            return f"{record_name} is missing"
        except ValueError as error:
            return f"{record_name} is damaged: {error}"
        checksum = record[META_CHECKSUM]
        if self._intact.get((name, part)) == checksum:
            return None
        for relative, expected in sorted(record.get(FILES, {}).items()):
            problem = self._file_damage(self.path(name, relative), expected)
            if problem is not None:
                return f"{relative} {problem}"
        self._intact[(name, part)] = checksum
        return None

    def _file_damage(self, path: str, expected: dict) -> str | None:
        from pyarrow import fs

        info = self.fs.get_file_info(path)
        if info.type != fs.FileType.File:
            return "is missing"
        if info.size != expected["bytes"]:
            return f"has {info.size} bytes, {expected['bytes']} were written"
        digest = hashlib.sha256()
        with self.fs.open_input_stream(path) as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != expected["sha256"]:
            return "differs from what was written (sha256 mismatch)"
        return None

    # --- reading ---

    def fetch(self, name: str, *parts: str) -> Path:
        """A local directory holding ``name/parts`` (downloaded once when the store is remote)."""
        if self.local:
            return Path(self.path(name, *parts))
        from pyarrow import fs

        if self._fetched is None:
            self._fetched = Path(tempfile.mkdtemp(prefix="calm-ckpt-"))
            weakref.finalize(self, shutil.rmtree, self._fetched, True)  # the copies go with the store
        target = self._fetched / name / Path(*parts) if parts else self._fetched / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            staging = target.with_name(target.name + ".download")
            staging.mkdir(parents=True, exist_ok=True)
            fs.copy_files(self.path(name, *parts), str(staging), source_filesystem=self.fs,
                          destination_filesystem=fs.LocalFileSystem())
            staging.rename(target)
        return target

    def has(self, name: str, *parts: str) -> bool:
        return self._exists(self.path(name, *parts))

    # --- the run's metrics records, kept beside the checkpoints and never pruned with them ---

    def write_records(self, step: int, records: list[dict]) -> None:
        """The metrics records reported since the previous checkpoint, written before ``step``'s is published:
        a driver that died before logging them restores them from here (a few hundred bytes a step)."""
        self.fs.create_dir(self.path(RECORDS), recursive=True)
        self._write_atomic(self.path(RECORDS, f"{checkpoint_name(step)}.json"), json.dumps(records).encode())

    def records_up_to(self, step: int) -> list[dict]:
        """Every stored record of steps up to ``step``, oldest first."""
        from pyarrow import fs

        directory = self.path(RECORDS)
        if not self._exists(directory):
            return []
        names = sorted(info.base_name for info in self.fs.get_file_info(fs.FileSelector(directory))
                       if info.base_name.startswith("step_") and info.base_name.endswith(".json"))
        records = []
        for name in names:
            if step_of(name.removesuffix(".json")) <= step:
                records += [r for r in json.loads(self._read_bytes(f"{directory}/{name}")) if r["step"] <= step]
        return records

    def has_part(self, name: str, part: str) -> bool:
        """Whether ``name`` has a complete ``part`` (its completion record was written)."""
        return self._exists(self.path(name, f"{part}.json"))

    def put_part(self, local: Path, name: str, part: str) -> None:
        """Adds a finished local directory as ``name/part`` to a complete checkpoint: its files under their
        final names, then its completion record ``name/part.json`` (so a crash leaves no usable half)."""
        record_path = self.path(name, f"{part}.json")
        if self._exists(record_path):
            self.fs.delete_file(record_path)
        if self._exists(self.path(name, part)):
            self.fs.delete_dir(self.path(name, part))
        files = self.upload(local, name, part)
        self._write_atomic(record_path, _record_bytes({FILES: files}))


@dataclass(frozen=True)
class ResumePoint:
    """What every rank needs to resume: decided once, by the driver, before any worker starts."""

    store_uri: str
    name: str
    step: int
    saved_ranks: int
    reader: dict
    universal: bool = False  # load DeepSpeed's universal form (a different anchor rank count)

    @property
    def ds_parts(self) -> tuple[str, ...]:
        return (UNIVERSAL,) if self.universal else ("ds",)


def save_checkpoint(engine, store: CheckpointStore, step: int, reader_state: dict, meta: dict, keep: int) -> str | None:
    """Collective over the anchor ranks. Returns the published name on anchor rank 0."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    name = checkpoint_name(step)
    if rank == 0:
        store.begin(step)
    dist.barrier()
    with tempfile.TemporaryDirectory(prefix="calm-stage-") as staging:
        staging = Path(staging)
        with _quiet():
            engine.save_checkpoint(str(staging / "ds"), tag=name, exclude_frozen_parameters=True, save_latest=False)
        for script in (staging / "ds").glob("*.py"):  # DeepSpeed's recovery scripts: launcher.export does that
            script.unlink(missing_ok=True)
        (staging / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_states(), staging / "rng" / f"rank_{rank:05d}.pt")
        files = store.upload(staging, name)
    files_by_rank: list = [None] * world
    dist.all_gather_object(files_by_rank, files)
    published = None
    if rank == 0:
        published = store.publish(step, {**meta, "step": step, "anchor_ranks": world, "reader": reader_state,
                                          "created": time.time()}, files_by_rank, keep)
    dist.barrier()
    return published


def load_checkpoint(engine, point: ResumePoint, rank: int) -> None:
    """Every anchor rank: composition weights, optimizer shard, LR schedule, step count and RNG."""
    store = CheckpointStore(point.store_uri)
    directory = store.fetch(point.name, *point.ds_parts)
    with _quiet():
        path, _ = engine.load_checkpoint(str(directory), tag=point.name, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint {point.name} in {directory}")
    rng_file = store.fetch(point.name, "rng") / f"rank_{rank:05d}.pt"
    if point.saved_ranks == engine.dp_world_size and rng_file.is_file():
        restore_rng_states(torch.load(rng_file, weights_only=False))


def make_universal(store: CheckpointStore, name: str) -> None:
    """DeepSpeed's universal form of ``name`` (once; again if the stored one is damaged): loadable at
    any anchor rank count."""
    if store.has_part(name, UNIVERSAL) and store.damage(name, UNIVERSAL) is None:
        return
    from deepspeed.checkpoint import ds_to_universal

    source = store.fetch(name, "ds") / name
    with tempfile.TemporaryDirectory(prefix="calm-universal-") as work:
        output = Path(work) / UNIVERSAL
        args = argparse.Namespace(input_folder=str(source), output_folder=str(output / name), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
        with _quiet():
            ds_to_universal.main(args)
        store.put_part(output, name, UNIVERSAL)


def run_identity(base_models: dict[str, str], composition: dict, data_fingerprint: str, config: dict,
                 tokenizer: str | None = None) -> dict:
    """What a checkpoint must match to be resumed: the base models' weights (``{"anchor": dir, "augment":
    dir, "augment_1": dir, ...}``), the resolved composition, the data and the global batch size. The full
    config and the tokenizer's directory are recorded with it (for exports), not compared."""
    from calm_dist.identity import weights_checksum

    return {"base_models": {side: {"path": str(path), "sha256": weights_checksum(path)}
                            for side, path in sorted(base_models.items())},
            "composition": composition, "data": data_fingerprint, "config": config, "tokenizer": tokenizer}


def check_resumable(meta: dict, identity: dict) -> None:
    """ValueError (before any worker starts) when the checkpoint was trained against something else."""
    where = f"checkpoint {checkpoint_name(meta['step'])}"
    then_sides, now_sides = sorted(meta["base_models"]), sorted(identity["base_models"])
    if then_sides != now_sides:
        raise ValueError(f"{where} was trained with the base models {then_sides}, this run has {now_sides} "
                         "(the augmenting models changed): resume with the same models, or start a new run (another "
                         "run.name or checkpoint.dir)")
    for side, now in identity["base_models"].items():
        then = meta["base_models"][side]
        if then["sha256"] != now["sha256"]:
            raise ValueError(
                f"{where} was trained with the {side} model {then['path']} (sha256 {then['sha256'][:12]}…), but the "
                f"{side} model is now {now['path']} (sha256 {now['sha256'][:12]}…): its composition weights only fit "
                "the models they were trained with. Restore those weights, or start a new run (another run.name "
                "or checkpoint.dir).")
    _require_same(where, "the composition (connections, relative_scale, composition.seed or run.seed)",
                  meta["composition"], identity["composition"])
    _require_same(where, "the data (data.* and the files they name)", meta["data"], identity["data"])
    _require_same(where, "train.batch_size", meta["config"]["train"]["batch_size"],
                  identity["config"]["train"]["batch_size"])


def _require_same(where: str, key: str, then, now) -> None:
    if then != now:
        raise ValueError(f"{where} was trained with {key}={then!r}, this run has {now!r}: resume with "
                         f"the same value, or start a new run (another run.name or checkpoint.dir)")


def find_resume_point(store: CheckpointStore, identity: dict, anchor_ranks: int,
                      on_fallback: Callable[[str], None] | None = None) -> ResumePoint | None:
    """The newest intact complete checkpoint up to ``latest``, checked against this run and made loadable
    at ``anchor_ranks``; None when there is none.

    Every file of the chosen checkpoint is checked against the size and sha256 written at save time. A
    damaged checkpoint (truncated or changed file, missing file, damaged meta.json) is passed over for
    the previous complete one, and a line saying so goes to ``on_fallback`` (default: a warning on the
    ``calm_dist.checkpoint`` logger). A checkpoint trained against other models or settings is refused
    (``ValueError``), not passed over.
    """
    report = on_fallback or log.warning
    damaged = []
    for name in store.resume_candidates():
        problem = store.damage(name)
        if problem is not None:
            damaged.append(name)
            report(f"checkpoint {name} in {store.uri} is damaged ({problem}): passing over it")
            continue
        meta = store.meta(name)
        check_resumable(meta, identity)
        if damaged:
            report(f"resuming from {name}, the newest intact checkpoint, instead of {damaged[0]}")
        universal = meta["anchor_ranks"] != anchor_ranks
        if universal:
            make_universal(store, name)
        return ResumePoint(store.uri, name, meta["step"], meta["anchor_ranks"], meta["reader"], universal)
    if damaged:
        report(f"no intact checkpoint in {store.uri} (damaged: {', '.join(damaged)}): starting from step 0")
    return None


def prepare_checkpointing(checkpoint, run_dir: Path, identity: dict, anchor_ranks: int,
                          on_fallback: Callable[[str], None] | None = None) -> tuple:
    """(store, resume point) for a run with ``checkpoint.every_steps > 0`` (the config's checkpoint section),
    else Nones. Raises ValueError, before any worker starts, when the latest checkpoint does not fit this run;
    a damaged checkpoint is passed over as ``find_resume_point`` says."""
    if not checkpoint.every_steps:
        return None, None
    store = CheckpointStore(checkpoint.dir or str(Path(run_dir) / "checkpoints"))
    return store, find_resume_point(store, identity, anchor_ranks, on_fallback)


def consolidated_composition(store: CheckpointStore, name: str) -> dict[str, torch.Tensor]:
    """The full fp32 composition weights of a checkpoint, gathered from its rank shards (one process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _quiet():
        state = get_fp32_state_dict_from_zero_checkpoint(str(store.fetch(name, "ds")), tag=name,
                                                         exclude_frozen_parameters=True)
    return {key: value for key, value in state.items() if key.startswith("bridges.")}


def rng_states() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng_states(states: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


@contextlib.contextmanager
def _quiet():
    """DeepSpeed and the universal converter print per-file progress to stdout; keep it out of the job's."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
