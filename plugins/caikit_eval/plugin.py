"""Registers caikit's bundled instruments: ``hhh``, ``hh-alignment`` and ``position-bias``.

The factories build the instrument objects only; the instruments load nothing until
``evaluate``, which builds the run's labeller (and preference model) through its context.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from caikit_core import hookimpl
from caikit_core.hookspecs import Register
from caikit_eval.config import HHAlignmentConfig, HHHConfig, PositionBiasConfig

if TYPE_CHECKING:
    from caikit_eval.hh_alignment import HHAlignment
    from caikit_eval.hhh import HHHAccuracy
    from caikit_eval.position_bias import PositionBias

__all__ = ["build_hh_alignment", "build_hhh", "build_position_bias", "register_evaluations"]

#: quick settings for the conformance kit (a few items, few bootstrap rounds)
QUICK = {"limit": 2, "rounds": 50}


def build_hhh(config: HHHConfig) -> HHHAccuracy:
    """Labeller accuracy on the 438 HHH comparisons, both option orders (CAI Fig. 4)."""
    from caikit_eval.hhh import HHHAccuracy

    return HHHAccuracy(config)


def build_hh_alignment(config: HHAlignmentConfig) -> HHAlignment:
    """Share of hh-rlhf harmless-base test pairs where the labeller agrees with the human."""
    from caikit_eval.hh_alignment import HHAlignment

    return HHAlignment(config)


def build_position_bias(config: PositionBiasConfig) -> PositionBias:
    """% same position preferred in both orders, debiasing off and on (RLAIF paper)."""
    from caikit_eval.position_bias import PositionBias

    return PositionBias(config)


@hookimpl
def register_evaluations(register: Register) -> None:
    """Register the bundled instruments: ``hhh``, ``hh-alignment``, ``position-bias``,
    ``compare``, ``evasiveness``, ``revision-curve`` and ``goodhart``."""
    from caikit_eval import compare, evasiveness, goodhart, revision_curve

    register("hhh", build_hhh, config=HHHConfig, check_settings=QUICK)
    register("hh-alignment", build_hh_alignment, config=HHAlignmentConfig, check_settings=QUICK)
    register("position-bias", build_position_bias, config=PositionBiasConfig, check_settings=QUICK)
    for module in (compare, evasiveness, revision_curve, goodhart):
        module.register(register)
