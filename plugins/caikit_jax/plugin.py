"""The ``jax`` plugins: a policy optimiser (SFT, DPO, PPO) and a preference model on JAX.

They take the same settings as the ``torch`` plugins (their config classes extend
:class:`~caikit_torch.plugin.TorchOptimiserConfig` and
:class:`~caikit_torch.plugin.TorchPreferenceConfig`), so switching a run between
backends is one line::

    [policy_optimiser]
    plugin = "jax"        # was "torch"
    learning_rate = 2e-5
    algorithm = "ppo"

Settings the JAX backend does not implement are refused when the run file is
loaded, never ignored: ``lora = true``, ``algorithm = "rloo"`` or ``"grpo"``, and a
``dpo_loss`` other than ``"sigmoid"``. ``device = "cuda"`` means JAX's GPU
platform; ``gradient_checkpointing`` recomputes each decoder layer (Tunix's
``RematConfig.DECODER``). ``vf_coef`` other than its default is refused too: the
value model has its own optimiser. Models are sharded over every visible JAX device (an
``(fsdp, tp)`` mesh of shape ``(devices, 1)``).

This module imports neither JAX, Tunix nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from caikit_torch.plugin import TorchOptimiserConfig, TorchPreferenceConfig

from caikit_core.converter import InvalidValue
from caikit_core.hookspecs import Register, hookimpl
from caikit_core.interfaces import SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS, SUPPORTS_SFT

if TYPE_CHECKING:
    from caikit_jax.reward import JaxPreferenceModel
    from caikit_jax.train import JaxOptimiser

__all__ = [
    "CAPABILITIES",
    "JAX_ALGORITHMS",
    "JaxOptimiserConfig",
    "JaxPreferenceConfig",
    "build_optimiser",
    "build_preference_model",
    "register_policy_optimisers",
    "register_preference_models",
]

#: The RL algorithms the JAX optimiser implements.
JAX_ALGORITHMS = ("ppo", "dpo")
#: SFT, PPO against a reward, and DPO.
CAPABILITIES = frozenset({SUPPORTS_SFT, SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS})


@attrs.frozen
class JaxOptimiserConfig(TorchOptimiserConfig):
    """The ``torch`` optimiser's settings (see :class:`TorchOptimiserConfig`), minus
    what the JAX backend does not implement (refused with the reason)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.lora:
            raise InvalidValue(
                "lora", "the jax optimiser trains all weights; LoRA is not implemented"
            )
        if self.algorithm not in JAX_ALGORITHMS:
            raise InvalidValue(
                "algorithm",
                f"the jax optimiser implements {', '.join(repr(a) for a in JAX_ALGORITHMS)}, "
                f"found {self.algorithm!r} (use plugin = 'torch' for it)",
            )
        if self.vf_coef != attrs.fields(TorchOptimiserConfig).vf_coef.default:
            raise InvalidValue(
                "vf_coef",
                "has no effect on the jax optimiser: its PPO trains the value model with an "
                "optimiser of its own, not a weighted share of the policy's loss; remove it",
            )
        if self.dpo_loss != "sigmoid":
            raise InvalidValue(
                "dpo_loss",
                f"the jax optimiser implements 'sigmoid' (Tunix's DPO loss), found "
                f"{self.dpo_loss!r}",
            )


@attrs.frozen
class JaxPreferenceConfig(TorchPreferenceConfig):
    """The ``torch`` preference model's settings (see :class:`TorchPreferenceConfig`)."""


def build_optimiser(config: JaxOptimiserConfig) -> JaxOptimiser:
    """SFT, DPO and PPO on JAX (Tunix's Llama with caikit's shims)."""
    from caikit_jax.train import JaxOptimiser

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
    )


@hookimpl
def register_preference_models(register: Register) -> None:
    """Register the ``jax`` preference model."""
    register(
        "jax",
        build_preference_model,
        config=JaxPreferenceConfig,
        capabilities=frozenset(),
        description="a scalar head on a Llama trunk in JAX, trained on soft labels",
    )
