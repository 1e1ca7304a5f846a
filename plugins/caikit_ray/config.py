"""Settings of the ``ray`` executor (:class:`RayExecutorConfig`).

:mod:`caikit_ray.plugin` registers it; :mod:`caikit_ray.executor` reads it. This
module does not import ray.
"""

from __future__ import annotations

import attrs

from caikit_core import validators

__all__ = ["RayExecutorConfig"]


@attrs.frozen
class RayExecutorConfig:
    """Settings of the ray executor.

    :ivar address: the Ray cluster to connect to (``"auto"``, ``"HOST:PORT"`` of its
        head, or ``"ray://HOST:PORT"``); ``None`` starts a local Ray in this process
        with ``num_cpus`` and ``object_store_memory`` (a Ray this process already
        started is used as it is).
    :ivar connect_timeout_s: how long connecting to ``address`` may take before the
        run fails with an error naming it.
    :ivar num_cpus: CPUs of the local Ray this executor starts (without ``address``).
    :ivar object_store_memory: bytes of the local Ray's object store.
    :ivar actors: the actor pool's size: how many actors (each with its own copy of
        the stage's models) map batches at once.
    :ivar actor_cpus: CPUs Ray reserves for each actor.
    :ivar actor_gpus: GPUs Ray reserves for each actor (more than any node of the
        cluster has is an error before the stage runs).
    :ivar batch_size: how many of the runner's batches one actor call takes (Ray
        Data's ``map_batches(batch_size=...)``); the runner's ``batch_size`` sets the
        items per batch.
    :ivar max_restarts: how often Ray restarts a dead actor (``-1``: without limit).
    :ivar max_task_retries: how often Ray retries a batch whose actor died
        (``-1``: without limit); a batch that raises is not retried.
    :ivar progress: show a progress bar on stderr (also off under ``caikit --quiet``).
    """

    address: str | None = attrs.field(
        default=None, validator=validators.optional(validators.non_empty_string)
    )
    connect_timeout_s: float = attrs.field(default=30.0, validator=validators.positive_number)
    num_cpus: int | None = attrs.field(
        default=None, validator=validators.optional(validators.positive_int)
    )
    object_store_memory: int = attrs.field(
        default=200 * 1024 * 1024, validator=validators.int_at_least(78643200)
    )
    actors: int = attrs.field(default=2, validator=validators.positive_int)
    actor_cpus: float = attrs.field(default=1.0, validator=validators.non_negative_number)
    actor_gpus: float = attrs.field(default=0.0, validator=validators.non_negative_number)
    batch_size: int = attrs.field(default=1, validator=validators.positive_int)
    max_restarts: int = attrs.field(default=3, validator=validators.int_at_least(-1))
    max_task_retries: int = attrs.field(default=3, validator=validators.int_at_least(-1))
    progress: bool = attrs.field(default=True, validator=validators.boolean)
