"""What the ``jax`` plugins' implementation modules share: checkpoint folders, the
weights' dtype, padded batch widths (:func:`bucket`) and the JSON records saved beside checkpoints.

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
    """The padded length for a batch whose longest sequence has ``length`` tokens.

    At least 16; above that, ``length`` rounded up to a multiple of a quarter of the
    largest power of two below it (17-20 -> 20, 65-80 -> 80, 97-112 -> 112, 129-160 ->
    160): four widths per octave, so a batch is padded by under 25% (powers of two
    padded the quickstart's SFT batches of 78-99 tokens to 128, 39% more than their
    tokens) while the step compiles for few shapes. Never above ``limit`` unless
    ``length`` is.
    """
    if length <= 16:
        size = 16
    else:
        step = (1 << ((length - 1).bit_length() - 1)) // 4
        size = -(-length // step) * step
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
