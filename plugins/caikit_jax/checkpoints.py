"""Resumable checkpoints of the ``jax`` fits (SFT, DPO, PPO, the preference model):
safetensors plus JSON, never pickle.

The folder layout is :mod:`caikit_core.training.checkpoints`' (``step-<N>/``, written
as ``.step-<N>.tmp`` and renamed once complete, :data:`MARKER` last, older ones
removed after). A checkpoint holds:

- ``<name>.safetensors`` per Flax NNX object (``model``: its ``nnx.Param`` leaves;
  ``optimizer``: the ``nnx.Optimizer``'s step and optax state, ``MultiSteps``'
  accumulators included; PPO: ``actor``, ``critic`` and their ``actor_optimizer``,
  ``critic_optimizer``), each leaf under its pytree path
  (``['opt_state'][0]['mu']['layers'][0]...``), written with ``safetensors.flax``;
  ``<name>.json`` lists the paths and dtypes, and a load refuses a checkpoint whose
  paths, shapes or dtypes differ from the freshly built object's;
- ``loop.json``: the loop's own state (the data cursor: step and the NumPy
  generator's state and queued order, and the per-step losses so far; PPO's:
  :func:`caikit_jax.ppo._loop_state`);
- :data:`MARKER`: the step, the fit and its settings; a checkpoint saved with other
  settings is refused.

The fits never draw from a global RNG (the data order comes from a seeded NumPy
``Generator`` saved in ``loop.json``; JAX keys are explicit and only initialise
weights the checkpoint replaces), so resuming reproduces the uninterrupted run.

This module imports JAX, Flax and safetensors at import time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import jax
from flax import nnx
from safetensors.flax import load_file, save_file

from caikit_core.errors import PluginError
from caikit_core.training import checkpoints as core
from caikit_core.training.checkpoints import MARKER

__all__ = ["LOOP", "MARKER", "WHO", "Checkpointer", "load_tree", "save_tree"]

WHO = "jax"
#: The loop's own state in a checkpoint folder.
LOOP = "loop.json"
#: Settings that do not change what a fit computes, left out of the marker.
_IGNORED = frozenset({"checkpoint_every_steps", "checkpoint_every_minutes"})


def _leaves(obj: Any) -> tuple[list[tuple[str, Any]], Any, Any]:
    state = nnx.state(obj, nnx.Param) if not isinstance(obj, nnx.Optimizer) else nnx.state(obj)
    pairs, treedef = jax.tree_util.tree_flatten_with_path(state)
    return [(jax.tree_util.keystr(p), leaf) for p, leaf in pairs], treedef, state


def save_tree(folder: Path, name: str, obj: Any) -> None:
    """Write ``obj`` (a model: its ``nnx.Param`` leaves; an ``nnx.Optimizer``: all its
    state) as ``name.safetensors`` and ``name.json`` in ``folder``."""
    leaves, _, _ = _leaves(obj)
    save_file(
        {key: jax.device_get(leaf) for key, leaf in leaves}, str(folder / f"{name}.safetensors")
    )
    layout = [[key, str(leaf.dtype), list(leaf.shape)] for key, leaf in leaves]
    (folder / f"{name}.json").write_text(json.dumps(layout), encoding="utf-8")


def load_tree(folder: Path, name: str, obj: Any) -> None:
    """Load what :func:`save_tree` wrote into ``obj``, each array placed as the leaf it
    replaces (same sharding); a :class:`PluginError` when the layouts differ."""
    leaves, treedef, _ = _leaves(obj)
    layout = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    expected = [[key, str(leaf.dtype), list(leaf.shape)] for key, leaf in leaves]
    if layout != expected:
        first = next(
            (e[0] for e, s in zip(expected, layout, strict=False) if e != s), "the number of arrays"
        )
        raise PluginError(
            f"{WHO}: checkpoint {folder / name}.json does not match the {name} being "
            f"trained (first difference: {first}); refusing to resume from it"
        )
    arrays = load_file(str(folder / f"{name}.safetensors"))
    placed = [jax.device_put(arrays[key], leaf.sharding) for key, leaf in leaves]
    nnx.update(obj, jax.tree_util.tree_unflatten(treedef, placed))


def _settings(config: Any) -> Any:
    """``config`` as JSON values, without the checkpoint schedule."""
    values = {k: v for k, v in attrs.asdict(config).items() if k not in _IGNORED}
    return json.loads(json.dumps(values))


class Checkpointer:
    """Saves and restores one fit's checkpoints under ``root`` (``None``: never).

    ``objects`` names the NNX objects to save (``{"model": m, "optimizer": o}``);
    ``loop`` is the loop's JSON state at a step boundary.
    """

    def __init__(self, root: Path | None, fit: str, config: Any) -> None:
        self.root = root
        self.marker = {"backend": WHO, "fit": fit, "settings": _settings(config)}
        self.schedule = core.Schedule(
            getattr(config, "checkpoint_every_steps", None),
            getattr(config, "checkpoint_every_minutes", None),
        )

    def restore(self, objects: dict[str, Any]) -> dict[str, Any] | None:
        """Load the newest checkpoint into ``objects``; its loop state, or ``None``."""
        folder = core.latest(self.root, who=WHO)
        if folder is None:
            return None
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        mine = {**self.marker, "step": marker.get("step")}
        if marker != mine:
            keys = sorted(
                k
                for k in set(marker.get("settings", {})) | set(mine["settings"])
                if marker.get("settings", {}).get(k) != mine["settings"].get(k)
            )
            raise PluginError(
                f"{WHO}: checkpoint {folder} was saved by another fit or with other "
                f"settings ({', '.join(keys) or marker.get('fit')}); refusing to resume "
                "from it (remove it to start over)"
            )
        for name, obj in objects.items():
            load_tree(folder, name, obj)
        loop: dict[str, Any] = json.loads((folder / LOOP).read_text(encoding="utf-8"))
        return loop

    def due(self, step: int, total: int) -> bool:
        """Whether to save after ``step`` of ``total`` (never after the last step: the
        fit's result follows at once)."""
        return self.root is not None and step < total and self.schedule.due(step)

    def save(self, step: int, objects: dict[str, Any], loop: dict[str, Any]) -> Path:
        """Save checkpoint ``step``: ``objects`` (see :func:`save_tree`) and ``loop``
        (the loop's JSON state)."""
        assert self.root is not None

        def fill(folder: Path) -> None:
            for name, obj in objects.items():
                save_tree(folder, name, obj)
            (folder / LOOP).write_text(json.dumps(loop), encoding="utf-8")

        path = core.write(self.root, step, fill, self.marker, who=WHO)
        self.schedule.saved()
        return path
