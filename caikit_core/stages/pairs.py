"""``pairs``: two sampled answers per red-team prompt from the RL policy (RL-CAI).

The policy is the SFT checkpoint when the run trains one, else ``models.policy``.
"""

from __future__ import annotations

from typing import Any

import attrs

from caikit_core.errors import StageError
from caikit_core.records import Comparison, Prompt, stable_id
from caikit_core.stages.base import Context, SamplingWorker, Stage, WorkerSpec, sampling


class PairWorker(SamplingWorker):
    """Two samples per prompt, as one comparison."""

    stage = "pairs"

    def __call__(self, batch: list[Prompt]) -> list[Comparison]:
        out = []
        for p, g in zip(batch, self.sample(batch), strict=True):
            if len(g.texts) != 2:
                raise StageError(
                    f"stage 'pairs': generator returned {len(g.texts)} samples for "
                    f"record {p.id}, expected 2"
                )
            a, b = g.texts
            out.append(Comparison(stable_id("pair", p.id), p.id, p.messages, a, b, self.model))
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

    def worker(self, ctx: Context) -> WorkerSpec:
        return PairWorker.spec(ctx, ctx.rl_policy()[0], ctx.config.rl.sampling, samples=2)
