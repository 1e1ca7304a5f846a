"""Counting what the jax plugins hold in memory: bytes of live arrays, by role.

Host RSS depends on XLA's allocator, on compilation and on whatever else runs on the
machine; the arrays JAX holds do not. So the jax backend accounts for its memory by
counting them (:func:`jax.live_arrays`), deterministically:

- :func:`state_bytes` is the size of an nnx object's arrays (a model's weights, an
  optimiser's state), :func:`live_bytes` that of every array alive in the process.
- :func:`signature` describes a model's parameters by shape and dtype, and
  :func:`model_copies` counts how many whole copies of them are alive: a model, its
  frozen twin and each of AdamW's two moments each count one, so PPO's design (actor,
  reference, critic trunk, two moments for each trained model) gives an exact number
  a test can hold the implementation to (``caikit_jax/tests/test_memory.py``).
- :func:`release` frees what a finished stage left behind.

What glibc's ``malloc`` keeps of freed buffers is :mod:`caikit_jax.allocator`'s.

This module imports JAX and Flax at import time, nothing of Tunix.
"""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

import jax
from flax import nnx

__all__ = [
    "Signature",
    "live_bytes",
    "model_copies",
    "release",
    "signature",
    "state_bytes",
]

_live_arrays: Any = jax.live_arrays  # untyped in jax 0.10
_clear_caches: Any = jax.clear_caches

#: How many of a model's parameters have each ``(shape, dtype)``.
Signature = Counter[tuple[tuple[int, ...], str]]


def _arrays(tree: Any) -> list[jax.Array]:
    return [x for x in jax.tree_util.tree_leaves(tree) if isinstance(x, jax.Array)]


def state_bytes(obj: Any, *filters: Any) -> int:
    """Bytes of the arrays in ``obj``'s nnx state (restricted to ``filters``, e.g.
    ``nnx.Param``); each array is counted once, whatever shares it."""
    state: Any = nnx.state(obj, *filters) if filters else nnx.state(obj)
    if isinstance(state, tuple):  # several filters give one state each
        state = list(state)
    unique = {id(a): a for a in _arrays(state)}
    return sum(int(a.nbytes) for a in unique.values())


def live_bytes() -> int:
    """Bytes of every array alive in the process (each counted once, global size)."""
    arrays: list[jax.Array] = _live_arrays()
    return sum(int(a.nbytes) for a in arrays)


def signature(model: Any) -> Signature:
    """The shapes and dtypes of ``model``'s parameters (``nnx.Param``), with counts."""
    return Counter(
        (tuple(int(d) for d in a.shape), str(a.dtype)) for a in _arrays(nnx.state(model, nnx.Param))
    )


def model_copies(sig: Signature, arrays: list[jax.Array] | None = None) -> int:
    """How many whole copies of a model with signature ``sig`` are among ``arrays``
    (the live arrays by default).

    For each ``(shape, dtype)`` of the model, the live arrays of that shape and dtype
    divided by how often the model has it; the least of these, so that an activation
    or a cache that happens to share one parameter's shape does not count as a copy.
    A model, an optimiser moment of it, and a model with the same trunk and another
    head each count one.
    """
    if not sig:
        return 0
    found: Signature = Counter(
        (tuple(int(d) for d in a.shape), str(a.dtype))
        for a in (_live_arrays() if arrays is None else arrays)
    )
    return min(found[key] // count for key, count in sig.items())


def release(*, compiled: bool = True) -> None:
    """Free what a finished stage left behind, before the next one loads.

    nnx models and optimisers hold reference cycles, so their arrays outlive the
    stage until Python's cyclic collector happens to run (after PPO on the tiny model,
    six of its seven model copies were still alive); this collects them now. With
    ``compiled``, JAX's in-memory caches of traced and compiled functions are
    dropped too (the persistent cache on disk is kept).
    """
    gc.collect()
    if compiled:
        _clear_caches()
