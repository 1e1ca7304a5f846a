"""Settings of the bundled feedback plugins: the ``constitutional`` critic and the
``direct`` and ``cot`` labellers.

:mod:`caikit_feedback.plugin` registers these classes; :mod:`caikit_feedback.critic`
and :mod:`caikit_feedback.labeller` read them.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from caikit_core import validators
from caikit_core.converter import InvalidValue

__all__ = ["ConstitutionalCriticConfig", "CotLabellerConfig", "DirectLabellerConfig", "clamp"]


def clamp(instance: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    """Nothing, or ``[lo, hi]`` with ``0 <= lo < hi <= 1``."""
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, int | float) for v in value)
    ):
        raise InvalidValue(attribute.name, f"expected two numbers [lo, hi], found {value!r}")
    lo, hi = value
    if not 0.0 <= lo < hi <= 1.0:
        raise InvalidValue(
            attribute.name, f"expected [lo, hi] with 0 <= lo < hi <= 1, found [{lo}, {hi}]"
        )


_top_p = validators.number_in(0, 1, low_open=True)


@attrs.frozen
class ConstitutionalCriticConfig:
    """Settings of the ``constitutional`` critic."""

    #: critique-revise steps per response (the paper used 4)
    revisions: int = attrs.field(default=4, validator=validators.positive_int)
    #: write a critique before each revision; false is the paper's ablation
    critique: bool = True
    #: how many of the constitution's few-shot examples to put before each request
    few_shot: int = attrs.field(default=0, validator=validators.non_negative_int)
    #: "latest": each step sees the prompt and the current response;
    #: "full": each step continues the previous step's conversation
    history: Literal["latest", "full"] = "latest"
    max_new_tokens: int = attrs.field(default=256, validator=validators.positive_int)
    temperature: float = attrs.field(default=0.7, validator=validators.non_negative_number)
    top_p: float = attrs.field(default=1.0, validator=_top_p)


@attrs.frozen
class DirectLabellerConfig:
    """Settings of the ``direct`` labeller."""

    #: how many of the constitution's feedback few-shot examples to put before each question
    few_shot: int = attrs.field(default=0, validator=validators.non_negative_int)
    #: ask in both orders of the options and average (removes position bias)
    debias: bool = attrs.field(default=True, validator=validators.boolean)
    #: average over this many distinct principles per comparison
    ensemble: int = attrs.field(default=1, validator=validators.positive_int)
    #: clamp p_a to [lo, hi]; none by default
    clamp: tuple[float, float] | None = attrs.field(default=None, validator=clamp)


@attrs.frozen
class CotLabellerConfig:
    """Settings of the ``cot`` (chain-of-thought) labeller."""

    #: how many of the constitution's chain-of-thought few-shot examples (those with a
    #: rationale) to put before each question
    few_shot: int = attrs.field(default=0, validator=validators.non_negative_int)
    #: reason and answer in both orders of the options and average
    debias: bool = attrs.field(default=True, validator=validators.boolean)
    #: average over this many distinct principles per comparison
    ensemble: int = attrs.field(default=1, validator=validators.positive_int)
    #: clamp p_a to [lo, hi]: chain-of-thought answers are over-confident (the paper
    #: clamps to 40-60 %); [0.0, 1.0] turns it off
    clamp: tuple[float, float] | None = attrs.field(default=(0.4, 0.6), validator=clamp)
    #: the longest reasoning, in tokens
    max_new_tokens: int = attrs.field(default=256, validator=validators.positive_int)
    #: sampling temperature of the reasoning (0 is greedy)
    temperature: float = attrs.field(default=0.7, validator=validators.non_negative_number)
    #: nucleus sampling of the reasoning
    top_p: float = attrs.field(default=1.0, validator=_top_p)
