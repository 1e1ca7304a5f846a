"""The ``local`` executor's registration (see :mod:`caikit_local.executor`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from caikit_core import hookimpl
from caikit_core.hookspecs import Register
from caikit_local.config import LocalExecutorConfig

if TYPE_CHECKING:
    from caikit_local.executor import LocalExecutor


def build_local_executor(config: LocalExecutorConfig) -> LocalExecutor:
    """Run batches one after another in this process, with a progress bar."""
    from caikit_local.executor import LocalExecutor

    return LocalExecutor(config)


@hookimpl
def register_executors(register: Register) -> None:
    register("local", build_local_executor, config=LocalExecutorConfig)
