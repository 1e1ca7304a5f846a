"""The ``ray`` executor: a map stage's batches on a Ray Data actor pool.

Each of the pool's actors builds the stage's worker once (``WorkerSpec.build()``,
which loads the stage's models in that actor) and maps every batch Ray gives it.
A batch crosses to the actor and back as one opaque item: the pickled
``(key, batch)`` in a binary column, so Ray Data's Arrow conversion never infers a
schema from caikit records. Results stream back as actors finish them
(``iter_rows``), so the runner writes each shard as soon as its batches are in.

Ray restarts a dead actor and retries its batches (at least once, not exactly
once); the runner keeps one copy per key. A batch that raises is not retried: its
exception travels back as data and is raised here as it was raised in the actor
(a :class:`~caikit_core.stages.base.BatchFailed` carrying the key, or a
:class:`~caikit_core.errors.CaikitError`), with the actor's traceback as its cause.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

from caikit_core.errors import CaikitError, PluginError
from caikit_core.interfaces import DISTRIBUTED, WorkerFactory
from caikit_core.stages.base import BatchFailed
from caikit_ray.config import RayExecutorConfig

log = logging.getLogger("caikit.ray")

#: environment variables an actor takes from the driver (plugin selection)
FORWARDED_ENV = ("CAIKIT_LOAD_PLUGINS",)
#: what an error about executor.address suggests
START_HINT = "start one there (`ray start --head`) or fix executor.address"


class ActorTraceback(Exception):
    """The traceback of an exception raised inside a Ray actor (its text only)."""


class BatchActor:
    """One actor of the pool: builds the stage's worker once, then maps batches.

    ``spec`` is the pickled ``WorkerSpec``, unpickled here after the driver's import
    path is added (a plugin's config class may live in a folder only the driver's
    ``sys.path`` names).
    """

    def __init__(self, *, spec: bytes, sys_path: list[str], env: dict[str, str | None]) -> None:
        for entry in sys_path:
            if entry not in sys.path and os.path.isdir(entry):
                sys.path.append(entry)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.run = pickle.loads(spec).build()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out: list[bytes] = []
        for blob in batch["item"]:
            key, items = pickle.loads(blob)
            try:
                out.append(pickle.dumps(("ok", key, self.run(key, items), "")))
            except Exception as exc:
                text = "".join(traceback.format_exception(exc))
                out.append(pickle.dumps(("error", key, _portable(exc, key), text)))
        return {"item": np.array(out, dtype=object)}


def _portable(exc: Exception, key: Hashable) -> Exception:
    """``exc`` if it survives pickling intact, else a BatchFailed with its message."""
    try:
        again = pickle.loads(pickle.dumps(exc))
        if type(again) is type(exc) and str(again) == str(exc):
            return exc
    except Exception:
        pass
    return BatchFailed(key, f"{type(exc).__name__}: {exc}")


def _caikit_cause(exc: BaseException) -> BaseException | None:
    """The BatchFailed or CaikitError inside what Ray raised (RayTaskError and Ray
    Data's wrappers keep the original as ``cause`` or ``__cause__``)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BatchFailed | CaikitError):
            return current
        for nxt in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return None


def probe(address: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds when nothing listens at ``address``'s host:port."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PluginError(
            f"ray executor: address {address!r} is not 'auto', 'HOST:PORT' or 'ray://HOST:PORT'"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise PluginError(
            f"ray executor: no Ray cluster answered at {address!r} within {timeout:g} s "
            f"({exc}); {START_HINT}"
        ) from exc


class RayExecutor:
    """Maps batches on a Ray Data actor pool of ``config.actors`` actors."""

    capabilities: frozenset[str] = frozenset({DISTRIBUTED})

    def __init__(self, config: RayExecutorConfig) -> None:
        self.config = config
        self.connect()
        self.check_resources()

    def connect(self) -> None:
        """Connect to ``address`` (refused within ``connect_timeout_s`` when nothing
        listens there), or start a local Ray; a Ray this process started is used as is."""
        import ray

        cfg = self.config
        if cfg.address is not None:
            probe(cfg.address, cfg.connect_timeout_s)
        if ray.is_initialized():
            return
        if cfg.address is not None:
            self._init_within(cfg.address, cfg.connect_timeout_s)
            return
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )

    @staticmethod
    def _init_within(address: str, timeout: float) -> None:
        """``ray.init(address=...)``, refused after ``timeout`` seconds: against
        something that accepts connections but is no Ray head, it retries for ever."""
        import ray

        failure: list[BaseException] = []

        def connect() -> None:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=connect, name="caikit-ray-connect", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise PluginError(
                f"ray executor: no Ray cluster answered at {address!r} within {timeout:g} s "
                f"(something accepts connections there, but ray.init did not finish); "
                f"{START_HINT}"
            )
        if failure:
            exc = failure[0]
            raise PluginError(
                f"ray executor: cannot connect to the Ray cluster at {address!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def check_resources(self) -> None:
        """Refuse actors that ask for more CPUs or GPUs than any node of the cluster has
        (Ray would wait for them for ever)."""
        import ray

        list_nodes: Any = ray.nodes  # untyped in ray 2.60
        nodes = [n for n in list_nodes() if n.get("Alive")]
        for key, want in (("GPU", self.config.actor_gpus), ("CPU", self.config.actor_cpus)):
            most = max((float(n.get("Resources", {}).get(key, 0.0)) for n in nodes), default=0.0)
            if want > most:
                raise PluginError(
                    f"ray executor: actor_{key.lower()}s = {want:g}, but no node of the Ray "
                    f"cluster has more than {most:g} {key}s ({len(nodes)} nodes); lower "
                    f"executor.actor_{key.lower()}s or add nodes with {key}s"
                )

    def map(
        self,
        worker: WorkerFactory,
        batches: Iterable[tuple[Hashable, list[Any]]],
        *,
        total: int,
        describe: str,
    ) -> Iterator[tuple[Hashable, list[Any]]]:
        sizes: dict[Hashable, int] = {}
        items: list[dict[str, bytes]] = []
        for key, batch in batches:
            sizes[key] = len(batch)
            items.append({"item": pickle.dumps((key, batch))})
        if not items:
            return
        results = self._results(worker, items, describe)
        if not self.show_progress():
            yield from results
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
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=Console(file=sys.stderr), transient=False) as progress:
            task = progress.add_task(f"{describe} (ray)", total=total)
            for key, out in results:
                progress.advance(task, sizes.pop(key, 0))  # a retried batch counts once
                yield key, out

    def show_progress(self) -> bool:
        """A progress bar on stderr, unless ``progress = false`` or ``caikit --quiet``."""
        return (
            self.config.progress and logging.getLogger("caikit").getEffectiveLevel() <= logging.INFO
        )

    def _results(
        self, worker: WorkerFactory, items: list[dict[str, bytes]], describe: str
    ) -> Iterator[tuple[Hashable, list[Any]]]:
        """Each batch's ``(key, outputs)`` as the actors finish them."""
        import ray
        import ray.data

        cfg = self.config
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False  # no plan and log-folder lines per stage
        actors = min(cfg.actors, len(items))
        dataset = ray.data.from_items(items, override_num_blocks=min(len(items), 4 * actors))
        with warnings.catch_warnings():
            # max_restarts and max_task_retries have no named parameter in Ray 2.60 yet
            warnings.simplefilter("ignore", DeprecationWarning)
            mapped = self._map_batches(dataset, worker, actors)
        log.info("%s: %d batches on %d Ray actors", describe, len(items), actors)
        rows = iter(mapped.iter_rows())
        # Close Ray Data's row iterator here, in this thread, however this ends: left
        # open after a batch's error it was closed by the garbage collector later, in
        # whatever thread ran it, and its clean-up then failed with "cannot join current
        # thread" (an unraisable exception a later test reported as its own error).
        try:
            while True:
                try:
                    row = next(rows)
                except StopIteration:
                    return
                except Exception as exc:
                    found = _caikit_cause(exc)
                    if found is None:
                        first = (str(exc).strip().splitlines() or [""])[0][:500]
                        raise PluginError(
                            f"ray executor: stage '{describe}' failed in Ray: "
                            f"{type(exc).__name__}: {first}"
                        ) from exc
                    raise found from exc
                status, key, value, text = pickle.loads(row["item"])
                if status == "error":
                    if value.__cause__ is None:
                        value.__cause__ = ActorTraceback(text)
                    raise value
                yield key, value
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    def _map_batches(self, dataset: Any, worker: WorkerFactory, actors: int) -> Any:
        import ray.data

        cfg = self.config
        env = {name: os.environ.get(name) for name in FORWARDED_ENV}
        return dataset.map_batches(
            BatchActor,
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.actor_gpus,
            max_restarts=cfg.max_restarts,
            max_task_retries=cfg.max_task_retries,
            fn_constructor_kwargs={
                "spec": pickle.dumps(worker),
                "sys_path": list(sys.path),
                "env": env,
            },
        )
