"""What a run file enables that its reader should know before running it.

``caikit run`` logs the settings that let a plugin run code it did not ship with
(:func:`risky_settings`: ``trust_remote_code``, ``allow_pickle``); ``caikit run
--resume RUN_DIR`` re-runs the run file recorded in ``run.json``, which may come from
someone else, so it also shows (:func:`enabled`) the plugins that are not bundled
with caikit and the files the recorded run file reads from outside the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caikit_core.config import ResolvedRun

__all__ = ["RISKY_SETTINGS", "enabled", "risky_settings"]

#: plugin settings that, when true, let a model file run code; what each means
RISKY_SETTINGS = {
    "trust_remote_code": "runs Python code shipped with the model",
    "allow_pickle": "loads pickle weights, which can run code when read",
}


def risky_settings(run: ResolvedRun) -> list[str]:
    """Each role's (and instrument's) setting of :data:`RISKY_SETTINGS` that is true,
    as ``generator.trust_remote_code = true (runs ...)``."""
    notes = []
    tables = {**run.roles, **{f"eval.{n}": r for n, r in run.instruments.items()}}
    for table, resolved in sorted(tables.items()):
        options = resolved.options()
        for key, meaning in RISKY_SETTINGS.items():
            if options.get(key) is True:
                notes.append(f"{table}.{key} = true ({meaning})")
    return notes


def _read_paths(run: ResolvedRun) -> list[tuple[str, str]]:
    """The run file's keys that name files or folders it reads, with their values."""
    from caikit_core.models import looks_local

    cfg = run.config
    constitution = None if cfg.constitution.path == "default" else cfg.constitution.path
    found: list[tuple[str, str | None]] = [
        ("data.prompts", cfg.data.prompts),
        ("constitution.path", constitution),
        ("sl.helpfulness_prompts", cfg.sl.helpfulness_prompts),
        ("models.policy", cfg.models.policy),
        ("models.feedback", cfg.models.feedback),
        ("models.preference", cfg.models.preference),
    ]
    if cfg.eval is not None:
        found.append(("eval.preference_model", cfg.eval.preference_model))
        found.extend((f"eval.checkpoints.{k}", v) for k, v in cfg.eval.checkpoints.items())
    out = []
    for key, value in found:
        if value is None:
            continue
        if key.startswith(("models.", "eval.")) and not (
            looks_local(value) or (run.base_dir / value).exists()
        ):
            continue  # a hub id or cache alias, not a path
        out.append((key, value))
    return out


def enabled(run: ResolvedRun, run_dir: Path) -> list[str]:
    """What a recorded run file enables, for ``caikit run --resume``: its risky
    settings, its plugins from distributions other than caikit, and each path it
    reads that lies outside ``run_dir``."""
    from caikit_core.config import resolve_path

    notes = risky_settings(run)
    tables = {**run.roles, **{f"eval.{n}": r for n, r in run.instruments.items()}}
    for table, resolved in sorted(tables.items()):
        if not resolved.spec.bundled:
            notes.append(f"{table}: {resolved.spec.origin()}, not bundled with caikit")
    root = run_dir.resolve()
    for key, value in _read_paths(run):
        path = resolve_path(run.base_dir, value)
        if not path.resolve().is_relative_to(root):
            notes.append(f"{key} = {value!r} reads {path}, outside the run directory")
    return notes
