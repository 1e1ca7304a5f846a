"""The ``ray`` executor's registration (see :mod:`caikit_ray.executor`).

This module imports no ray: :mod:`caikit_ray.executor` does, when the factory runs.
Where ray is not installed, the preflight refuses a run naming the executor when
its run file loads, before any stage, naming the extra to install.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from caikit_core import hookimpl
from caikit_core.errors import PluginError
from caikit_core.hookspecs import Register
from caikit_core.interfaces import DISTRIBUTED
from caikit_ray.config import RayExecutorConfig

if TYPE_CHECKING:
    from caikit_ray.executor import RayExecutor

__all__ = ["MISSING_RAY", "RayExecutorConfig", "build_ray_executor", "ray_missing"]

#: Why ``plugin = "ray"`` cannot run where ray is not installed.
MISSING_RAY = (
    "ray (with Ray Data) is not installed in this Python environment; "
    "install the extra: pip install 'caikit[ray]'"
)


def ray_missing() -> str | None:
    """The preflight: why the ray executor cannot run here, or ``None``."""
    if importlib.util.find_spec("ray") is None:  # ray.data would import ray: too heavy
        return MISSING_RAY
    return None


def build_ray_executor(config: RayExecutorConfig) -> RayExecutor:
    """Connect to the configured Ray cluster (or start a local one) and map on it."""
    missing = ray_missing()
    if missing is not None:
        raise PluginError(f"ray executor: {missing}")
    from caikit_ray.executor import RayExecutor

    return RayExecutor(config)


@hookimpl
def register_executors(register: Register) -> None:
    """Register the ``ray`` executor."""
    register(
        "ray",
        build_ray_executor,
        config=RayExecutorConfig,
        capabilities={DISTRIBUTED},
        preflight=ray_missing,
        description="Ray Data actor pool: one worker (and model copy) per actor",
        check_settings={"num_cpus": 2, "actors": 2, "actor_cpus": 0.5},
    )
