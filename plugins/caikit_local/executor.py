"""The ``local`` executor: batches run one after another in this process.

It builds the stage's worker once per ``map`` (the worker's plugins come from the
process cache, so stages on the same model share it) and shows a progress bar
(items, rate, ETA) on stderr unless logging for ``caikit`` is quieter than INFO
(``caikit --quiet``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

from caikit_core.interfaces import WorkerFactory
from caikit_local.config import LocalExecutorConfig


class LocalExecutor:
    """Runs each batch in turn in the calling process, in the order given."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, config: LocalExecutorConfig) -> None:
        self.config = config

    def show_progress(self) -> bool:
        return (
            self.config.progress and logging.getLogger("caikit").getEffectiveLevel() <= logging.INFO
        )

    def map(
        self,
        worker: WorkerFactory,
        batches: Iterable[tuple[Hashable, list[Any]]],
        *,
        total: int,
        describe: str,
    ) -> Iterator[tuple[Hashable, list[Any]]]:
        run = worker.build()
        if not self.show_progress():
            for key, batch in batches:
                yield key, run(key, batch)
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
            for key, batch in batches:
                out = run(key, batch)
                progress.advance(task, len(batch))
                speed = progress.tasks[0].speed
                progress.update(task, rate=f"{speed:.2f} it/s" if speed else "")
                yield key, out
