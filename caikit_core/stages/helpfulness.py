"""``helpfulness``: helpful-only samples mixed into the SFT data (the paper added 2 per prompt).

Each sample is stored as a trace without revision steps, so the SFT optimiser
trains on it as it is. Runs when the run file sets ``sl.helpfulness_prompts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from caikit_core.config import RunConfig
from caikit_core.records import (
    GenerationRequest,
    Prompt,
    RevisionTrace,
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
from caikit_core.store import file_digest, model_fingerprint


class HelpfulnessWorker:
    """``samples`` answers per helpfulness prompt; empty answers are dropped."""

    def __init__(
        self, *, generator: RoleRef, model: str, sampling: SamplingParams, samples: int, seed: int
    ) -> None:
        self.generator_role = generator
        self.generator = plugin_instance(generator, model=model)
        self.sampling = sampling
        self.samples = samples
        self.seed = seed

    def __call__(self, batch: list[Prompt]) -> list[RevisionTrace]:
        requests = [
            GenerationRequest(
                p.id,
                p.messages,
                self.sampling,
                self.samples,
                derive_seed(self.seed, p.id, "helpfulness"),
            )
            for p in batch
        ]
        generations = self.generator.generate(requests)
        check_count("helpfulness", self.generator_role, generations, len(requests))
        return [
            RevisionTrace(
                stable_id("helpfulness", p.id, k), p.id, p.messages, text, (), text, "helpfulness"
            )
            for p, g in zip(batch, generations, strict=True)
            for k, text in enumerate(g.texts)
            if text.strip()
        ]


class Helpfulness(Stage):
    name = "helpfulness"
    phase = "sl"
    kind = "map"
    record_type = RevisionTrace
    roles = ("generator",)
    join = ("id", "prompt_id")

    @classmethod
    def included(cls, config: RunConfig) -> bool:
        return "sl" in config.phases and config.sl.helpfulness_prompts is not None

    def _file(self, ctx: Context) -> Any:
        from caikit_core.io.prompts import PromptFileError

        assert ctx.config.sl.helpfulness_prompts is not None
        path = ctx.path(ctx.config.sl.helpfulness_prompts)
        if not path.is_file():
            raise PromptFileError(
                f"{path}: prompt file not found (sl.helpfulness_prompts in {ctx.run.source})"
            )
        return path

    def input_fingerprint(self, ctx: Context) -> str:
        return file_digest(self._file(ctx), what="the helpfulness prompt file")

    def settings(self, ctx: Context) -> dict[str, Any]:
        return {
            "sampling": attrs.asdict(sampling(ctx.config.sl.sampling)),
            "samples": ctx.config.sl.helpfulness_samples,
            "shard_size": ctx.config.shard_size,
            "policy": model_fingerprint(ctx.model("policy")),
        }

    def models(self, ctx: Context) -> dict[str, str]:
        return {"policy": ctx.model("policy")}

    def items(self, ctx: Context) -> Sequence[Prompt]:
        from caikit_core.io.prompts import read_prompts

        return read_prompts(self._file(ctx))

    def worker(self, ctx: Context) -> WorkerSpec:
        return WorkerSpec(
            HelpfulnessWorker,
            {
                "generator": ctx.role("generator"),
                "model": ctx.model("policy"),
                "sampling": sampling(ctx.config.sl.sampling),
                "samples": ctx.config.sl.helpfulness_samples,
                "seed": ctx.seed,
            },
        )
