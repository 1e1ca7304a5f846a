"""Backend-neutral parts of resumable checkpoints: when to save, which files a
checkpoint folder may hold, and how a folder is written so that a kill while saving
leaves the previous checkpoint in force.

A fit that runs with ``checkpoint_dir`` (the stage's ``checkpoints/`` folder, see
:data:`caikit_core.interfaces.RESUMABLE`) saves one folder per checkpoint under it,
``step-<N>``, written as ``.step-<N>.tmp`` and renamed once complete (its
:data:`MARKER` is written last). Only the newest complete checkpoint is kept.
A backend (``caikit_torch.checkpoints``, ``caikit_jax.checkpoints``) fills the folder
with safetensors and JSON files; :func:`check_safe_files` refuses a folder holding
anything else (a pickle above all) before anything is read from it.

This module imports nothing beyond the standard library and :mod:`caikit_core.errors`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caikit_core.errors import PluginError

__all__ = ["MARKER", "SAFE_SUFFIXES", "Schedule", "check_safe_files", "latest", "write"]

#: Written last into a checkpoint folder: its step and what wrote it.
MARKER = "caikit_checkpoint.json"
#: The file suffixes a checkpoint folder may hold (tokenizers add text files such as
#: ``merges.txt``; ``.jinja`` chat templates).
SAFE_SUFFIXES = (".safetensors", ".json", ".txt", ".jinja")

_PREFIX = "step-"


class Schedule:
    """When to save: every ``every_steps`` steps and/or after the first step that ends
    ``every_minutes`` minutes after the last save (or the start)."""

    def __init__(self, every_steps: int | None, every_minutes: float | None) -> None:
        self.every_steps = every_steps
        self.every_minutes = every_minutes
        self.last = time.monotonic()

    def due(self, steps_done: int) -> bool:
        """Whether to save now that ``steps_done`` steps are complete."""
        if self.every_steps is not None and steps_done % self.every_steps == 0:
            return True
        if self.every_minutes is not None:
            return time.monotonic() - self.last >= 60.0 * self.every_minutes
        return False

    def saved(self) -> None:
        self.last = time.monotonic()


def check_safe_files(folder: Path, *, who: str) -> None:
    """Refuse a checkpoint folder holding a file that is not safetensors, JSON or text
    (a pickle ``.pt``/``.pth``/``.bin``/``.pkl`` above all), before anything is read
    from it; ``who`` (the backend) starts the message."""
    bad = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(SAFE_SUFFIXES)
    )
    if bad:
        raise PluginError(
            f"{who}: checkpoint {folder} holds files that are not safetensors or JSON "
            f"({', '.join(bad[:5])}); refusing to resume from it"
        )


def _step(folder: Path) -> int | None:
    if not folder.name.startswith(_PREFIX) or not (folder / MARKER).is_file():
        return None
    try:
        return int(folder.name[len(_PREFIX) :])
    except ValueError:
        return None


def latest(root: Path | None, *, who: str) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``None``: none yet),
    checked with :func:`check_safe_files`."""
    if root is None or not root.is_dir():
        return None
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step(p)) is not None]
    if not found:
        return None
    folder = max(found)[1]
    check_safe_files(folder, who=who)
    return folder


def write(
    root: Path, step: int, fill: Callable[[Path], None], marker: dict[str, Any], *, who: str
) -> Path:
    """Save checkpoint ``step`` under ``root``: ``fill(folder)`` writes its files into a
    temporary folder, :data:`MARKER` (``marker`` plus the step) goes in last, the
    folder is renamed to ``step-<step>`` and older checkpoints are removed."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{_PREFIX}{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    fill(tmp)
    check_safe_files(tmp, who=who)
    (tmp / MARKER).write_text(json.dumps({**marker, "step": step}, indent=2), encoding="utf-8")
    final = root / f"{_PREFIX}{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for other in root.iterdir():
        if other != final and (other.name.startswith(_PREFIX) or other.name.startswith(".")):
            shutil.rmtree(other, ignore_errors=True)
    return final
