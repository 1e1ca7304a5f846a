"""``preference_model``: a preference model trained on the soft labels (RL-CAI).

Its trunk is ``models.preference``, else the feedback model, else the policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caikit_core.interfaces import FitReport
from caikit_core.stages.base import Context, Stage, StageResult
from caikit_core.stages.labels import labelled
from caikit_core.store import model_fingerprint


def metric_line(name: str, result: StageResult) -> list[str]:
    """``name: k v, ...`` for a fit stage's metrics, sorted by key."""
    if not result.metrics:
        return []
    return [f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))]


class PreferenceModelStage(Stage):
    name = "preference_model"
    phase = "rl"
    kind = "fit"
    inputs = ("labels",)
    roles = ("preference_model",)

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {"trunk": model_fingerprint(ctx.model("preference"))}

    def models(self, ctx: Context) -> dict[str, str]:
        return {"trunk": ctx.model("preference")}

    def fit(self, ctx: Context, out: Path) -> FitReport:
        role = ctx.role("preference_model")
        pm = role.spec().build(role.config, model=ctx.model("preference"))
        report: FitReport = pm.fit(labelled(ctx), out, **ctx.fit_options(pm))
        return report

    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        return metric_line(self.name, result)
