"""``eval``: the run file's ``[eval] instruments``, run on the run's checkpoints.

Runs only when the run file has an ``[eval]`` table listing instruments, after every
other stage. Its fingerprint covers the instruments' names and settings, the input
stages' fingerprints (``sft``, ``preference_model``, ``policy``, whichever ran, else
``prompts``), the run's models and ``[eval] checkpoints``, and the generator,
labeller and preference model plugins with their settings (and the constitution,
when there is a labeller).

Its artifact folder holds one subfolder per instrument with ``result.json`` and
``rows.parquet`` (:func:`caikit_core.evaluation.find_results` finds them). Each
instrument's result is kept in the stage folder (``partial/<NAME>``) as soon as it
is written, so a stage interrupted after some instruments resumes with the rest.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caikit_core.config import RunConfig
from caikit_core.eval_context import (
    RunEvalContext,
    build_instrument,
    check_requirements,
    run_instrument,
)
from caikit_core.evaluation import RESULT_FILE, format_estimate, read_result
from caikit_core.interfaces import FitReport
from caikit_core.stages.base import Context, Stage, StageResult, resolve_model
from caikit_core.store import fingerprint, model_fingerprint

#: the stage folder's subfolder keeping finished instruments' results for a resume
PARTIAL = "partial"
#: the roles whose plugins and settings enter the fingerprint, when the run has them
EVAL_ROLES = ("generator", "labeller", "preference_model")


class Eval(Stage):
    name = "eval"
    phase = "eval"
    kind = "fit"
    inputs = ("prompts", "sft", "preference_model", "policy")

    @classmethod
    def included(cls, config: RunConfig) -> bool:
        return config.eval is not None and bool(config.eval.instruments)

    def _upstream(self, ctx: Context) -> list[str]:
        fits = [n for n in self.inputs[1:] if n in ctx.fingerprints]
        return fits or ["prompts"]

    def input_fingerprint(self, ctx: Context) -> str:
        return fingerprint(
            [ctx.fingerprints[n] for n in self._upstream(ctx)], what="the eval stage inputs"
        )

    def settings(self, ctx: Context) -> dict[str, Any]:
        cfg = ctx.config.eval
        assert cfg is not None
        instruments = ctx.run.instruments
        roles = {
            r: {"plugin": ctx.role(r).plugin, "options": ctx.role(r).options()}
            for r in EVAL_ROLES
            if r in ctx.run.roles
        }
        out: dict[str, Any] = {
            "instruments": [[n, instruments[n].options()] for n in cfg.instruments],
            "roles": roles,
            "models": {m: model_fingerprint(ctx.model(m)) for m in ("policy", "feedback")},
            "checkpoints": {
                n: model_fingerprint(resolve_model(ctx.run.base_dir, p))
                for n, p in sorted(cfg.checkpoints.items())
            },
            "preference_model": (
                model_fingerprint(resolve_model(ctx.run.base_dir, cfg.preference_model))
                if cfg.preference_model
                else None
            ),
        }
        if "labeller" in ctx.run.roles:
            out["constitution"] = ctx.constitution.content_hash()
        return out

    def models(self, ctx: Context) -> dict[str, str]:
        return dict(self._context(ctx).checkpoints)

    def precheck(self, ctx: Context, planned: Sequence[str]) -> None:
        """Every instrument's ``requires`` against what the run will have once its
        stages have run (a preference model when it trains one), before any runs."""
        cfg = ctx.config.eval
        assert cfg is not None
        instruments = {n: build_instrument(ctx.run.instruments[n]) for n in cfg.instruments}
        ectx = RunEvalContext(
            ctx.run, run_dir=ctx.store.root, artifacts=ctx.artifacts, planned=planned
        )
        check_requirements(instruments, ectx)

    def other_plugins(self, ctx: Context) -> dict[str, Any]:
        """Each instrument's registration, under ``instrument:NAME``."""
        cfg = ctx.config.eval
        assert cfg is not None
        return {f"instrument:{n}": ctx.run.instruments[n].spec for n in cfg.instruments}

    def _context(self, ctx: Context) -> RunEvalContext:
        return RunEvalContext(ctx.run, run_dir=ctx.store.root, artifacts=ctx.artifacts)

    def fit(self, ctx: Context, out: Path) -> FitReport:
        cfg = ctx.config.eval
        assert cfg is not None
        ectx = self._context(ctx)
        resolved = {n: ctx.run.instruments[n] for n in cfg.instruments}
        instruments = {n: build_instrument(r) for n, r in resolved.items()}
        check_requirements(instruments, ectx)
        partial = ctx.store.stage_dir(self.name, ctx.fingerprints[self.name]) / PARTIAL
        metrics: dict[str, float] = {}
        for name, instrument in instruments.items():
            kept = partial / name
            if (kept / RESULT_FILE).is_file():
                result = read_result(kept)  # finished before an interruption
            else:
                tmp = partial / f".{name}.tmp"
                if tmp.exists():
                    shutil.rmtree(tmp)
                result = run_instrument(name, instrument, resolved[name], ectx, tmp)
                tmp.replace(kept)
            shutil.copytree(kept, out / name)
            metrics.update({f"{name}/{k}": e.value for k, e in result.metrics.items()})
        return FitReport(str(out), metrics)

    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        if result.artifact is None:
            return []
        lines = [f"evaluation results: {result.artifact}"]
        for folder in sorted(p for p in result.artifact.iterdir() if p.is_dir()):
            evaluated = read_result(folder)
            for key, estimate in evaluated.metrics.items():
                lines.append(f"  {folder.name} {key}: {format_estimate(estimate)}")
        return lines
