"""``revision-curve``: the preference model's score of the initial response and of
each revision, mean with an interval per revision index (Bai et al. 2022, Fig. 5).

The traces are the run's ``revisions`` stage output, read with
:func:`caikit_core.io.export.load_traces` (the current fingerprint of the stage
from ``run.json``, its manifest, its complete shards; an unfinished stage is an
error that says how to finish it). Each trace the critic did not skip gives one
:class:`~caikit_core.records.Sample` per revision index: index 0 is the initial
response, index ``i`` the ``i``-th revision, all with the trace's prompt. The
run's preference model (``ctx.preference_model()``) scores them in one call.

Outputs: the series ``revision-curve`` (``x`` = revision index, ``value`` = the
mean score, ``low``/``high`` a percentile-bootstrap interval over traces, ``n``);
metrics ``score/<i>`` (the same numbers) and ``gain/<i>`` (the mean of each
trace's ``score_i - score_0``, bootstrapped over traces: paired, so it is
tighter than the difference of two means); rows, one per (trace, index):
``trace_id, prompt_id, revision, principle_id, score, response``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from caikit_core import validators
from caikit_core.errors import CaikitError
from caikit_core.evaluation import Estimate, EvalContext, EvalResult, bootstrap
from caikit_core.hookspecs import Register
from caikit_core.records import RevisionTrace, Sample, stable_id

__all__ = [
    "RevisionCurveConfig",
    "RevisionCurveInstrument",
    "curve",
    "register",
    "revision_samples",
]


@attrs.frozen
class RevisionCurveConfig:
    """Settings of the ``revision-curve`` instrument."""

    #: the stage holding the revision traces
    stage: str = attrs.field(default="revisions", validator=validators.non_empty_string)
    #: at most this many traces (the first in shard order); none: all
    limit: int | None = attrs.field(
        default=None, validator=validators.optional(validators.positive_int)
    )
    #: bootstrap rounds over traces
    rounds: int = attrs.field(default=1000, validator=validators.positive_int)
    level: float = attrs.field(
        default=0.9, validator=validators.number_in(0, 1, low_open=True, high_open=True)
    )
    seed: int | None = attrs.field(default=None, validator=validators.optional(validators.integer))


def revision_samples(traces: Sequence[RevisionTrace]) -> list[tuple[RevisionTrace, int, Sample]]:
    """``(trace, index, sample)`` for the initial response (index 0) and each revision
    of every trace the critic did not skip."""
    out: list[tuple[RevisionTrace, int, Sample]] = []
    for trace in traces:
        if trace.skipped_reason is not None:
            continue
        texts = [trace.initial_response, *(step.revision for step in trace.steps)]
        for index, text in enumerate(texts):
            sample = Sample(
                id=stable_id("revision-curve", trace.id, index),
                prompt_id=trace.prompt_id,
                messages=trace.messages,
                response=text,
            )
            out.append((trace, index, sample))
    return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def curve(
    scores: Sequence[tuple[str, int, float]],
    *,
    rounds: int = 1000,
    level: float = 0.9,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Estimate]]:
    """The series and metrics from ``(trace id, revision index, score)`` triples.

    Per index: the mean score with a bootstrap interval over the traces that reach
    it, and (index > 0) the mean paired gain over index 0.
    """
    by_index: dict[int, dict[str, float]] = {}
    for trace_id, index, score in scores:
        by_index.setdefault(index, {})[trace_id] = score
    series: list[dict[str, Any]] = []
    metrics: dict[str, Estimate] = {}
    initial = by_index.get(0, {})
    for index in sorted(by_index):
        values = list(by_index[index].values())
        est = bootstrap(values, _mean, rounds=rounds, level=level, seed=seed + index)
        metrics[f"score/{index}"] = est
        series.append(
            {"x": index, "value": est.value, "low": est.low, "high": est.high, "n": est.n}
        )
        if index > 0:
            gains = [s - initial[t] for t, s in by_index[index].items() if t in initial]
            if gains:
                metrics[f"gain/{index}"] = bootstrap(
                    gains, _mean, rounds=rounds, level=level, seed=seed + 7919 * index
                )
    return series, metrics


class RevisionCurveInstrument:
    """Preference-model score per revision index of the run's revision traces."""

    requires = frozenset({"run", "preference_model"})

    def __init__(self, config: RevisionCurveConfig | None = None) -> None:
        self.config = config or RevisionCurveConfig()

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        from caikit_core.io.export import load_traces

        cfg = self.config
        if ctx.run_dir is None:
            raise CaikitError("revision-curve: needs a run directory (its revisions stage)")
        seed = ctx.seed if cfg.seed is None else cfg.seed
        traces = load_traces(Path(ctx.run_dir), stage=cfg.stage)
        skipped = sum(t.skipped_reason is not None for t in traces)
        kept = [t for t in traces if t.skipped_reason is None][: cfg.limit]
        items = revision_samples(kept)
        if not items:
            raise CaikitError(
                f"revision-curve: {ctx.run_dir}: stage '{cfg.stage}' has no traces to score "
                f"({len(traces)} traces, {skipped} skipped by the critic)"
            )
        scores = list(ctx.preference_model().score([s for _, _, s in items]))
        if len(scores) != len(items):
            raise CaikitError(
                f"revision-curve: the preference model returned {len(scores)} scores for "
                f"{len(items)} samples"
            )
        bad = [i for i, s in enumerate(scores) if not math.isfinite(float(s))]
        if bad:
            trace, index, _ = items[bad[0]]
            raise CaikitError(
                f"revision-curve: the preference model scored trace {trace.id!r} revision "
                f"{index} as {scores[bad[0]]}"
            )
        triples = [(t.id, i, float(s)) for (t, i, _), s in zip(items, scores, strict=True)]
        series, metrics = curve(triples, rounds=cfg.rounds, level=cfg.level, seed=seed)
        rows = [
            {
                "trace_id": trace.id,
                "prompt_id": trace.prompt_id,
                "revision": index,
                "principle_id": trace.steps[index - 1].principle_id if index else "",
                "score": float(score),
                "response": sample.response,
            }
            for (trace, index, sample), score in zip(items, scores, strict=True)
        ]
        notes = [f"{len(kept)} traces scored"]
        if skipped:
            notes.append(f"{skipped} traces skipped by the critic left out")
        settings = json.loads(json.dumps(attrs.asdict(cfg)))
        settings["seed"] = seed
        return EvalResult(
            instrument="revision-curve",
            metrics=metrics,
            series={"revision-curve": series},
            rows=rows,
            settings=settings,
            notes=notes,
        )


def register(register: Register) -> None:
    """Register the ``revision-curve`` instrument (wired into the plugin's hook at merge)."""
    register(
        "revision-curve",
        RevisionCurveInstrument,
        config=RevisionCurveConfig,
        description="preference-model score of the initial response and each revision, "
        "mean with a bootstrap interval per revision index (CAI paper Fig. 5)",
    )
