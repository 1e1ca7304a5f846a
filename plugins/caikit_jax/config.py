"""Settings of the ``jax`` plugins: :class:`JaxOptimiserConfig` and
:class:`JaxPreferenceConfig`.

They extend the same backend-neutral settings as the ``torch`` plugins'
(:mod:`caikit_core.training.settings`), so switching a run between backends is
one line::

    [policy_optimiser]
    plugin = "jax"        # was "torch"
    algorithm = "ppo"

    [policy_optimiser.ppo]
    learning_rate = 1e-5

Settings the JAX backend does not implement are refused when the run file is
loaded, never ignored: ``lora = true``, ``algorithm = "rloo"`` or ``"grpo"``, and a
``dpo.loss`` other than ``"sigmoid"``. ``device = "cuda"`` means JAX's GPU
platform; ``gradient_checkpointing`` recomputes each decoder layer (Tunix's
``RematConfig.DECODER``). ``ppo.vf_coef`` other than its default is refused too: the
value model has its own optimiser.

This module imports neither JAX, Tunix nor torch.
"""

from __future__ import annotations

from typing import Literal

import attrs

from caikit_core import validators as v
from caikit_core.converter import InvalidValue
from caikit_core.interfaces import (
    RESUMABLE,
    SUPPORTS_PPO,
    SUPPORTS_PREFERENCE_LOSS,
    SUPPORTS_SFT,
)
from caikit_core.training.settings import (
    PolicyOptimiserSettings,
    PPOSettings,
    PreferenceModelSettings,
)

__all__ = [
    "CAPABILITIES",
    "DEVICES",
    "DTYPES",
    "JAX_ALGORITHMS",
    "PM_CAPABILITIES",
    "JaxOptimiserConfig",
    "JaxPreferenceConfig",
]

#: The RL algorithms the JAX optimiser implements.
JAX_ALGORITHMS = ("ppo", "dpo")
#: SFT, PPO against a reward, and DPO; all three save resumable checkpoints
#: (:mod:`caikit_jax.checkpoints`).
CAPABILITIES = frozenset({SUPPORTS_SFT, SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS, RESUMABLE})
#: The preference model's fits save resumable checkpoints.
PM_CAPABILITIES: frozenset[str] = frozenset({RESUMABLE})
#: Accepted values of ``dtype``.
DTYPES = ("auto", "float32", "bfloat16")
#: Accepted values of ``device`` (``"cuda"``: JAX's GPU platform).
DEVICES = ("auto", "cpu", "cuda")


def _no_report_to(report_to: tuple[str, ...]) -> None:
    if report_to:
        raise InvalidValue(
            "report_to",
            "the jax backend has no TRL trainer to report from; remove it (every stage's "
            "metrics and per-step history are in RUN_DIR/metrics.jsonl)",
        )


@attrs.frozen
class JaxOptimiserConfig(PolicyOptimiserSettings):
    """Settings of the ``jax`` policy optimiser: the algorithm tables of
    :class:`~caikit_core.training.settings.PolicyOptimiserSettings`, minus what the
    JAX backend does not implement (refused with the reason), plus:

    :ivar lora: must stay false: the jax optimiser trains all weights.
    :ivar dtype: ``"auto"`` and ``"float32"`` train float32 weights; ``"bfloat16"``
        bfloat16 ones.
    :ivar device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (JAX's GPU platform).
    :ivar gradient_checkpointing: recompute each decoder layer in the backward pass.
    """

    lora: bool = attrs.field(default=False, validator=v.boolean)
    dtype: Literal["auto", "float32", "bfloat16"] = attrs.field(
        default="auto", validator=v.one_of(DTYPES)
    )
    device: Literal["auto", "cpu", "cuda"] = attrs.field(
        default="auto", validator=v.one_of(DEVICES)
    )
    gradient_checkpointing: bool = attrs.field(default=False, validator=v.boolean)

    def __attrs_post_init__(self) -> None:
        _no_report_to(self.report_to)
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
        if self.ppo.vf_coef != attrs.fields(PPOSettings).vf_coef.default:
            raise InvalidValue(
                "ppo.vf_coef",
                "has no effect on the jax optimiser: its PPO trains the value model with an "
                "optimiser of its own, not a weighted share of the policy's loss; remove it",
            )
        if self.dpo.loss != "sigmoid":
            raise InvalidValue(
                "dpo.loss",
                f"the jax optimiser implements 'sigmoid' (Tunix's DPO loss), found "
                f"{self.dpo.loss!r}",
            )


@attrs.frozen
class JaxPreferenceConfig(PreferenceModelSettings):
    """Settings of the ``jax`` preference model: those of
    :class:`~caikit_core.training.settings.PreferenceModelSettings`, plus ``device``
    and ``dtype`` as the optimiser's."""

    device: Literal["auto", "cpu", "cuda"] = attrs.field(
        default="auto", validator=v.one_of(DEVICES)
    )
    dtype: Literal["auto", "float32", "bfloat16"] = attrs.field(
        default="auto", validator=v.one_of(DTYPES)
    )

    def __attrs_post_init__(self) -> None:
        _no_report_to(self.report_to)
