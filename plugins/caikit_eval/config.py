"""Settings of the bundled instruments (``[eval.hhh]``, ``[eval.hh-alignment]``,
``[eval.position-bias]`` tables, or ``caikit eval NAME --set KEY=VALUE``)."""

from __future__ import annotations

from typing import Literal

import attrs

from caikit_core import validators

__all__ = ["HHAlignmentConfig", "HHHConfig", "PairSettings", "PositionBiasConfig"]

_level = validators.number_in(0, 1, low_open=True, high_open=True)


@attrs.frozen
class PairSettings:
    """What every pairwise instrument takes."""

    #: use the first N items of the file (none: all of them)
    limit: int | None = attrs.field(
        default=None, validator=validators.optional(validators.positive_int)
    )
    #: the data file (none: the instrument's file under ``../shared/data`` or ``$CAIKIT_DATA``)
    path: str | None = None
    #: comparisons per call to the labeller
    batch_size: int = attrs.field(default=8, validator=validators.positive_int)
    #: bootstrap resamples for the intervals
    rounds: int = attrs.field(default=1000, validator=validators.positive_int)
    #: the intervals' confidence level
    level: float = attrs.field(default=0.9, validator=_level)


@attrs.frozen
class HHHConfig(PairSettings):
    """Settings of the ``hhh`` instrument."""

    #: also score the run's trained preference model on the same items
    preference_model: bool = attrs.field(default=False, validator=validators.boolean)


@attrs.frozen
class HHAlignmentConfig(PairSettings):
    """Settings of the ``hh-alignment`` instrument."""


@attrs.frozen
class PositionBiasConfig(PairSettings):
    """Settings of the ``position-bias`` instrument."""

    #: the pairs: hh-rlhf harmless-base test (the default) or the 438 HHH comparisons
    data: Literal["hh-rlhf", "hhh"] = "hh-rlhf"
    #: bins of the swap-consistency histogram
    bins: int = attrs.field(default=10, validator=validators.positive_int)
