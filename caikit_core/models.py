"""The local model cache: ``$CAIKIT_CACHE/models/<alias>`` (default ``~/.cache/caikit``).

A run file may name a model by a cache alias (e.g. ``smollm2-135m-instruct``);
:func:`resolve_alias` turns a fetched alias into its folder and leaves any other
name (a hub id) unchanged. Filling the cache is a plugin's job: the ``hf``
plugin's ``caikit models fetch`` (:mod:`caikit_hf.models`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "resolve_alias"]


def cache_dir() -> Path:
    """Where caikit keeps fetched models."""
    root = os.environ.get("CAIKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "caikit"
    return base / "models"


def resolve_alias(name: str) -> str:
    """The cached folder for alias ``name`` if it was fetched, else ``name`` itself."""
    folder = cache_dir() / name
    if (folder / "config.json").is_file():
        return str(folder)
    return name
