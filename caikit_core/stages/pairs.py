"""``pairs``: two sampled answers per red-team prompt from the RL policy (RL-CAI).

The policy is the SFT checkpoint when the run trains one, else ``models.policy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from caikit_core.errors import StageError
from caikit_core.records import (
    Comparison,
    GenerationRequest,
    Prompt,
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


class PairWorker:
    """Two samples per prompt, as one comparison."""

    def __init__(
        self, *, generator: RoleRef, model: str, sampling: SamplingParams, seed: int
    ) -> None:
        self.generator_role = generator
        self.generator = plugin_instance(generator, model=model)
        self.model = model
        self.sampling = sampling
        self.seed = seed

    def __call__(self, batch: list[Prompt]) -> list[Comparison]:
        requests = [
            GenerationRequest(
                p.id, p.messages, self.sampling, 2, derive_seed(self.seed, p.id, "pairs")
            )
            for p in batch
        ]
        generations = self.generator.generate(requests)
        check_count("pairs", self.generator_role, generations, len(requests))
        out = []
        for p, g in zip(batch, generations, strict=True):
            if len(g.texts) != 2:
                raise StageError(
                    f"stage 'pairs': generator returned {len(g.texts)} samples for "
                    f"record {p.id}, expected 2"
                )
            out.append(
                Comparison(
                    stable_id("pair", p.id), p.id, p.messages, g.texts[0], g.texts[1], self.model
                )
            )
        return out


class Pairs(Stage):
    name = "pairs"
    phase = "rl"
    kind = "map"
    inputs = ("prompts",)
    record_type = Comparison
    roles = ("generator",)
    join = ("id", "prompt_id")

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {
            "sampling": attrs.asdict(sampling(ctx.config.rl.sampling)),
            "shard_size": ctx.config.shard_size,
            "policy": ctx.rl_policy()[1],
        }

    def models(self, ctx: Context) -> dict[str, str]:
        return {"policy": ctx.rl_policy()[0]}

    def items(self, ctx: Context) -> Sequence[Prompt]:
        return ctx.rows("prompts")

    def worker(self, ctx: Context) -> WorkerSpec:
        return WorkerSpec(
            PairWorker,
            {
                "generator": ctx.role("generator"),
                "model": ctx.rl_policy()[0],
                "sampling": sampling(ctx.config.rl.sampling),
                "seed": ctx.seed,
            },
        )
