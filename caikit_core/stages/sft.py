"""``sft``: the policy fine-tuned on the final revisions (and helpfulness samples): SL-CAI.

Its checkpoint is the RL phase's policy and reference when the run has both phases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caikit_core.config import RunConfig
from caikit_core.interfaces import FitReport
from caikit_core.records import RevisionTrace
from caikit_core.stages.base import Context, Stage, StageResult
from caikit_core.store import fingerprint, model_fingerprint


class SFT(Stage):
    name = "sft"
    phase = "sl"
    kind = "fit"
    inputs = ("revisions", "helpfulness")
    roles = ("policy_optimiser",)

    @classmethod
    def included(cls, config: RunConfig) -> bool:
        return "sl" in config.phases and config.sl.sft

    def _upstream(self, ctx: Context) -> list[str]:
        return [n for n in self.inputs if n in ctx.fingerprints]

    def input_fingerprint(self, ctx: Context) -> str:
        return fingerprint(
            [ctx.fingerprints[n] for n in self._upstream(ctx)], what="the sft stage inputs"
        )

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {"policy": model_fingerprint(ctx.model("policy"))}

    def models(self, ctx: Context) -> dict[str, str]:
        return {"policy": ctx.model("policy")}

    def fit(self, ctx: Context, out: Path) -> FitReport:
        role = ctx.role("policy_optimiser")
        optimiser = role.spec().build(role.config)
        examples: list[RevisionTrace] = [
            t for name in self._upstream(ctx) for t in ctx.rows(name) if t.skipped_reason is None
        ]
        report: FitReport = optimiser.sft(
            ctx.model("policy"), examples, out, **ctx.fit_options(optimiser)
        )
        return report

    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        return [f"SL-CAI checkpoint: {result.artifact}"] if result.artifact else []
