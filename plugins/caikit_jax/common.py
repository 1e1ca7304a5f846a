"""What the ``jax`` plugins' implementation modules share: checkpoint folders, the
weights' dtype, padded batch widths and the JSON records saved beside checkpoints.

This module imports neither JAX nor Tunix at import time; it never imports
:mod:`caikit_jax.plugin`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from caikit_core.errors import PluginError

__all__ = ["RL_RECORD", "SFT_RECORD", "WHO", "bucket", "checkpoint_folder", "write_record"]

#: The record written next to an SFT checkpoint.
SFT_RECORD = "caikit_sft.json"
#: The record written next to an RL checkpoint.
RL_RECORD = "caikit_rl.json"
#: How the policy optimiser names itself in errors.
WHO = "jax policy optimiser"


def checkpoint_folder(name: str, what: str) -> Path:
    """The local Hugging Face checkpoint folder ``name``, or a :class:`PluginError`."""
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise PluginError(
            f"{WHO}: {what} folder {folder} is not a local Hugging Face checkpoint (no config.json)"
        )
    return folder


def bucket(length: int, limit: int) -> int:
    """The padded length for a batch whose longest sequence has ``length`` tokens."""
    size = 16
    while size < length:
        size *= 2
    return max(length, min(size, limit))


def write_record(
    path: Path,
    base: Path,
    config: Any,
    metrics: dict[str, float],
    losses: list[tuple[int, float]],
) -> None:
    """Write the JSON record of a training run (settings, metrics, losses, versions)."""
    from caikit_jax.model import versions

    record = {
        "base": str(base),
        "backend": "jax",
        "config": attrs.asdict(config),
        "metrics": metrics,
        "losses": losses,
        "versions": versions(),
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
