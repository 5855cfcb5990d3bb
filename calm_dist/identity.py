"""The identity of a saved base model: a sha256 over its weight files.

Checkpoints and exports record it, so that composition weights are never loaded over other base
models. Hashing a 70B model's ~140 GB takes minutes, so each file's digest is computed once and
remembered, keyed by the file's resolved path, size and modification time, in
``$XDG_CACHE_HOME/calm_dist/file_sha256.json`` (``~/.cache`` by default). A file in a Hugging Face
hub cache (a link into ``blobs/<sha256>``) is not read at all: its blob's name is its sha256.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin")
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def weight_files(path: str | os.PathLike) -> list[Path]:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    return sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)


def weights_checksum(path: str | os.PathLike) -> str:
    """sha256 over the (name, sha256) of every weight file of a saved model directory."""
    files = weight_files(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def file_sha256(file: Path) -> str:
    resolved = file.resolve()
    if resolved.parent.name == "blobs" and _HUB_BLOB.fullmatch(resolved.name):
        return resolved.name
    stat = resolved.stat()
    return _cached_sha256(str(resolved), stat.st_size, stat.st_mtime_ns)


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "calm_dist" / "file_sha256.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=256)
def _cached_sha256(resolved: str, size: int, mtime_ns: int) -> str:
    key = f"{resolved}|{size}|{mtime_ns}"
    cache = _cache_file()
    known = _read_cache(cache).get(key)
    if known:
        return known
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    try:  # best effort: another process may write the same file; the last complete write wins
        cache.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read_cache(cache), key: value}
        temporary = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(entries))
        os.replace(temporary, cache)
    except OSError:
        pass
    return value
