"""The ``jax`` plugins: a policy optimiser (SFT, DPO, PPO) and a preference model on JAX.

This module is what the ``caikit`` entry point names. It holds the factories and
registrations; the settings are :mod:`caikit_jax.config`'s (re-exported here),
which extend the same backend-neutral settings as the ``torch`` plugins', so
switching a run between backends is one line (``plugin = "jax"``). Models are
sharded over every visible JAX device (an ``(fsdp, tp)`` mesh of shape
``(devices, 1)``).

This module imports neither JAX, Tunix nor torch: the factories import
:mod:`caikit_jax.optimiser` and :mod:`caikit_jax.reward` when they run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caikit_core.hookspecs import Register, hookimpl
from caikit_jax.config import (
    CAPABILITIES,
    JAX_ALGORITHMS,
    PM_CAPABILITIES,
    JaxOptimiserConfig,
    JaxPreferenceConfig,
)

if TYPE_CHECKING:
    from caikit_jax.optimiser import JaxOptimiser
    from caikit_jax.reward import JaxPreferenceModel

__all__ = [
    "CAPABILITIES",
    "CHECK_SETTINGS",
    "JAX_ALGORITHMS",
    "PM_CHECK_SETTINGS",
    "JaxOptimiserConfig",
    "JaxPreferenceConfig",
    "build_optimiser",
    "build_preference_model",
    "register_policy_optimisers",
    "register_preference_models",
]

_QUICK = {"learning_rate": 1e-2, "max_length": 256}
#: The conformance kit's quick CPU settings for the policy optimiser.
CHECK_SETTINGS: dict[str, Any] = {
    "sft": {**_QUICK, "max_steps": 4, "batch_size": 4},
    "dpo": {**_QUICK, "max_steps": 4, "batch_size": 4},
    "ppo": dict(_QUICK),
}
#: The conformance kit's quick CPU settings for the preference model.
PM_CHECK_SETTINGS: dict[str, Any] = {
    "learning_rate": 3e-3,
    "epochs": 2.0,
    "batch_size": 8,
    "max_length": 128,
}


def build_optimiser(config: JaxOptimiserConfig) -> JaxOptimiser:
    """SFT, DPO and PPO on JAX (Tunix's Llama with caikit's shims)."""
    from caikit_jax.optimiser import JaxOptimiser

    return JaxOptimiser(config)


def build_preference_model(config: JaxPreferenceConfig, *, model: str) -> JaxPreferenceModel:
    """A scalar head on a Llama trunk in JAX, trained on soft labels."""
    from caikit_jax.reward import JaxPreferenceModel

    return JaxPreferenceModel(config, model)


@hookimpl
def register_policy_optimisers(register: Register) -> None:
    """Register the ``jax`` policy optimiser."""
    register(
        "jax",
        build_optimiser,
        config=JaxOptimiserConfig,
        capabilities=CAPABILITIES,
        description="SFT on revisions, DPO and PPO on JAX (Tunix Llama, sharded over devices)",
        check_settings=CHECK_SETTINGS,
    )


@hookimpl
def register_preference_models(register: Register) -> None:
    """Register the ``jax`` preference model."""
    register(
        "jax",
        build_preference_model,
        config=JaxPreferenceConfig,
        capabilities=PM_CAPABILITIES,
        description="a scalar head on a Llama trunk in JAX, trained on soft labels",
        check_settings=PM_CHECK_SETTINGS,
    )
