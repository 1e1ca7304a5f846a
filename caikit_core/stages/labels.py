"""``labels``: the feedback model's soft preference between each pair (RL-CAI).

The labeller drives the run's generator on the feedback model (``models.feedback``,
else the policy). Every label is checked: a finite P(A) in [0, 1], for the right
comparison.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow.parquet as pq

from caikit_core.errors import StageError
from caikit_core.records import Comparison, PreferenceLabel, iter_from_arrow
from caikit_core.stages.base import (
    Context,
    FeedbackWorker,
    Stage,
    StageResult,
    WorkerSpec,
    check_count,
)
from caikit_core.store import model_fingerprint


class LabelWorker(FeedbackWorker):
    """Runs the labeller over a batch of comparisons and checks what it returns."""

    stage = "labels"
    role = "labeller"

    def __call__(self, batch: list[Comparison]) -> list[PreferenceLabel]:
        labels: list[PreferenceLabel] = self.plugin.label(batch, seed=self.seed)
        check_count(self.stage, self.plugin_role, labels, len(batch))
        bad = [
            f"{c.id} (p_a={x.p_a!r})"
            for c, x in zip(batch, labels, strict=True)
            if not (isinstance(x.p_a, float) and math.isfinite(x.p_a) and 0.0 <= x.p_a <= 1.0)
        ]
        wrong = [c.id for c, x in zip(batch, labels, strict=True) if x.comparison_id != c.id]
        if bad or wrong:
            what = (
                "probabilities that are not finite numbers in [0, 1] for records " + ", ".join(bad)
                if bad
                else f"labels for the wrong comparisons at records {', '.join(wrong)}"
            )
            spec = self.plugin_role.spec()
            raise StageError(
                f"stage 'labels': labeller '{spec.name}' ({spec.origin()}) returned {what}"
            )
        return labels


class Labels(Stage):
    name = "labels"
    phase = "rl"
    kind = "map"
    inputs = ("pairs",)
    record_type = PreferenceLabel
    roles = ("generator", "labeller")
    join = ("id", "comparison_id")

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {
            "shard_size": ctx.config.shard_size,
            "feedback": model_fingerprint(ctx.model("feedback")),
        }

    def models(self, ctx: Context) -> dict[str, str]:
        return {"feedback": ctx.model("feedback")}

    def worker(self, ctx: Context) -> WorkerSpec:
        return LabelWorker.spec(ctx, ctx.model("feedback"))

    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        """The P(A) histogram, the preferred side, and mean swap-consistency."""
        tables = (pq.read_table(p) for p in ctx.store.shard_paths(self.name, result.fingerprint))
        labels = list(iter_from_arrow(tables, PreferenceLabel))
        if not labels:
            return []
        bins = [0] * 5
        for x in labels:
            bins[min(4, int(x.p_a * 5))] += 1
        shown = "  ".join(
            f"[{i / 5:.1f},{(i + 1) / 5:.1f}{']' if i == 4 else ')'}: {n}"
            for i, n in enumerate(bins)
        )
        prefer_a = sum(x.p_a > 0.5 for x in labels)
        ties = sum(x.p_a == 0.5 for x in labels)
        lines = [
            f"labels: {len(labels)}; P(A) distribution  {shown}",
            f"  prefer A: {prefer_a}, prefer B: {len(labels) - prefer_a - ties}, ties: {ties}",
        ]
        swaps = [x.swap_consistency for x in labels if x.swap_consistency is not None]
        if swaps:
            lines.append(f"  swap-consistency: mean {sum(swaps) / len(swaps):.3f}")
        return lines


def labelled(ctx: Context) -> list[Any]:
    """The labelled comparisons: each label joined to its pair by comparison id."""
    from caikit_core.records import LabelledComparison

    comparisons = {c.id: c for c in ctx.rows("pairs")}
    return [LabelledComparison(comparisons[x.comparison_id], x) for x in ctx.rows("labels")]
