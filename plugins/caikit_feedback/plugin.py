"""Registers caikit's bundled feedback plugins.

Nothing here imports a machine-learning framework: critics and labellers drive
whatever generator the run names.
"""

from __future__ import annotations

from caikit_core import hookimpl
from caikit_core.hookspecs import Register
from caikit_core.interfaces import CHAIN_OF_THOUGHT, CLAMP, DEBIAS, REVISE_WITHOUT_CRITIQUE
from caikit_feedback.critic import ConstitutionalCriticConfig, build_constitutional_critic
from caikit_feedback.labeller import (
    CotLabellerConfig,
    DirectLabellerConfig,
    build_cot_labeller,
    build_direct_labeller,
)


@hookimpl
def register_critics(register: Register) -> None:
    register(
        "constitutional",
        build_constitutional_critic,
        config=ConstitutionalCriticConfig,
        capabilities={REVISE_WITHOUT_CRITIQUE},
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
    )
