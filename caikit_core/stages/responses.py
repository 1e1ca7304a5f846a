"""``responses``: the helpful model's first answer to each red-team prompt (SL-CAI)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from caikit_core.records import (
    GenerationRequest,
    Prompt,
    Sample,
    SamplingParams,
    derive_seed,
    stable_id,
)
from caikit_core.stages.base import (
    Context,
    RoleRef,
    Stage,
    WorkerSpec,
    check_count,
    plugin_instance,
    sampling,
)
from caikit_core.store import model_fingerprint


class RespondWorker:
    """One sampled answer per prompt, seeded by the prompt id."""

    def __init__(
        self, *, generator: RoleRef, model: str, sampling: SamplingParams, seed: int
    ) -> None:
        self.generator_role = generator
        self.generator = plugin_instance(generator, model=model)
        self.model = model
        self.sampling = sampling
        self.seed = seed

    def __call__(self, batch: list[Prompt]) -> list[Sample]:
        requests = [
            GenerationRequest(
                p.id, p.messages, self.sampling, 1, derive_seed(self.seed, p.id, "responses")
            )
            for p in batch
        ]
        generations = self.generator.generate(requests)
        check_count("responses", self.generator_role, generations, len(requests))
        return [
            Sample(stable_id("response", p.id), p.id, p.messages, g.texts[0], self.model)
            for p, g in zip(batch, generations, strict=True)
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

    def items(self, ctx: Context) -> Sequence[Prompt]:
        return ctx.rows("prompts")

    def worker(self, ctx: Context) -> WorkerSpec:
        return WorkerSpec(
            RespondWorker,
            {
                "generator": ctx.role("generator"),
                "model": ctx.model("policy"),
                "sampling": sampling(ctx.config.sl.sampling),
                "seed": ctx.seed,
            },
        )
