"""Registers caikit's bundled feedback plugins: the ``constitutional`` critic and the
``direct`` and ``cot`` labellers.

Nothing here imports a machine-learning framework: critics and labellers drive
whatever generator the run names. The settings live in :mod:`caikit_feedback.config`;
the factories import :mod:`caikit_feedback.critic` and :mod:`caikit_feedback.labeller`
when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from caikit_core import hookimpl
from caikit_core.hookspecs import Register
from caikit_core.interfaces import CHAIN_OF_THOUGHT, CLAMP, DEBIAS, REVISE_WITHOUT_CRITIQUE
from caikit_feedback.config import (
    ConstitutionalCriticConfig,
    CotLabellerConfig,
    DirectLabellerConfig,
)

if TYPE_CHECKING:
    from caikit_core.constitution import Constitution
    from caikit_core.interfaces import Generator
    from caikit_feedback.critic import ConstitutionalCritic
    from caikit_feedback.labeller import CotLabeller, DirectLabeller

__all__ = [
    "build_constitutional_critic",
    "build_cot_labeller",
    "build_direct_labeller",
    "register_critics",
    "register_labellers",
]


def build_constitutional_critic(
    config: ConstitutionalCriticConfig, *, generator: Generator, constitution: Constitution
) -> ConstitutionalCritic:
    """Critique-revise loop over sampled principles, batched across prompts."""
    from caikit_feedback.critic import ConstitutionalCritic

    return ConstitutionalCritic(config, generator, constitution)


def build_direct_labeller(
    config: DirectLabellerConfig, *, generator: Generator, constitution: Constitution
) -> DirectLabeller:
    """Multiple-choice feedback from option log-probs, debiased over both option orders."""
    from caikit_feedback.labeller import DirectLabeller

    return DirectLabeller(config, generator, constitution)


def build_cot_labeller(
    config: CotLabellerConfig, *, generator: Generator, constitution: Constitution
) -> CotLabeller:
    """Chain-of-thought multiple-choice feedback, clamped to [0.4, 0.6] by default."""
    from caikit_feedback.labeller import CotLabeller

    return CotLabeller(config, generator, constitution)


@hookimpl
def register_critics(register: Register) -> None:
    """Register the ``constitutional`` critic."""
    register(
        "constitutional",
        build_constitutional_critic,
        config=ConstitutionalCriticConfig,
        capabilities={REVISE_WITHOUT_CRITIQUE},
        check_settings={"max_new_tokens": 6, "revisions": 2},
    )


@hookimpl
def register_labellers(register: Register) -> None:
    """Register the ``direct`` and ``cot`` labellers.

    The capabilities are what each can do; an instance's ``capabilities`` say what
    its settings turn on (``debias`` unless it is off, ``clamp`` when one is set).
    """
    register(
        "direct",
        build_direct_labeller,
        config=DirectLabellerConfig,
        capabilities={DEBIAS, CLAMP},
    )
    register(
        "cot",
        build_cot_labeller,
        config=CotLabellerConfig,
        capabilities={CHAIN_OF_THOUGHT, CLAMP, DEBIAS},
        check_settings={"max_new_tokens": 8},
    )
