"""Sharded composition-only checkpoints: layout, atomic publication, retention, resharding on load.

Layout under the checkpoint root (``checkpoint.dir``: a local or shared directory, or any
``pyarrow.fs`` URI such as ``s3://bucket/run``)::

    latest                      name of the newest complete checkpoint; written last, atomically
    step_000000040/
        meta.json               step, anchor ranks, data position, base models (path, sha256), config
        ds/step_000000040/      DeepSpeed's files: composition weights + each rank's optimizer shard
        rng/rank_00000.pt       each anchor rank's RNG states
        universal/...           DeepSpeed universal form, made on demand to resume at another rank count
    .partial-step_000000060/    being written: never loaded, replaced or removed by later saves

A checkpoint directory appears under its final name only once every rank's files are in it
(rename of the partial directory), and ``latest`` moves only after that. The frozen models are
never written: ``save_checkpoint(exclude_frozen_parameters=True)``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LATEST, META, PARTIAL, RECORDS = "latest", "meta.json", ".partial-", "records"


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def step_of(name: str) -> int:
    return int(name.split("_", 1)[1])


class CheckpointStore:
    """One run's checkpoints on a local path or a ``pyarrow.fs`` URI."""

    def __init__(self, root: str):
        from pyarrow import fs

        self.uri = str(root)
        if "://" in self.uri:
            self.fs, self.root = fs.FileSystem.from_uri(self.uri)
            self.local = False
        else:
            self.fs, self.root, self.local = fs.LocalFileSystem(), os.path.abspath(self.uri), True
        self._fetched: Path | None = None  # local copies of a remote store's checkpoints

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(path).type != fs.FileType.NotFound

    def _write_text(self, path: str, text: str) -> None:
        """Atomic where the filesystem renames atomically (local, shared POSIX): temp file, then move."""
        temp = f"{path}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(temp) as out:
            out.write(text.encode())
        self.fs.move(temp, path)

    def _read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as handle:
            return handle.read().decode()

    def latest(self) -> str | None:
        """The newest complete checkpoint, or None."""
        marker = self.path(LATEST)
        if not self._exists(marker):
            return None
        name = self._read_text(marker).strip()
        if not self._exists(self.path(name, META)):
            raise RuntimeError(f"{marker} names {name!r}, which has no {META}: the checkpoint store was "
                               "modified by hand; remove the marker or restore the checkpoint")
        return name

    def meta(self, name: str) -> dict:
        return json.loads(self._read_text(self.path(name, META)))

    def complete(self) -> list[str]:
        from pyarrow import fs

        if not self._exists(self.root):
            return []
        infos = self.fs.get_file_info(fs.FileSelector(self.root))
        names = [i.base_name for i in infos if i.type == fs.FileType.Directory and i.base_name.startswith("step_")]
        return sorted(name for name in names if self._exists(self.path(name, META)))

    # --- writing (anchor ranks) ---

    def staging_dir(self, step: int) -> Path:
        """Where this rank writes its files for ``step``: the partial directory itself on a local or
        shared path, else a local temporary directory uploaded by ``upload``."""
        name = PARTIAL + checkpoint_name(step)
        if self.local:
            return Path(self.path(name))
        return Path(tempfile.mkdtemp(prefix="calm-stage-")) / name

    def clear_partial(self, step: int) -> None:
        partial = self.path(PARTIAL + checkpoint_name(step))
        if self._exists(partial):
            self.fs.delete_dir(partial)
        self.fs.create_dir(partial, recursive=True)

    def upload(self, staging: Path) -> None:
        if self.local:
            return
        from pyarrow import fs

        fs.copy_files(str(staging), self.path(staging.name), destination_filesystem=self.fs)
        shutil.rmtree(staging.parent, ignore_errors=True)

    def publish(self, step: int, meta: dict, keep: int) -> str:
        """Anchor rank 0, once every rank's files are in the partial directory."""
        name = checkpoint_name(step)
        partial = self.path(PARTIAL + name)
        with self.fs.open_output_stream(f"{partial}/{META}") as out:
            out.write(json.dumps(meta, indent=1).encode())
        if self._exists(self.path(name)):  # an older run's checkpoint of the same step, superseded
            self.fs.delete_dir(self.path(name))
        self.fs.move(partial, self.path(name))
        self._write_text(self.path(LATEST), name)
        self.prune(keep, name)
        return name

    def prune(self, keep: int, newest: str) -> None:
        """Keeps the ``keep`` newest complete checkpoints up to ``newest``; removes stale partials."""
        from pyarrow import fs

        complete = [n for n in self.complete() if n <= newest]
        for name in complete[:-keep] if keep > 0 else []:
            self.fs.delete_dir(self.path(name))
        for info in self.fs.get_file_info(fs.FileSelector(self.root)):
            if info.base_name.startswith(PARTIAL) and info.base_name[len(PARTIAL):] <= newest:
                self.fs.delete_dir(info.path)

    # --- reading ---

    def fetch(self, name: str, *parts: str) -> Path:
        """A local directory holding ``name/parts`` (downloaded once when the store is remote)."""
        if self.local:
            return Path(self.path(name, *parts))
        from pyarrow import fs

        if self._fetched is None:
            self._fetched = Path(tempfile.mkdtemp(prefix="calm-ckpt-"))
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
        self._write_text(self.path(RECORDS, f"{checkpoint_name(step)}.json"), json.dumps(records))

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
                records += [r for r in json.loads(self._read_text(f"{directory}/{name}")) if r["step"] <= step]
        return records

    def put_dir(self, local: Path, name: str, *parts: str) -> None:
        """Adds a finished local directory under a complete checkpoint, atomically where possible."""
        from pyarrow import fs

        final = self.path(name, *parts)
        temp = f"{final}.tmp-{os.getpid()}"
        if self.local:
            shutil.copytree(local, temp, dirs_exist_ok=True)
        else:
            fs.copy_files(str(local), temp, destination_filesystem=self.fs)
        self.fs.move(temp, final)


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
        return ("universal",) if self.universal else ("ds",)


def save_checkpoint(engine, store: CheckpointStore, step: int, reader_state: dict, meta: dict, keep: int) -> str | None:
    """Collective over the anchor ranks. Returns the published name on anchor rank 0."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    name = checkpoint_name(step)
    if rank == 0:
        store.clear_partial(step)
    dist.barrier()
    staging = store.staging_dir(step)
    with _quiet():
        engine.save_checkpoint(str(staging / "ds"), tag=name, exclude_frozen_parameters=True, save_latest=False)
    for script in (staging / "ds").glob("*.py"):  # DeepSpeed's recovery scripts: launcher.export does that
        script.unlink(missing_ok=True)
    (staging / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_states(), staging / "rng" / f"rank_{rank:05d}.pt")
    store.upload(staging)
    dist.barrier()
    published = None
    if rank == 0:
        _check_every_rank_wrote(store, step, world)
        published = store.publish(step, {**meta, "step": step, "anchor_ranks": world, "reader": reader_state,
                                         "created": time.time()}, keep)
    dist.barrier()
    return published


def _check_every_rank_wrote(store: CheckpointStore, step: int, world: int) -> None:
    partial = PARTIAL + checkpoint_name(step)
    missing = [rank for rank in range(world) if not store.has(partial, "rng", f"rank_{rank:05d}.pt")]
    if missing:
        raise RuntimeError(
            f"anchor ranks {missing} wrote their checkpoint files where rank 0 cannot see them: "
            f"checkpoint.dir={store.uri!r} must be a shared filesystem or a URI (s3://, gs://, hdfs://) "
            "reachable from every node")


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
    """DeepSpeed's universal form of ``name`` (once): loadable at any anchor rank count."""
    if store.has(name, "universal"):
        return
    from deepspeed.checkpoint import ds_to_universal

    source = store.fetch(name, "ds") / name
    with tempfile.TemporaryDirectory(prefix="calm-universal-") as work:
        output = Path(work) / "universal"
        args = argparse.Namespace(input_folder=str(source), output_folder=str(output / name), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
        with _quiet():
            ds_to_universal.main(args)
        store.put_dir(output, name, "universal")


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
    _require_same(where, "the composition (connections, relative_scale, run.seed)", meta["composition"],
                  identity["composition"])
    _require_same(where, "the data (data.* and the files they name)", meta["data"], identity["data"])
    _require_same(where, "train.batch_size", meta["config"]["train"]["batch_size"],
                  identity["config"]["train"]["batch_size"])


def _require_same(where: str, key: str, then, now) -> None:
    if then != now:
        raise ValueError(f"{where} was trained with {key}={then!r}, this run has {now!r}: resume with "
                         f"the same value, or start a new run (another run.name or checkpoint.dir)")


def find_resume_point(store: CheckpointStore, identity: dict, anchor_ranks: int) -> ResumePoint | None:
    """The latest complete checkpoint, checked against this run and made loadable at ``anchor_ranks``."""
    name = store.latest()
    if name is None:
        return None
    meta = store.meta(name)
    check_resumable(meta, identity)
    universal = meta["anchor_ranks"] != anchor_ranks
    if universal:
        make_universal(store, name)
    return ResumePoint(store.uri, name, meta["step"], meta["anchor_ranks"], meta["reader"], universal)


def prepare_checkpointing(checkpoint, run_dir: Path, identity: dict, anchor_ranks: int) -> tuple:
    """(store, resume point) for a run with ``checkpoint.every_steps > 0`` (the config's checkpoint section),
    else Nones. Raises ValueError, before any worker starts, when the latest checkpoint does not fit this run."""
    if not checkpoint.every_steps:
        return None, None
    store = CheckpointStore(checkpoint.dir or str(Path(run_dir) / "checkpoints"))
    return store, find_resume_point(store, identity, anchor_ranks)


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
