"""XLA compilation for the jax plugins: a persistent cache, and its time measured apart.

- :func:`use_persistent_cache` points JAX's persistent compilation cache at
  ``$CAIKIT_CACHE/jax-compilation`` (default ``~/.cache/caikit/jax-compilation``), so
  a rerun or a resumed run loads its step functions instead of compiling them again.
  ``CAIKIT_JAX_COMPILATION_CACHE`` names another folder, or ``off`` (``0``, ``false``,
  ``no``) turns the cache off; a cache folder JAX was already given
  (``JAX_COMPILATION_CACHE_DIR``) is left as it is. JAX caches only executables that
  took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile.
- :class:`CompileClock` adds up the seconds JAX reports spending on tracing,
  lowering and compiling (or loading from the cache) while it is open, so a stage
  reports compile time separately from its steps (the ``time/compile`` metric).

This module imports JAX, nothing of Tunix.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import jax

__all__ = ["CACHE_ENV", "COMPILE_METRIC", "CompileClock", "cache_folder", "use_persistent_cache"]

#: The environment variable naming the cache folder, or ``off``.
CACHE_ENV = "CAIKIT_JAX_COMPILATION_CACHE"
#: The stage metric with the seconds spent compiling.
COMPILE_METRIC = "time/compile"
_OFF = ("off", "0", "false", "no")
#: JAX's events for tracing, lowering and backend compilation (or a cache load).
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def cache_folder() -> Path | None:
    """The persistent cache folder the environment asks for, or ``None`` when off."""
    named = os.environ.get(CACHE_ENV, "").strip()
    if named.lower() in _OFF:
        return None
    if named:
        return Path(named).expanduser()
    root = os.environ.get("CAIKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "caikit"
    return base / "jax-compilation"


def use_persistent_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in :func:`cache_folder` (unless it is
    off or JAX already has a cache folder); the folder in use, or ``None``."""
    config: Any = jax.config  # untyped in jax 0.10
    current = config.jax_compilation_cache_dir
    if current:
        return Path(current)
    folder = cache_folder()
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    config.update("jax_compilation_cache_dir", str(folder))
    return folder


class CompileClock:
    """``with CompileClock() as clock: ...``; then ``clock.seconds`` is the time JAX
    spent compiling in the block (from any thread: Tunix compiles in its data thread).

    Tunix's metrics logger removes every JAX listener when it closes, at the end of
    its training loop; compilation after that (none, in caikit's stages) is not counted.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _listen(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event in _COMPILE_EVENTS:
            with self._lock:
                self.seconds += float(duration_secs)

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Tunix's metrics logger clears every listener when it closes (end of training)
        with contextlib.suppress(AssertionError, ValueError):
            jax.monitoring.unregister_event_duration_listener(self._listen)
