"""The ``local`` executor: batches run one after another in this process.

It shows a progress bar (items, rate, ETA) on stderr unless logging for
``caikit`` is quieter than INFO (``caikit --quiet``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from caikit_core import hookimpl
from caikit_core.hookspecs import Register
from caikit_core.interfaces import BatchFn


@attrs.frozen
class LocalExecutorConfig:
    """Settings of the local executor."""

    progress: bool = True


class LocalExecutor:
    """Runs each batch in turn in the calling process."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, config: LocalExecutorConfig) -> None:
        self.config = config

    def _show_progress(self) -> bool:
        return (
            self.config.progress and logging.getLogger("caikit").getEffectiveLevel() <= logging.INFO
        )

    def map(
        self,
        fn: BatchFn[Any, Any],
        batches: Iterable[list[Any]],
        *,
        total: int,
        describe: str,
    ) -> Iterator[list[Any]]:
        if not self._show_progress():
            for batch in batches:
                yield fn(batch)
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        console = Console(file=sys.stderr)
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(describe, total=total, rate="")
            for batch in batches:
                out = fn(batch)
                progress.advance(task, len(batch))
                speed = progress.tasks[0].speed
                progress.update(task, rate=f"{speed:.2f} it/s" if speed else "")
                yield out


def build_local_executor(config: LocalExecutorConfig) -> LocalExecutor:
    """Run batches one after another in this process, with a progress bar."""
    return LocalExecutor(config)


@hookimpl
def register_executors(register: Register) -> None:
    register("local", build_local_executor, config=LocalExecutorConfig)
