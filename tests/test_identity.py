"""Base-model identity: a sha256 over the weight files, each file hashed once and remembered."""
import hashlib
import json
import os

import pytest

from calm_dist import identity


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    identity._cached_sha256.cache_clear()
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "model-00001.safetensors").write_bytes(b"a" * 1000)
    (directory / "model-00002.safetensors").write_bytes(b"b" * 1000)
    (directory / "config.json").write_text("{}")
    return directory


def test_checksum_is_remembered_across_processes_and_follows_the_content(model_dir, tmp_path):
    first = identity.weights_checksum(model_dir)
    cached = json.loads((tmp_path / "cache" / "calm_dist" / "file_sha256.json").read_text())
    assert len(cached) == 2
    identity._cached_sha256.cache_clear()  # a new process: only the file cache is left
    poisoned = {key: "f" * 64 for key in cached}
    (tmp_path / "cache" / "calm_dist" / "file_sha256.json").write_text(json.dumps(poisoned))
    assert identity.weights_checksum(model_dir) != first  # the remembered digests were used, not the files
    shard = model_dir / "model-00002.safetensors"
    shard.write_bytes(b"c" * 1000)
    os.utime(shard, ns=(1, 1))  # a changed file has another mtime: hashed again
    identity._cached_sha256.cache_clear()
    assert identity.file_sha256(shard) == hashlib.sha256(b"c" * 1000).hexdigest()


def test_a_hub_blob_is_named_by_its_sha256(model_dir, tmp_path):
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    content = b"weights"
    blob = blobs / hashlib.sha256(content).hexdigest()
    blob.write_bytes(b"not read")  # a hub blob is never read: its name is its sha256
    snapshot = tmp_path / "hub" / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blob)
    assert identity.file_sha256(snapshot / "model.safetensors") == hashlib.sha256(content).hexdigest()


def test_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weight files"):
        identity.weights_checksum(tmp_path)
