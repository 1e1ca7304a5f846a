"""Resumable checkpoints of the ``torch`` fits: safetensors plus JSON, never pickle.

A fit that runs with ``checkpoint_dir`` (the stage's ``checkpoints/`` folder, see
:data:`caikit_core.interfaces.RESUMABLE`) saves one folder per checkpoint under it,
``step-<N>``, written as ``.step-<N>.tmp`` and renamed once complete (its
:data:`MARKER` is written last), so a kill while saving leaves the previous
checkpoint in force. Only the newest complete checkpoint is kept. That layout,
:class:`Schedule` and :func:`check_safe_files` are
:mod:`caikit_core.training.checkpoints`' (shared with the ``jax`` backend).

Tensor state (weights, the optimiser's moments, RNG states) goes to
``<name>.safetensors``; the structure around it (parameter groups, step counters,
metrics) to ``<name>.json``, where each tensor is a ``{"__tensor__": key}``
placeholder (:func:`save_state` / :func:`load_state`). Nothing is read with
``pickle`` or ``torch.load``: :func:`check_safe_files` refuses a checkpoint folder
holding anything but ``.safetensors`` and ``.json`` files (and tokenizer text files).

This module imports torch and safetensors at import time.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from caikit_core.errors import PluginError
from caikit_core.training import checkpoints as core
from caikit_core.training.checkpoints import MARKER, SAFE_SUFFIXES, Schedule

__all__ = [
    "HF_PICKLES",
    "HF_PREFIX",
    "MARKER",
    "SAFE_SUFFIXES",
    "Schedule",
    "check_safe_files",
    "get_rng_state",
    "hf_latest",
    "latest",
    "load_state",
    "make_resumable",
    "save_state",
    "set_rng_state",
    "write",
]

WHO = "torch"


# --- nested state as safetensors + JSON ------------------------------------------------


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = path or "_"
        tensors[key] = value.detach().to("cpu").clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {path!r} in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {k: _decode(v, tensors) for k, v in value["__dict__"]}
    return value


def save_state(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` (nested dicts, lists, tuples, tensors and JSON scalars; dict keys
    may be ints) as ``name.safetensors`` and ``name.json`` in ``folder``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure), encoding="utf-8")


def load_state(folder: Path, name: str) -> Any:
    """What :func:`save_state` wrote (tensors on the CPU)."""
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _decode(json.loads((folder / f"{name}.json").read_text(encoding="utf-8")), tensors)


# --- RNG states -------------------------------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Python's, NumPy's (when installed) and torch's CPU and CUDA RNG states, as
    tensors and JSON values (for :func:`save_state`)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's extras
        return state
    numpy_state: Any = np.random.get_state()
    kind, keys, pos, has_gauss, cached = numpy_state
    state["numpy"] = [
        str(kind),
        torch.from_numpy(keys.astype(np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    ]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (after a :func:`load_state`)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# --- checkpoint folders -----------------------------------------------------------------


def latest(root: Path | None) -> Path | None:
    """The newest complete checkpoint folder under ``root`` (``None``: none yet)."""
    return core.latest(root, who=WHO)


def write(root: Path, step: int, fill: Callable[[Path], None], marker: dict[str, Any]) -> Path:
    """:func:`caikit_core.training.checkpoints.write` for the ``torch`` backend."""
    return core.write(root, step, fill, marker, who=WHO)


def check_safe_files(folder: Path) -> None:
    """:func:`caikit_core.training.checkpoints.check_safe_files` for the ``torch`` backend."""
    core.check_safe_files(folder, who=WHO)


# --- Hugging Face trainers ---------------------------------------------------------------

#: HF Trainer's checkpoint folders: ``checkpoint-<global step>``.
HF_PREFIX = "checkpoint-"
#: What transformers writes with ``torch.save`` (pickle) and caikit removes or replaces.
HF_PICKLES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")


def hf_latest(root: Path | None) -> Path | None:
    """The newest complete (:data:`MARKER`) HF checkpoint folder under ``root``."""
    if root is None or not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(HF_PREFIX) and (p / MARKER).is_file():
            try:
                found.append((int(p.name[len(HF_PREFIX) :]), p))
            except ValueError:
                continue
    if not found:
        return None
    folder = max(found)[1]
    check_safe_files(folder)
    return folder


def make_resumable(
    trainer: Any,
    root: Path | None,
    every_steps: int | None,
    every_minutes: float | None,
    *,
    fit: str,
    per_step: int = 1,
) -> str | None:
    """Let an HF ``Trainer`` save resumable checkpoints into ``root`` and resume from the
    newest; returns what to pass as ``trainer.train(resume_from_checkpoint=...)``.

    transformers' own checkpoint (its ``output_dir`` must be ``root``) is kept for the
    weights (``model.safetensors`` or a LoRA adapter's ``adapter_model.safetensors``),
    ``trainer_state.json`` (step, epoch, log history) and the tokenizer; its pickle
    files are never written or read: the optimiser, the LR scheduler and the RNG
    states go through :func:`save_state` / :func:`load_state` (this instance's
    ``_save_*`` / ``_load_*`` methods are replaced) and ``training_args.bin`` is
    deleted. A callback decides when to save (:class:`Schedule`), writes
    :data:`MARKER` last and removes older checkpoints. ``root=None``: nothing changes.

    ``per_step``: optimiser steps per counted step; saves happen only at multiples of
    it (RLOO/GRPO: a rollout's ``iterations``, so a resume never starts inside a
    rollout whose generations TRL buffers), and ``every_steps`` counts those.
    """
    if root is None:
        return None
    import transformers

    base: Path = root
    needed = (
        "_save_optimizer_and_scheduler",
        "_save_rng_state",
        "_save_scaler",
        "_load_optimizer_and_scheduler",
        "_load_rng_state",
        "_load_scaler",
    )
    missing = [name for name in needed if not callable(getattr(trainer, name, None))]
    if missing:
        raise PluginError(
            f"torch: transformers {transformers.__version__}'s Trainer has no "
            f"{', '.join(missing)}; resumable checkpoints need caikit's supported release"
        )
    if Path(trainer.args.output_dir).resolve() != root.resolve():
        raise PluginError(f"torch: the trainer's output_dir must be {root} to checkpoint there")
    schedule = Schedule(every_steps, every_minutes)

    def save_optimizer_and_scheduler(output_dir: str) -> None:
        if not trainer.args.should_save:  # not the main process of a launch
            return
        folder = Path(output_dir)
        save_state(folder, "optimizer", trainer.optimizer.state_dict())
        if trainer.lr_scheduler is not None:
            save_state(folder, "scheduler", trainer.lr_scheduler.state_dict())

    def load_optimizer_and_scheduler(checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        check_safe_files(folder)
        trainer.optimizer.load_state_dict(load_state(folder, "optimizer"))
        if trainer.lr_scheduler is not None and (folder / "scheduler.json").is_file():
            trainer.lr_scheduler.load_state_dict(load_state(folder, "scheduler"))

    def save_rng(output_dir: str) -> None:
        if not trainer.args.should_save:
            return
        save_state(Path(output_dir), "rng_state", get_rng_state())

    def load_rng(checkpoint: str | None) -> None:
        if checkpoint is not None and (Path(checkpoint) / "rng_state.json").is_file():
            set_rng_state(load_state(Path(checkpoint), "rng_state"))

    def no_scaler(_: str | None) -> None:
        if getattr(trainer.accelerator, "scaler", None) is not None:
            raise PluginError("torch: resumable checkpoints do not cover fp16's loss scaler")

    trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    trainer._load_optimizer_and_scheduler = load_optimizer_and_scheduler
    trainer._save_rng_state = save_rng
    trainer._load_rng_state = load_rng
    trainer._save_scaler = no_scaler
    trainer._load_scaler = no_scaler

    class _Checkpoints(transformers.TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = int(state.global_step)
            if step < state.max_steps and step % per_step == 0 and schedule.due(step // per_step):
                control.should_save = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not args.should_save:
                return
            folder = base / f"{HF_PREFIX}{state.global_step}"
            for name in HF_PICKLES:
                (folder / name).unlink(missing_ok=True)
            check_safe_files(folder)
            marker = {"fit": fit, "step": int(state.global_step)}
            (folder / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
            for other in base.iterdir():
                if other != folder and other.name.startswith(HF_PREFIX):
                    shutil.rmtree(other, ignore_errors=True)
            schedule.saved()

    trainer.add_callback(_Checkpoints())
    found = hf_latest(root)
    return None if found is None else str(found)
