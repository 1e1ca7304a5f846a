"""``responses``: the helpful model's first answer to each red-team prompt (SL-CAI)."""

from __future__ import annotations

from typing import Any

import attrs

from caikit_core.records import Prompt, Sample, stable_id
from caikit_core.stages.base import Context, SamplingWorker, Stage, WorkerSpec, sampling
from caikit_core.store import model_fingerprint


class RespondWorker(SamplingWorker):
    """One sampled answer per prompt."""

    stage = "responses"

    def __call__(self, batch: list[Prompt]) -> list[Sample]:
        return [
            Sample(stable_id("response", p.id), p.id, p.messages, g.texts[0], self.model)
            for p, g in zip(batch, self.sample(batch), strict=True)
        ]


class Responses(Stage):
    name = "responses"
    phase = "sl"
    kind = "map"
    inputs = ("prompts",)
    record_type = Sample
    roles = ("generator",)
    join = ("id", "prompt_id")

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {
            "sampling": attrs.asdict(sampling(ctx.config.sl.sampling)),
            "shard_size": ctx.config.shard_size,
            "policy": model_fingerprint(ctx.model("policy")),
        }

    def models(self, ctx: Context) -> dict[str, str]:
        return {"policy": ctx.model("policy")}

    def worker(self, ctx: Context) -> WorkerSpec:
        return RespondWorker.spec(ctx, ctx.model("policy"), ctx.config.sl.sampling)
