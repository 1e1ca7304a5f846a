"""The ``constitutional`` critic: the SL-CAI critique-revise loop.

For every response, ``revisions`` times: sample a critique/revision principle
(a different one each step while the constitution has enough), ask the model to
critique its current response against it, then to revise the response in the
light of the critique. Each step is **one generator call over all samples
still in play** (two with critique), so a batch of prompts costs
``2 * revisions`` generator calls, however many prompts it has.

The conversation each request sends, as chat turns::

    [few-shot conversations]              (``few_shot`` > 0)
    user:       <red-team prompt>
    assistant:  <current response>
    user:       <critique request>
    assistant:  <critique>                -- generated
    user:       <revision request>
    assistant:  <revision>                -- generated

With ``critique = false`` (the paper's ablation) the critique turns are left out
and the revision request follows the response directly. With
``history = "full"`` each step continues the previous step's conversation; with
``"latest"`` (default) each step starts from the prompt and the current
response, which keeps prompts short for small-context models.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from caikit_core.constitution import Constitution, CritiqueRevisionPrinciple, principle_rng
from caikit_core.errors import PluginError
from caikit_core.interfaces import REVISE_WITHOUT_CRITIQUE, Generator
from caikit_core.records import (
    FINISH_SKIPPED,
    GenerationRequest,
    Message,
    RevisionStep,
    RevisionTrace,
    Sample,
    SamplingParams,
    derive_seed,
    stable_id,
)
from caikit_feedback.config import ConstitutionalCriticConfig

log = logging.getLogger("caikit.feedback")


class ConstitutionalCritic:
    """Critique and revise responses against sampled constitutional principles."""

    capabilities: frozenset[str] = frozenset({REVISE_WITHOUT_CRITIQUE})

    def __init__(
        self, config: ConstitutionalCriticConfig, generator: Generator, constitution: Constitution
    ) -> None:
        if not constitution.critique_revision:
            raise PluginError(
                f"critic 'constitutional': constitution '{constitution.name}' has no "
                "critique/revision principles"
            )
        if config.few_shot > len(constitution.critique_few_shot):
            raise PluginError(
                f"critic 'constitutional': few_shot = {config.few_shot}, but constitution "
                f"'{constitution.name}' has {len(constitution.critique_few_shot)} examples"
            )
        self.config = config
        self.generator = generator
        self.constitution = constitution
        self.sampling = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
        )
        self.prefix = self._few_shot_prefix()

    def _few_shot_prefix(self) -> tuple[Message, ...]:
        turns: list[Message] = []
        for example in self.constitution.critique_few_shot[: self.config.few_shot]:
            turns.extend(example.messages)
            if self.config.critique:
                turns += [
                    Message("user", example.critique_request),
                    Message("assistant", example.critique),
                ]
            turns += [
                Message("user", example.revision_request),
                Message("assistant", example.revision),
            ]
        return tuple(turns)

    def principles(self, sample_id: str, seed: int) -> list[CritiqueRevisionPrinciple]:
        """The principles of one trace: distinct while the constitution has enough."""
        pool = list(self.constitution.critique_revision)
        rng: random.Random = principle_rng(seed, "critique-revision", sample_id)
        chosen: list[CritiqueRevisionPrinciple] = []
        while len(chosen) < self.config.revisions:
            take = min(len(pool), self.config.revisions - len(chosen))
            chosen.extend(rng.sample(pool, take))
        return chosen

    def _request(
        self, sample: Sample, step: int, kind: str, messages: tuple[Message, ...], seed: int
    ) -> GenerationRequest:
        return GenerationRequest(
            id=f"{sample.id}/{step}/{kind}",
            messages=self.prefix + messages,
            sampling=self.sampling,
            n=1,
            seed=derive_seed(seed, sample.id, step, kind),
        )

    def revise(self, samples: Sequence[Sample], *, seed: int) -> list[RevisionTrace]:
        n = len(samples)
        if n == 0:
            return []
        plans = [self.principles(s.id, seed) for s in samples]
        current = [s.response for s in samples]
        history: list[tuple[Message, ...]] = [
            (*s.messages, Message("assistant", s.response)) for s in samples
        ]
        steps: list[list[RevisionStep]] = [[] for _ in samples]
        skipped: list[str | None] = [None] * n
        active = [i for i in range(n) if samples[i].response.strip()]
        for i in range(n):
            if i not in active:
                skipped[i] = "empty initial response"
        for step in range(self.config.revisions):
            if not active:
                break
            context = {
                i: history[i]
                if self.config.history == "full"
                else (*samples[i].messages, Message("assistant", current[i]))
                for i in active
            }
            critiques: dict[int, str] = {i: "" for i in active}
            log.info(
                "critic: step %d/%d over %d responses", step + 1, self.config.revisions, len(active)
            )
            if self.config.critique:
                requests = [
                    self._request(
                        samples[i],
                        step,
                        "critique",
                        (*context[i], Message("user", plans[i][step].critique)),
                        seed,
                    )
                    for i in active
                ]
                for i, gen in zip(active, self._generate(requests), strict=True):
                    if FINISH_SKIPPED in gen.finish_reasons:
                        skipped[i] = _reason(gen.warnings, "critique", step)
                    critiques[i] = gen.texts[0].strip()
                active = [i for i in active if skipped[i] is None]
                for i in active:
                    context[i] = (
                        *context[i],
                        Message("user", plans[i][step].critique),
                        Message("assistant", critiques[i]),
                    )
            requests = [
                self._request(
                    samples[i],
                    step,
                    "revision",
                    (*context[i], Message("user", plans[i][step].revision)),
                    seed,
                )
                for i in active
            ]
            still: list[int] = []
            for i, gen in zip(active, self._generate(requests), strict=True):
                if FINISH_SKIPPED in gen.finish_reasons:
                    skipped[i] = _reason(gen.warnings, "revision", step)
                    continue
                revision = gen.texts[0].strip()
                principle = plans[i][step]
                steps[i].append(
                    RevisionStep(
                        index=step,
                        principle_id=principle.id,
                        critique_prompt=principle.critique if self.config.critique else "",
                        critique=critiques[i],
                        revision_prompt=principle.revision,
                        revision=revision,
                    )
                )
                if revision:
                    current[i] = revision
                history[i] = (
                    *context[i],
                    Message("user", principle.revision),
                    Message("assistant", revision),
                )
                still.append(i)
            active = still
        return [
            RevisionTrace(
                id=stable_id("revision", s.id),
                prompt_id=s.prompt_id,
                messages=s.messages,
                initial_response=s.response,
                steps=tuple(steps[i]),
                final_response=current[i],
                critic="constitutional",
                skipped_reason=skipped[i],
            )
            for i, s in enumerate(samples)
        ]

    def _generate(self, requests: list[GenerationRequest]) -> list[Any]:
        generations = self.generator.generate(requests)
        if len(generations) != len(requests):
            raise PluginError(
                f"critic 'constitutional': the generator returned {len(generations)} results "
                f"for {len(requests)} requests"
            )
        return list(generations)


def _reason(warnings: Sequence[str], kind: str, step: int) -> str:
    detail = warnings[-1] if warnings else "prompt too long"
    return f"{kind} request of step {step} skipped by the generator: {detail}"
