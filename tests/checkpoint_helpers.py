"""Checkpoint-store checks shared by the local and the S3 tests: the same assertions on either filesystem."""
from __future__ import annotations

import tempfile
from pathlib import Path

from calm_dist.checkpoint import CheckpointStore, checkpoint_name

# What check_resumable reads, for stores filled with stand-in files (no models, no config file).
FAKE_IDENTITY = {"base_models": {"anchor": {"path": "/models/anchor", "sha256": "a" * 64}},
                 "composition": {"connections": [[[0, 0]]], "relative_scale": False, "seed": 0},
                 "data": "data-fake", "config": {"train": {"batch_size": 8}}, "tokenizer": None}


def write_fake_files(store: CheckpointStore, step: int, payload: bytes) -> dict:
    """One rank's part of a save of ``step`` with stand-in files; returns what ``upload`` records."""
    with tempfile.TemporaryDirectory() as staging:
        (Path(staging) / "ds").mkdir()
        (Path(staging) / "ds" / "shard.pt").write_bytes(payload)
        (Path(staging) / "rng").mkdir()
        (Path(staging) / "rng" / "rank_00000.pt").write_bytes(payload[::-1])
        return store.upload(Path(staging), checkpoint_name(step))


def publish_fake(store: CheckpointStore, step: int, keep: int, payload: bytes | None = None) -> str:
    store.begin(step)
    files = write_fake_files(store, step, payload or f"weights of step {step} ".encode() * 64)
    meta = {**FAKE_IDENTITY, "step": step, "anchor_ranks": 1, "reader": {"position": step}}
    return store.publish(step, meta, [files], keep)


def check_store_semantics(store: CheckpointStore) -> None:
    """Publication, retention, crashed saves and read-back, through the store's own listing."""
    assert store.latest() is None and store.complete() == []
    for step in (2, 4, 6):
        publish_fake(store, step, keep=2, payload=str(step).encode() * 100)
    assert store.complete() == [checkpoint_name(4), checkpoint_name(6)]
    assert store.latest() == checkpoint_name(6)
    store.begin(8)  # a save that crashed after writing its files under their final names
    write_fake_files(store, 8, b"half")
    assert store.has(checkpoint_name(8), "ds", "shard.pt") and not store.has(checkpoint_name(8), "meta.json")
    assert store.latest() == checkpoint_name(6) and checkpoint_name(8) not in store.complete()
    assert (store.fetch(checkpoint_name(6), "ds") / "shard.pt").read_bytes() == b"6" * 100
    assert store.damage(checkpoint_name(6)) is None
    publish_fake(store, 10, keep=2)
    assert not store.has(checkpoint_name(8))  # the crashed save is gone
    assert store.complete() == [checkpoint_name(6), checkpoint_name(10)]
    assert store.meta(checkpoint_name(10))["files"].keys() == {"ds/shard.pt", "rng/rank_00000.pt"}
