"""Registers caikit's bundled feedback plugins.

Nothing here imports a machine-learning framework: critics and labellers drive
whatever generator the run names.
"""

from __future__ import annotations

from caikit_core import hookimpl
from caikit_core.hookspecs import Register
from caikit_core.interfaces import REVISE_WITHOUT_CRITIQUE
from caikit_feedback.critic import ConstitutionalCriticConfig, build_constitutional_critic


@hookimpl
def register_critics(register: Register) -> None:
    register(
        "constitutional",
        build_constitutional_critic,
        config=ConstitutionalCriticConfig,
        capabilities={REVISE_WITHOUT_CRITIQUE},
    )
