"""The ``torch`` plugins: a policy optimiser (SFT and RL with TRL) and a preference model.

This module is what the ``caikit`` entry point names. It holds the plugins'
factories and registrations; their settings are :mod:`caikit_torch.config`'s
(re-exported here). It imports neither torch, transformers nor TRL: the factories
import :mod:`caikit_torch.optimiser` and :mod:`caikit_torch.reward` when they run.

A run file configures them in its ``[policy_optimiser]`` (with one table per
algorithm, see :mod:`caikit_core.training.settings`) and ``[preference_model]``
tables::

    [policy_optimiser]
    plugin = "torch"
    algorithm = "ppo"      # RL-CAI: "ppo", "dpo", "rloo" or "grpo"
    lora = false

    [policy_optimiser.sft]
    learning_rate = 2e-5
    epochs = 1

    [policy_optimiser.ppo]
    kl_coef = 0.05

    [preference_model]
    plugin = "torch"
    learning_rate = 1e-5
    epochs = 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caikit_core.hookspecs import Register, hookimpl
from caikit_torch.config import (
    ALGORITHMS,
    CAPABILITIES,
    DEVICES,
    DPO_LOSSES,
    DTYPES,
    PM_CAPABILITIES,
    SFT_TARGETS,
    SMOOTHED_DPO_LOSSES,
    TorchOptimiserConfig,
    TorchPreferenceConfig,
)

if TYPE_CHECKING:
    from caikit_torch.optimiser import TorchOptimiser
    from caikit_torch.reward import TorchPreferenceModel

__all__ = [
    "ALGORITHMS",
    "CAPABILITIES",
    "CHECK_SETTINGS",
    "DEVICES",
    "DPO_LOSSES",
    "DTYPES",
    "PM_CAPABILITIES",
    "PM_CHECK_SETTINGS",
    "SFT_TARGETS",
    "SMOOTHED_DPO_LOSSES",
    "TorchOptimiserConfig",
    "TorchPreferenceConfig",
    "build_optimiser",
    "build_preference_model",
    "register_policy_optimisers",
    "register_preference_models",
]

_QUICK = {"learning_rate": 1e-2, "max_length": 256}
#: The conformance kit's quick CPU settings for the policy optimiser (a tiny model
#: learns visibly in a few steps at this rate).
CHECK_SETTINGS: dict[str, Any] = {
    "lora_dropout": 0.0,
    "device": "cpu",
    "sft": {**_QUICK, "max_steps": 4, "batch_size": 4},
    "dpo": {**_QUICK, "max_steps": 4, "batch_size": 4},
    "ppo": dict(_QUICK),
    "rloo": dict(_QUICK),
    "grpo": dict(_QUICK),
}
#: The conformance kit's quick CPU settings for the preference model.
PM_CHECK_SETTINGS: dict[str, Any] = {
    "learning_rate": 3e-3,
    "epochs": 2.0,
    "batch_size": 8,
    "max_length": 128,
    "device": "cpu",
}


def build_optimiser(config: TorchOptimiserConfig) -> TorchOptimiser:
    """SFT on revisions and RL-CAI (PPO, DPO, RLOO, GRPO) with TRL, CPU or CUDA."""
    from caikit_torch.optimiser import TorchOptimiser

    return TorchOptimiser(config)


def build_preference_model(config: TorchPreferenceConfig, *, model: str) -> TorchPreferenceModel:
    """A scalar reward head on a causal LM trunk, trained on soft AI labels with TRL."""
    from caikit_torch.reward import TorchPreferenceModel

    return TorchPreferenceModel(config, model)


@hookimpl
def register_policy_optimisers(register: Register) -> None:
    """Register the ``torch`` policy optimiser."""
    register(
        "torch",
        build_optimiser,
        config=TorchOptimiserConfig,
        capabilities=CAPABILITIES,
        description="SFT on revisions, and PPO, DPO, RLOO or GRPO with TRL (full or LoRA)",
        check_settings=CHECK_SETTINGS,
    )


@hookimpl
def register_preference_models(register: Register) -> None:
    """Register the ``torch`` preference model."""
    register(
        "torch",
        build_preference_model,
        config=TorchPreferenceConfig,
        capabilities=PM_CAPABILITIES,
        description="a scalar head on a causal LM trained on soft labels (TRL RewardTrainer)",
        check_settings=PM_CHECK_SETTINGS,
    )
