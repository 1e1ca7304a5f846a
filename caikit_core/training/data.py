"""Training examples built from caikit records, shared by the policy-optimiser backends.

:func:`sft_examples` turns revision traces into conversational prompt-completion
examples (SL-CAI's fine-tuning data) and :func:`dpo_pairs` turns soft-labelled
comparisons into chosen/rejected pairs (RL-CAI's preference data), in the
conversational format TRL's trainers read; the ``torch`` and ``jax`` optimisers both
build their data with them. No torch, no JAX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from caikit_core.errors import CaikitError
from caikit_core.records import Conversation, LabelledComparison, RevisionTrace

__all__ = [
    "DPOPairs",
    "SFTExamples",
    "dpo_pairs",
    "require_dpo_pairs",
    "require_sft_examples",
    "sft_examples",
    "turns",
]

_WHO = "policy optimiser"


def turns(messages: Conversation) -> list[dict[str, str]]:
    """``messages`` as chat-template dicts (``role``, ``content``)."""
    return [{"role": m.role, "content": m.content} for m in messages]


@attrs.frozen
class SFTExamples:
    """The training examples built from revision traces, and what was left out.

    :ivar examples: conversational prompt-completion examples, in trace order.
    :ivar traces: the traces that gave at least one example.
    :ivar empty: traces left out because their final response is empty.
    :ivar marked_skipped: traces left out because the critic marked them skipped.
    """

    examples: list[dict[str, Any]]
    traces: int
    empty: int
    marked_skipped: int


def sft_examples(
    traces: Sequence[RevisionTrace], target: str = "final", *, who: str = _WHO
) -> SFTExamples:
    """Build conversational prompt-completion examples from revision traces.

    :param traces: the revision traces.
    :param target: ``"final"``: one example per trace, its final response.
        ``"all"``: one example per revision step with a non-empty revision (a
        trace without steps gives its final response).
    :param who: the plugin named in errors.
    :raises CaikitError: a trace has no prompt messages, or ``target`` is unknown.
    """
    if target not in ("final", "all"):
        raise CaikitError(f"{who}: unknown sft_target {target!r} (expected 'final' or 'all')")
    examples: list[dict[str, Any]] = []
    used = empty = marked = 0
    for trace in traces:
        if trace.skipped_reason is not None:
            marked += 1
            continue
        if not trace.final_response.strip():
            empty += 1
            continue
        if not trace.messages:
            raise CaikitError(f"{who}: revision trace {trace.id} has no prompt messages")
        prompt = [{"role": m.role, "content": m.content} for m in trace.messages]
        if target == "all" and trace.steps:
            texts = [step.revision for step in trace.steps if step.revision.strip()]
        else:
            texts = [trace.final_response]
        for text in texts:
            examples.append(
                {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}
            )
        used += bool(texts)
    return SFTExamples(examples, used, empty, marked)


@attrs.frozen
class DPOPairs:
    """DPO examples built from labelled comparisons, and what was left out.

    :ivar examples: conversational preference examples: ``prompt`` (the messages),
        ``chosen`` and ``rejected`` (one assistant turn each), in input order.
    :ivar ties: comparisons left out because ``p_a == 0.5``.
    :ivar identical: comparisons left out because both responses are the same text.
    :ivar label_noise: the mean of ``min(p_a, 1 - p_a)`` over the examples (0 with none).
    """

    examples: list[dict[str, Any]]
    ties: int
    identical: int
    label_noise: float


def dpo_pairs(labelled: Sequence[LabelledComparison], *, who: str = _WHO) -> DPOPairs:
    """Turn soft-labelled comparisons into chosen/rejected pairs (see the module).

    :raises CaikitError: a label that is not a finite number in [0, 1], or a
        comparison without prompt messages.
    """
    examples: list[dict[str, Any]] = []
    noise: list[float] = []
    ties = identical = 0
    for lc in labelled:
        c, p = lc.comparison, lc.label.p_a
        if not (isinstance(p, (int, float)) and math.isfinite(p) and 0.0 <= p <= 1.0):
            raise CaikitError(
                f"{who}: comparison {c.id} has label p_a = {p!r}; expected a finite number "
                "in [0, 1]"
            )
        if not c.messages:
            raise CaikitError(f"{who}: comparison {c.id} has no prompt messages")
        if c.response_a == c.response_b:
            identical += 1
            continue
        if p == 0.5:
            ties += 1
            continue
        chosen, rejected = (c.response_a, c.response_b) if p > 0.5 else (c.response_b, c.response_a)
        examples.append(
            {
                "prompt": turns(c.messages),
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
        noise.append(min(p, 1.0 - p))
    mean_noise = sum(noise) / len(noise) if noise else 0.0
    return DPOPairs(examples, ties, identical, mean_noise)


def require_sft_examples(
    traces: Sequence[RevisionTrace], target: str = "final", *, who: str = _WHO
) -> SFTExamples:
    """:func:`sft_examples`, refusing input that leaves nothing to train on.

    :raises CaikitError: no traces, or none with a final response to train on.
    """
    if not traces:
        raise CaikitError(f"{who}: sft was given no revision traces to train on")
    data = sft_examples(traces, target, who=who)
    if not data.examples:
        raise CaikitError(
            f"{who}: none of the {len(traces)} revision traces has a final response to "
            f"train on ({data.empty} empty, {data.marked_skipped} skipped)"
        )
    return data


def require_dpo_pairs(labelled: Sequence[LabelledComparison], *, who: str = _WHO) -> DPOPairs:
    """:func:`dpo_pairs`, refusing input that leaves no pair to train on.

    :raises CaikitError: no comparisons, or none with a preferred response.
    """
    if not labelled:
        raise CaikitError(f"{who}: dpo was given no labelled comparisons to train on")
    pairs = dpo_pairs(labelled, who=who)
    if not pairs.examples:
        raise CaikitError(
            f"{who}: none of the {len(labelled)} labelled comparisons has a preferred "
            f"response ({pairs.ties} ties at p_a = 0.5, {pairs.identical} with identical "
            "responses)"
        )
    return pairs
