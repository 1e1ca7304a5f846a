"""The ``direct`` and ``cot`` labellers: RL-CAI's multiple-choice feedback.

Both put each comparison to the feedback model as a multiple-choice question
(Bai et al. 2022, arXiv 2212.08073, section 4.1) and read ``p_a`` from the
model's probabilities of the option letters. The conversation each request
sends, as chat turns::

    [few-shot examples]                       (``few_shot`` > 0), each:
      user:      <question>
      assistant: The answer is: (B)           (``direct``)
                 Let's think step-by-step: <rationale>
                 So the answer is: (B)         (``cot``)
    user:      Consider the following conversation between a human and an assistant:

               Human: ...

               Assistant: ...

               <feedback principle>
               Options:
               (A) <response>
               (B) <response>
    assistant: The answer is: (                 -- then "A" or "B" is scored (``direct``)
               Let's think step-by-step:        -- reasoning is generated, then
               <reasoning>
               So the answer is: (              -- "A" or "B" is scored (``cot``)

The shared part (the few-shot turns and the opening of the last question) is a
common prefix of every request with the same principle, and of every request
when the few-shot examples carry principles of their own (as the default
constitution's do); generators that reuse shared prefixes (the ``hf``
generator's ``prefix_reuse``) encode it once. A few-shot example with an empty
principle is asked under the principle of the request it precedes, as in the
paper, so with such examples the prefix is shared by the requests of one
principle.

``P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B))`` (:func:`option_probability`) for
the option log-probabilities of one request. With ``debias`` each principle is
asked in both orders of the options and ``P(A)`` averaged over the two:
``p = (P_AB(A) + P_BA(A)) / 2`` where ``P_BA(A) = 1 - P(letter A | order BA)``.
With ``ensemble = K`` that is averaged over K distinct principles. See
:func:`combine_options` for how the average is computed so that swapping the
responses gives exactly ``1 - p`` and identical responses exactly ``0.5``.

Every labeller call is batched: ``direct`` makes one ``score`` call for all
comparisons, orders and principles; ``cot`` one ``generate`` call for all the
reasoning and then one ``score`` call. Identical requests (identical responses
give the same question in both orders) are sent once.
"""

from __future__ import annotations

import abc
import logging
import math
import random
from collections.abc import Sequence
from typing import Any, ClassVar

import attrs

from caikit_core.constitution import (
    Constitution,
    FeedbackFewShot,
    FeedbackPrinciple,
    principle_rng,
)
from caikit_core.constitutions import few_shot_conversation
from caikit_core.errors import PluginError
from caikit_core.interfaces import CAN_SCORE, CHAIN_OF_THOUGHT, CLAMP, DEBIAS, Generator
from caikit_core.io.transcripts import render_transcript
from caikit_core.records import (
    FINISH_SKIPPED,
    Comparison,
    Conversation,
    GenerationRequest,
    Message,
    OptionScore,
    PreferenceLabel,
    SamplingParams,
    ScoreRequest,
    derive_seed,
    stable_id,
)
from caikit_feedback.config import CotLabellerConfig, DirectLabellerConfig

__all__ = [
    "ANSWER_PREFIX",
    "COT_ANSWER",
    "COT_CUE",
    "LEAD",
    "CotLabeller",
    "CotLabellerConfig",
    "DirectLabeller",
    "DirectLabellerConfig",
    "Question",
    "combine_options",
    "option_probability",
    "question",
]

log = logging.getLogger("caikit.feedback")

#: The first line of every question.
LEAD = "Consider the following conversation between a human and an assistant:"
#: How the ``direct`` labeller opens the answer; the option letter is scored next.
ANSWER_PREFIX = "The answer is: ("
#: How the ``cot`` labeller opens the answer; the reasoning is generated next.
COT_CUE = "Let's think step-by-step:"
#: What follows the reasoning; the option letter is scored next.
COT_ANSWER = "\nSo the answer is: ("
#: The scored continuations. With SmolLM2's tokenizer (and any byte-level BPE
#: without a merge of "(" and a letter), "A" and "B" are single tokens after "(",
#: whereas " A" / " B" would be the wrong (space-prefixed) tokens there.
OPTIONS = ("A", "B")
#: Where the model's reasoning is cut, so it does not answer inside the rationale.
COT_STOPS = ("So the answer is", "\nHuman:")

_GRID = 2.0**53  # probabilities are multiples of 1/_GRID, so that 1 - p is exact


# --- the prompt ----------------------------------------------------------------------


def question(messages: Sequence[Message], principle: str, first: str, second: str) -> str:
    """The multiple-choice question about ``messages``: (A) ``first`` or (B) ``second``."""
    return (
        f"{LEAD}\n\n{render_transcript(messages, other_roles=True)}\n\n{principle.strip()}\n"
        f"Options:\n(A) {first.strip()}\n(B) {second.strip()}"
    )


# --- the arithmetic ------------------------------------------------------------------


def option_probability(logprob_a: float, logprob_b: float) -> float:
    """``P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B))``: the two options renormalised.

    Computed as the logistic function of ``lp_A - lp_B`` without overflow. Equal
    log-probabilities (both ``-inf`` included) give 0.5; ``-inf`` against a finite
    value gives 0 or 1.

    >>> round(option_probability(-0.3, -1.6), 2)
    0.79

    :raises ValueError: a log-probability is NaN or ``+inf``.
    """
    for value in (logprob_a, logprob_b):
        if math.isnan(value) or value == math.inf:
            raise ValueError(f"expected a log-probability (<= 0 or -inf), found {value}")
    if logprob_a == logprob_b:
        return 0.5
    diff = logprob_a - logprob_b
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    odds = math.exp(diff)
    return odds / (1.0 + odds)


def combine_options(
    members: Sequence[tuple[tuple[float, float], tuple[float, float] | None]],
    clamp: tuple[float, float] | None = None,
) -> tuple[float, float | None]:
    """``(p_a, swap_consistency)`` from the option log-probs of each ensemble member.

    Each member is ``((lp_A, lp_B) in order AB, (lp_A, lp_B) in order BA or None)``,
    the log-probs of the option *letters* as shown. With both orders, a member's
    ``P(A) = (P_AB(A) + 1 - P_BA(letter A)) / 2``, computed as ``0.5 + t`` with
    ``t = (P_AB(letter A) - P_BA(letter A)) / 2``; without, ``t = P_AB(A) - 0.5``.
    ``p_a = 0.5 + mean(t)``, with ``mean(t)`` rounded to a multiple of 2**-53, then
    clamped to ``clamp``.

    This makes two properties exact rather than approximate: swapping the two
    responses swaps the orders, so ``t`` changes sign and ``p_a`` becomes exactly
    ``1 - p_a`` (under a clamp with ``1 - hi == lo``, such as the default
    ``(0.4, 0.6)``); identical responses give the same log-probs in both orders,
    so ``t == 0`` and ``p_a == 0.5``.

    ``swap_consistency`` (both orders only) is the mean over members of
    ``1 - |P_AB(A) - P_BA(A)| = 1 - |P_AB(letter A) + P_BA(letter A) - 1|``: 1 when
    the two orders agree, 0 when the model picks the same letter whatever it shows
    (pure position bias). ``None`` without both orders.

    :raises ValueError: no members, or a log-probability is NaN or ``+inf``.
    """
    if not members:
        raise ValueError("expected at least one ensemble member, found none")
    shifts: list[float] = []
    agreements: list[float] = []
    for ab, ba in members:
        p_ab = option_probability(*ab)
        if ba is None:
            shifts.append(p_ab - 0.5)
            continue
        p_ba = option_probability(*ba)
        shifts.append((p_ab - p_ba) / 2)
        agreements.append(1.0 - abs(p_ab - (1.0 - p_ba)))
    mean = math.fsum(shifts) / len(shifts)
    p = 0.5 + round(mean * _GRID) / _GRID
    if clamp is not None:
        p = min(max(p, clamp[0]), clamp[1])
    consistency = (
        math.fsum(agreements) / len(agreements) if len(agreements) == len(shifts) else None
    )
    return p, consistency


# --- settings ------------------------------------------------------------------------


# --- the labellers -------------------------------------------------------------------


@attrs.frozen
class Question:
    """One question: a comparison (its index in the batch) under one principle, in one
    order of the options, as the chat turns sent; ``seed`` seeds its reasoning (``cot``)."""

    comparison: int
    principle: FeedbackPrinciple
    order: str  # "AB" or "BA"
    messages: Conversation
    seed: int  # of the reasoning (``cot``)


class _MultipleChoiceLabeller(abc.ABC):
    """What ``direct`` and ``cot`` share: principles, questions, combination."""

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        few_shot: int,
        debias: bool,
        ensemble: int,
        clamp: tuple[float, float] | None,
        generator: Generator,
        constitution: Constitution,
        examples: Sequence[FeedbackFewShot],
        kind: str,
    ) -> None:
        where = f"labeller '{self.name}'"
        if CAN_SCORE not in getattr(generator, "capabilities", frozenset()):
            raise PluginError(
                f"{where}: the generator cannot score continuations (it lacks the "
                f"'{CAN_SCORE}' capability), and this labeller reads the option "
                "probabilities from log-probabilities; use a generator with that "
                "capability, e.g. 'hf'"
            )
        if not constitution.feedback:
            raise PluginError(
                f"{where}: constitution '{constitution.name}' has no feedback principles"
            )
        if ensemble > len(constitution.feedback):
            raise PluginError(
                f"{where}: ensemble = {ensemble}, but constitution '{constitution.name}' has "
                f"{len(constitution.feedback)} feedback principles"
            )
        if few_shot > len(examples):
            raise PluginError(
                f"{where}: few_shot = {few_shot}, but constitution '{constitution.name}' has "
                f"{len(examples)} {kind} examples"
            )
        self.generator = generator
        self.constitution = constitution
        self.debias = debias
        self.ensemble = ensemble
        self.clamp = clamp
        self.examples: list[tuple[FeedbackFewShot, Conversation]] = []
        for index, example in enumerate(examples[:few_shot]):
            try:
                self.examples.append((example, few_shot_conversation(example)))
            except ValueError as exc:
                raise PluginError(f"{where}: feedback few-shot example {index}: {exc}") from exc
        self.model = str(getattr(generator, "model_name", ""))
        self._few_shot_turns: dict[str, tuple[Message, ...]] = {}

    # --- building the questions

    def principles(self, comparison_id: str, seed: int) -> list[FeedbackPrinciple]:
        """The ``ensemble`` distinct principles a comparison is asked under."""
        rng: random.Random = principle_rng(seed, "feedback", comparison_id)
        return rng.sample(list(self.constitution.feedback), self.ensemble)

    @abc.abstractmethod
    def _answer(self, example: FeedbackFewShot) -> str:
        """The assistant turn answering a few-shot example."""

    def few_shot_turns(self, principle: FeedbackPrinciple) -> tuple[Message, ...]:
        """The few-shot turns before a question asked under ``principle``."""
        turns = self._few_shot_turns.get(principle.id)
        if turns is None:
            built: list[Message] = []
            for example, conversation in self.examples:
                text = example.principle.strip() or principle.text
                ask = question(conversation, text, example.response_a, example.response_b)
                built += [Message("user", ask), Message("assistant", self._answer(example))]
            turns = self._few_shot_turns[principle.id] = tuple(built)
        return turns

    def questions(self, comparisons: Sequence[Comparison], seed: int) -> list[Question]:
        """Every question of a batch: per comparison, principle and order."""
        orders = ("AB", "BA") if self.debias else ("AB",)
        out = []
        for index, comparison in enumerate(comparisons):
            for principle in self.principles(comparison.id, seed):
                for order in orders:
                    first, second = (
                        (comparison.response_a, comparison.response_b)
                        if order == "AB"
                        else (comparison.response_b, comparison.response_a)
                    )
                    ask = question(comparison.messages, principle.text, first, second)
                    # The seed depends on what is shown, not on the order's name, so a
                    # question identical in both orders is one request.
                    shown = stable_id(first.strip(), second.strip())
                    out.append(
                        Question(
                            comparison=index,
                            principle=principle,
                            order=order,
                            messages=(*self.few_shot_turns(principle), Message("user", ask)),
                            seed=derive_seed(seed, self.name, comparison.id, principle.id, shown),
                        )
                    )
        return out

    # --- talking to the generator

    def _score(
        self, queries: Sequence[Question], prefixes: Sequence[str]
    ) -> list[tuple[float, float]]:
        """``(lp_A, lp_B)`` per query, from one ``score`` call over the distinct requests.

        Requests are sent sorted by their content hash, so the call does not depend
        on the order of the comparisons (or of their responses).
        """
        keys = [
            stable_id("feedback-score", _unstructure(q.messages), prefix)
            for q, prefix in zip(queries, prefixes, strict=True)
        ]
        distinct: dict[str, ScoreRequest] = {}
        for key, query, prefix in zip(keys, queries, prefixes, strict=True):
            distinct.setdefault(key, ScoreRequest(key, query.messages, OPTIONS, prefix))
        requests = [distinct[key] for key in sorted(distinct)]
        scores = self.generator.score(requests)
        self._check(scores, requests, "scores")
        by_key: dict[str, tuple[float, float]] = {}
        for request, score in zip(requests, scores, strict=True):
            if len(score.logprobs) != len(OPTIONS):
                raise PluginError(
                    f"labeller '{self.name}': the generator returned {len(score.logprobs)} "
                    f"log-probabilities for the {len(OPTIONS)} options of request {request.id!r}"
                )
            by_key[request.id] = (float(score.logprobs[0]), float(score.logprobs[1]))
        return [by_key[key] for key in keys]

    def _check(self, results: Sequence[Any], requests: Sequence[Any], what: str) -> None:
        if len(results) != len(requests):
            raise PluginError(
                f"labeller '{self.name}': the generator returned {len(results)} {what} "
                f"for {len(requests)} requests"
            )

    # --- putting it together

    def _labels(
        self,
        comparisons: Sequence[Comparison],
        queries: Sequence[Question],
        logprobs: Sequence[tuple[float, float]],
        rationales: Sequence[str | None],
    ) -> list[PreferenceLabel]:
        evidence: list[list[OptionScore]] = [[] for _ in comparisons]
        members: list[dict[str, dict[str, tuple[float, float]]]] = [{} for _ in comparisons]
        for query, (lp_a, lp_b), rationale in zip(queries, logprobs, rationales, strict=True):
            evidence[query.comparison].append(
                OptionScore(query.principle.id, query.order, lp_a, lp_b, rationale)
            )
            members[query.comparison].setdefault(query.principle.id, {})[query.order] = (lp_a, lp_b)
        labels = []
        for index, comparison in enumerate(comparisons):
            try:
                p_a, consistency = combine_options(
                    [(orders["AB"], orders.get("BA")) for orders in members[index].values()],
                    self.clamp,
                )
            except ValueError as exc:
                raise PluginError(
                    f"labeller '{self.name}': comparison {comparison.id!r}: {exc}"
                ) from exc
            labels.append(
                PreferenceLabel(
                    id=stable_id("label", comparison.id),
                    comparison_id=comparison.id,
                    p_a=p_a,
                    labeller=self.name,
                    model=self.model,
                    evidence=tuple(evidence[index]),
                    swap_consistency=consistency,
                )
            )
        return labels


def _unstructure(messages: Conversation) -> list[list[str]]:
    return [[m.role, m.content] for m in messages]


class DirectLabeller(_MultipleChoiceLabeller):
    """Reads ``p_a`` from the option letters' probabilities right after the question."""

    name: ClassVar[str] = "direct"

    def __init__(
        self, config: DirectLabellerConfig, generator: Generator, constitution: Constitution
    ) -> None:
        super().__init__(
            few_shot=config.few_shot,
            debias=config.debias,
            ensemble=config.ensemble,
            clamp=config.clamp,
            generator=generator,
            constitution=constitution,
            examples=constitution.feedback_few_shot,
            kind="feedback few-shot",
        )
        self.config = config
        self.capabilities: frozenset[str] = frozenset(
            ({DEBIAS} if config.debias else set()) | ({CLAMP} if config.clamp else set())
        )

    def _answer(self, example: FeedbackFewShot) -> str:
        return f"{ANSWER_PREFIX}{example.answer})"

    def label(self, comparisons: Sequence[Comparison], *, seed: int) -> list[PreferenceLabel]:
        """One label per comparison, in order, from one ``score`` call."""
        if not comparisons:
            return []
        queries = self.questions(comparisons, seed)
        logprobs = self._score(queries, [ANSWER_PREFIX] * len(queries))
        return self._labels(comparisons, queries, logprobs, [None] * len(queries))


class CotLabeller(_MultipleChoiceLabeller):
    """Writes a chain of thought, then reads ``p_a`` from the option letters after it."""

    name: ClassVar[str] = "cot"

    def __init__(
        self, config: CotLabellerConfig, generator: Generator, constitution: Constitution
    ) -> None:
        super().__init__(
            few_shot=config.few_shot,
            debias=config.debias,
            ensemble=config.ensemble,
            clamp=config.clamp,
            generator=generator,
            constitution=constitution,
            examples=[e for e in constitution.feedback_few_shot if e.rationale is not None],
            kind="chain-of-thought feedback few-shot (with a rationale)",
        )
        self.config = config
        self.sampling = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            stop=COT_STOPS,
        )
        self.capabilities: frozenset[str] = frozenset(
            {CHAIN_OF_THOUGHT}
            | ({DEBIAS} if config.debias else set())
            | ({CLAMP} if config.clamp else set())
        )

    def _answer(self, example: FeedbackFewShot) -> str:
        rationale = (example.rationale or "").strip()
        return f"{COT_CUE} {rationale}{COT_ANSWER}{example.answer})"

    def label(self, comparisons: Sequence[Comparison], *, seed: int) -> list[PreferenceLabel]:
        """One label per comparison, in order, from one ``generate`` and one ``score`` call."""
        if not comparisons:
            return []
        queries = self.questions(comparisons, seed)
        reasoning = self._reason(queries)
        prefixes = [f"{COT_CUE}{text.rstrip()}{COT_ANSWER}" for text in reasoning]
        logprobs = self._score(queries, prefixes)
        return self._labels(comparisons, queries, logprobs, [text.strip() for text in reasoning])

    def _reason(self, queries: Sequence[Question]) -> list[str]:
        """The reasoning of every query, from one ``generate`` call over the distinct ones."""
        keys = [stable_id("feedback-reasoning", _unstructure(q.messages), q.seed) for q in queries]
        distinct: dict[str, GenerationRequest] = {}
        for key, query in zip(keys, queries, strict=True):
            distinct.setdefault(
                key,
                GenerationRequest(
                    id=key,
                    messages=query.messages,
                    sampling=self.sampling,
                    n=1,
                    seed=query.seed,
                    response_prefix=COT_CUE,
                ),
            )
        requests = [distinct[key] for key in sorted(distinct)]
        generations = self.generator.generate(requests)
        self._check(generations, requests, "generations")
        by_key: dict[str, str] = {}
        for request, generation in zip(requests, generations, strict=True):
            if FINISH_SKIPPED in generation.finish_reasons:
                log.warning(
                    "labeller 'cot': reasoning for request %s skipped by the generator (%s); "
                    "answering without it",
                    request.id,
                    generation.warnings[-1] if generation.warnings else "prompt too long",
                )
            by_key[request.id] = generation.texts[0] if generation.texts else ""
        return [by_key[key] for key in keys]
