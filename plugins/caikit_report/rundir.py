"""Reading a run directory for the report: run.json, each stage's manifest, the
labels' soft preferences and the evaluation results.

Everything is read through the core's :class:`~caikit_core.store.RunStore` (run.json,
manifests, shards) and :func:`caikit_core.evaluation.read_result`; the stages a run
should have come from :func:`caikit_core.stages.stage_names` of the recorded run file.
A run directory that lacks any of them is a :class:`~caikit_core.errors.CaikitError`
naming every missing or incomplete stage, so a report is never written half-empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from caikit_core.config import parse_config
from caikit_core.errors import CaikitError
from caikit_core.evaluation import EvalResult, find_results, read_result
from caikit_core.records import PreferenceLabel, iter_from_arrow
from caikit_core.stages import stage_names
from caikit_core.store import RunStore, StageManifest

__all__ = [
    "EvalView",
    "LabelStats",
    "RunView",
    "StageView",
    "read_run",
]


@attrs.frozen
class StageView:
    """One complete stage of the run: its name and manifest."""

    name: str
    manifest: StageManifest


@attrs.frozen
class LabelStats:
    """The labels stage's soft labels.

    :ivar p_a: every label's P(A).
    :ivar orders: per label with both orders in its evidence, ``(P(A) when A is shown
        first, P(A) when A is shown second)``, each averaged over the label's principles.
    :ivar swap_consistency: every label's swap-consistency, where recorded.
    """

    p_a: list[float]
    orders: list[tuple[float, float]] = attrs.field(factory=list)
    swap_consistency: list[float] = attrs.field(factory=list)


@attrs.frozen
class EvalView:
    """One evaluation result and where it was read from."""

    name: str
    folder: Path
    result: EvalResult


@attrs.frozen
class RunView:
    """What the report shows of one run directory."""

    root: Path
    info: dict[str, Any]
    stages: list[StageView]
    labels: LabelStats | None
    evals: list[EvalView]

    def stage(self, name: str) -> StageView | None:
        for s in self.stages:
            if s.name == name:
                return s
        return None


def _letter_a(logprob_a: float, logprob_b: float) -> float:
    """P(the letter A) from the two option letters' log-probs (a two-way softmax)."""
    return 1.0 / (1.0 + math.exp(logprob_b - logprob_a))


def _orders(label: PreferenceLabel) -> tuple[float, float] | None:
    """``(P_AB(A), P_BA(A))`` averaged over principles, or ``None`` without both orders."""
    first = [_letter_a(e.logprob_a, e.logprob_b) for e in label.evidence if e.order == "AB"]
    # in order BA the letter A labels response B: P(response A) = 1 - P(letter A)
    second = [1.0 - _letter_a(e.logprob_a, e.logprob_b) for e in label.evidence if e.order == "BA"]
    if not first or not second:
        return None
    return sum(first) / len(first), sum(second) / len(second)


def _label_stats(store: RunStore, manifest: StageManifest) -> LabelStats:
    tables = (
        store.read_shard(manifest.stage, manifest.fingerprint, s.file)
        for s in sorted(manifest.shards, key=lambda s: s.index)
    )
    labels = list(iter_from_arrow(tables, PreferenceLabel))
    orders = [o for o in (_orders(x) for x in labels) if o is not None]
    swaps = [x.swap_consistency for x in labels if x.swap_consistency is not None]
    return LabelStats([x.p_a for x in labels], orders, swaps)


def _missing_stage(store: RunStore, name: str, fp: str | None) -> str:
    """Why stage ``name`` does not count as done, in a few words."""
    manifest = store.read_manifest(name, fp) if fp else None
    if manifest is None:
        started = (store.root / "stages" / name).is_dir()
        return f"{name} (incomplete: started, never finished)" if started else f"{name} (absent)"
    if manifest.kind == "fit":
        return f"{name} (incomplete: no checkpoint)"
    done = len(store.complete_shards(manifest))
    total = "?" if manifest.total_shards is None else str(manifest.total_shards)
    return f"{name} (incomplete: {done} of {total} shards)"


def _stage_done(store: RunStore, manifest: StageManifest | None) -> bool:
    if manifest is None or not manifest.complete:
        return False
    if manifest.kind == "fit":
        return store.artifact_dir(manifest.stage, manifest.fingerprint).is_dir()
    return True


def read_run(run_dir: Path, extra_evals: Sequence[Path] = ()) -> RunView:
    """Read ``run_dir`` (and the evaluation result folders ``extra_evals``).

    :raises CaikitError: ``run_dir`` is no run directory, a stage its run file
        includes is absent or incomplete (all such stages are named), or an
        evaluation folder holds no readable result.
    """
    store = RunStore(run_dir)
    if not run_dir.is_dir():
        raise CaikitError(f"{run_dir}: no such run directory")
    if not store.exists():
        raise CaikitError(
            f"{run_dir}: not a caikit run directory: run.json is missing "
            "(nothing has run here; run `caikit run RUN_FILE` first)"
        )
    info = store.read_run()
    if not isinstance(info.get("config"), dict):
        raise CaikitError(f"{store.run_file}: has no recorded run file ('config')")
    config = parse_config(info["config"], str(store.run_file))
    fingerprints: dict[str, str] = dict(info.get("stages") or {})
    stages: list[StageView] = []
    missing: list[str] = []
    for name in stage_names(config):
        fp = fingerprints.get(name)
        manifest = store.read_manifest(name, fp) if fp else None
        if manifest is None or not _stage_done(store, manifest):
            missing.append(_missing_stage(store, name, fp))
        else:
            stages.append(StageView(name, manifest))
    if missing:
        raise CaikitError(
            f"{run_dir}: the run is not finished, so no report: "
            f"{len(missing)} of {len(stage_names(config))} stages missing or incomplete: "
            + ", ".join(missing)
            + " (finish it with `caikit run --resume RUN_DIR`)"
        )
    labels = None
    for s in stages:
        if s.name == "labels":
            labels = _label_stats(store, s.manifest)
    evals: list[EvalView] = []
    for name, folder in find_results(run_dir).items():
        evals.append(EvalView(name, folder, read_result(folder)))
    for folder in extra_evals:
        evals.append(EvalView(folder.name or str(folder), folder, read_result(folder)))
    return RunView(run_dir, info, stages, labels, evals)
