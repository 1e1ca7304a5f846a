"""Content hashes of files, cached so that a rerun does not rehash gigabytes.

:func:`file_sha256` hashes a file's bytes and remembers the result in
``$CAIKIT_CACHE/hashes.json`` (default ``~/.cache/caikit/hashes.json``), keyed by
the file's resolved path, size, ``mtime_ns``, ``ctime_ns`` and inode: a file
rewritten in place or replaced by another one changes at least one of them, and
then it is hashed again. A file modified less than :data:`SETTLE_SECONDS` ago is
hashed but not remembered (it may still be changing within one timestamp tick).

The cache is only an optimisation. A missing, unreadable or corrupt cache file is
ignored (and rewritten at the next store); concurrent writers each read, merge and
replace the file atomically, so the worst a race costs is a hash computed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("caikit.hashing")

__all__ = ["MAX_ENTRIES", "SETTLE_SECONDS", "cache_file", "file_sha256"]

#: entries kept in the cache file (the least recently stored are dropped beyond it)
MAX_ENTRIES = 20_000
#: a file changed more recently than this is not remembered
SETTLE_SECONDS = 2.0


def cache_file() -> Path:
    """Where the hashes are remembered: ``$CAIKIT_CACHE/hashes.json``."""
    root = os.environ.get("CAIKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "caikit"
    return base / "hashes.json"


def _key(path: Path, st: os.stat_result) -> str:
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def _load(file: Path) -> dict[str, Any]:
    """The cache's entries; ``{}`` for a missing or bad cache file (never an error)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {
        k: v
        for k, v in entries.items()
        if isinstance(v, dict) and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64
    }


def _store(file: Path, new: dict[str, dict[str, Any]]) -> None:
    """Merge ``new`` into the cache file atomically; a failure only logs."""
    try:
        entries = _load(file)
        entries.update(new)
        if len(entries) > MAX_ENTRIES:
            newest = sorted(entries.items(), key=lambda kv: kv[1].get("at", 0.0))[-MAX_ENTRIES:]
            entries = dict(newest)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(json.dumps({"version": 1, "entries": entries}), encoding="utf-8")
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("file-hash cache %s not written: %s", file, exc)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: this process's hashes by cache key (the cache file is read once per call, this not at all)
_memo: dict[str, str] = {}


def file_sha256(paths: list[Path]) -> list[str]:
    """The sha256 of each file's bytes, from the cache where the file is unchanged.

    :raises OSError: a file cannot be read.
    """
    file = cache_file()
    cached: dict[str, Any] | None = None
    out: list[str] = []
    new: dict[str, dict[str, Any]] = {}
    now = time.time()
    for path in paths:
        resolved = path.resolve()
        st = resolved.stat()
        key = _key(resolved, st)
        if key in _memo:
            out.append(_memo[key])
            continue
        if cached is None:
            cached = _load(file)
        hit = cached.get(key)
        if hit is not None:
            _memo[key] = hit["sha256"]
            out.append(hit["sha256"])
            continue
        digest = _sha256(resolved)
        if resolved.stat().st_mtime_ns == st.st_mtime_ns and now - st.st_mtime > SETTLE_SECONDS:
            new[key] = {"sha256": digest, "at": now}
            _memo[key] = digest
        out.append(digest)
    if new:
        _store(file, new)
    return out
