"""Adapters between caikit's records and files outside a run directory: prompt
files (:mod:`caikit_core.io.prompts`), Hugging Face CAI datasets
(:mod:`caikit_core.io.export`) and Human/Assistant transcripts
(:mod:`caikit_core.io.transcripts`); and :func:`atomic_path`, how they write."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path`` to write; when the block completes it is
    synced to disk and renamed onto ``path``, so readers never see half a file.
    If the block raises, the temporary file is removed and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the umask's permissions
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
