"""``helpfulness``: helpful-only samples mixed into the SFT data (the paper added 2 per prompt).

Each sample is stored as a trace without revision steps, so the SFT optimiser
trains on it as it is. Runs when the run file sets ``sl.helpfulness_prompts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from caikit_core.config import RunConfig
from caikit_core.records import Prompt, RevisionTrace, stable_id
from caikit_core.stages.base import Context, SamplingWorker, Stage, WorkerSpec, sampling
from caikit_core.store import file_digest, model_fingerprint


class HelpfulnessWorker(SamplingWorker):
    """``samples`` answers per helpfulness prompt; empty answers are dropped."""

    stage = "helpfulness"

    def __call__(self, batch: list[Prompt]) -> list[RevisionTrace]:
        return [
            RevisionTrace(
                stable_id("helpfulness", p.id, k), p.id, p.messages, text, (), text, "helpfulness"
            )
            for p, g in zip(batch, self.sample(batch), strict=True)
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
        sl = ctx.config.sl
        return HelpfulnessWorker.spec(
            ctx, ctx.model("policy"), sl.sampling, samples=sl.helpfulness_samples
        )
