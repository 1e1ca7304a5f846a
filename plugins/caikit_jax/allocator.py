"""glibc's ``malloc`` for the jax stages: large freed blocks go back to the system.

XLA's CPU runtime takes every buffer (weights, moments, activations, temporaries)
from ``malloc``. glibc maps a block of its own only above a threshold that starts at
128 KiB and rises to the size of each mapped block freed (up to 32 MiB), so after the
first step most of a step's buffers come from heaps and per-thread arenas, where freed
memory stays in the process: on SmolLM2-135M PPO the live arrays stayed at 3.6 GiB
while RSS grew to 9.6 GiB, and 7.0 GiB remained after every array was freed
(docs/jax.md). :func:`tuned` (a decorator for a jax stage's entry point) fixes the
threshold at :data:`MMAP_THRESHOLD` and caps the arenas at :data:`ARENA_MAX` while the
stage runs, as ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2`` in the environment
would for a whole process.

Mapping every block of 128 KiB and more made torch's ``generate`` 1.4-1.6x slower
(``benchmarks/malloc_tuning.py``), and a jax run's later stages (pairs, labels, eval)
are torch's, so the threshold is put back when the stage ends (:func:`restore`); the
arena cap, which cost torch nothing measurable (one run), stays. Nothing is changed on a C
library other than glibc, with ``CAIKIT_JAX_MALLOC=keep``, or for a setting the
environment already gives glibc (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``),
which wins.

This module imports neither JAX nor Tunix.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

__all__ = ["ARENA_MAX", "MALLOC_ENV", "MMAP_THRESHOLD", "restore", "tune", "tuned", "tuning"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

log = logging.getLogger("caikit.jax")

#: ``CAIKIT_JAX_MALLOC=keep`` leaves glibc's allocator as it is.
MALLOC_ENV = "CAIKIT_JAX_MALLOC"
#: Blocks of at least this many bytes get their own mapping, unmapped when freed.
MMAP_THRESHOLD = 128 * 1024
#: At most this many malloc arenas (glibc's default: 8 per core).
ARENA_MAX = 2
# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# the glibc variables that set the same before the process starts
_GLIBC_ENV = {"MALLOC_MMAP_THRESHOLD_": _M_MMAP_THRESHOLD, "MALLOC_ARENA_MAX": _M_ARENA_MAX}
#: glibc's upper bound for its dynamic mmap threshold (64-bit), restored after a stage.
_RESTORED_MMAP_THRESHOLD = 32 * 1024 * 1024
_depth = 0  # jax stages running that tuned the allocator
_set: dict[int, int] = {}  # what tune set


def tune() -> bool:
    """Map every block of :data:`MMAP_THRESHOLD` bytes and more, and use at most
    :data:`ARENA_MAX` arenas, until :func:`restore`; whether it is so (now, or by a
    stage still running: calls nest). Process-wide (see the module docstring)."""
    global _depth
    if _depth:
        _depth += 1
        return True
    if os.environ.get(MALLOC_ENV, "").strip().lower() == "keep":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    # the arena cap first: if only it is set, nothing needs undoing
    wanted = {_M_ARENA_MAX: ARENA_MAX, _M_MMAP_THRESHOLD: MMAP_THRESHOLD}
    for name, param in _GLIBC_ENV.items():
        if os.environ.get(name):
            wanted.pop(param)
    for param, value in wanted.items():
        if not _mallopt(param, value):
            return False
    _set.clear()
    _set.update(wanted)
    _depth = 1
    if wanted:
        log.info("jax: glibc mallopt %s (%s=keep leaves malloc as it is)", wanted, MALLOC_ENV)
    return True


def restore() -> None:
    """Undo :func:`tune`'s threshold once every stage that tuned it has ended.

    Hands the free memory at the top of each heap back first (``malloc_trim``), then
    lets blocks under 32 MiB come from the heap again, with a 64 MiB trim threshold:
    where glibc's own dynamic threshold ends up once a program has freed a large
    mapped block (glibc cannot be told to go back to adjusting it). No-op when nothing
    was tuned.
    """
    global _depth
    if not _depth:
        return
    _depth -= 1
    if _depth:
        return
    libc = ctypes.CDLL(None)
    libc.malloc_trim(ctypes.c_size_t(0))
    if _M_MMAP_THRESHOLD in _set:
        _mallopt(_M_MMAP_THRESHOLD, _RESTORED_MMAP_THRESHOLD)
        _mallopt(_M_TRIM_THRESHOLD, 2 * _RESTORED_MMAP_THRESHOLD)
    _set.clear()


@contextlib.contextmanager
def tuning() -> Iterator[bool]:
    """``with tuning():`` :func:`tune`, then :func:`restore`; yields whether it tuned."""
    done = tune()
    try:
        yield done
    finally:
        if done:
            restore()


def tuned(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` (a jax stage's entry point) run with the allocator tuned (:func:`tuning`)."""

    @functools.wraps(fn)
    def stage(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with tuning():
            return fn(*args, **kwargs)

    return stage


def _mallopt(param: int, value: int) -> bool:
    libc = ctypes.CDLL(None)
    if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
        return True
    log.warning("jax: glibc mallopt(%d, %d) failed; malloc is left as it is", param, value)
    return False
