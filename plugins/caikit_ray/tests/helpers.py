"""Module-level helpers the tests hand to Ray actors (they must import where they run)."""

from __future__ import annotations

import os
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import attrs

from caikit_core.stages.base import BatchRunner, WorkerSpec


@attrs.frozen
class PidReportingSpec:
    """``inner``, built as usual, in an actor that writes its PID into ``folder`` and
    takes at least ``delay`` seconds per batch (so a test can kill it mid-stage)."""

    inner: WorkerSpec
    folder: str
    delay: float

    def build(self) -> SlowRunner:
        Path(self.folder, str(os.getpid())).write_text("", encoding="utf-8")
        return SlowRunner(self.inner.build(), self.delay)


class SlowRunner:
    """A built worker that sleeps ``delay`` seconds before each batch."""

    def __init__(self, inner: BatchRunner, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def __call__(self, key: Hashable, batch: list[Any]) -> list[Any]:
        time.sleep(self.delay)
        return self.inner(key, batch)
