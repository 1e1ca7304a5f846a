"""The ``torch`` plugins: a policy optimiser (SFT and RL with TRL) and a preference model.

This module is what the ``caikit`` entry point names. It holds the plugins'
settings (:class:`TorchOptimiserConfig`, :class:`TorchPreferenceConfig`) and their
factories, and imports neither torch, transformers nor TRL: those are imported by
:mod:`caikit_torch.sft`, :mod:`caikit_torch.rl` and :mod:`caikit_torch.reward` when
a factory runs or a method needs them.

A run file configures them in its ``[policy_optimiser]`` and ``[preference_model]``
tables::

    [policy_optimiser]
    plugin = "torch"
    learning_rate = 2e-5
    epochs = 1
    sft_target = "final"   # or "all": every revision step is an example
    lora = false
    algorithm = "ppo"      # RL-CAI: "ppo", "dpo", "rloo" or "grpo"
    kl_coef = 0.05

    [preference_model]
    plugin = "torch"
    learning_rate = 1e-5
    epochs = 1
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import attrs

from caikit_core.converter import InvalidValue
from caikit_core.hookspecs import Register, hookimpl
from caikit_core.interfaces import SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS, SUPPORTS_SFT

if TYPE_CHECKING:
    from caikit_torch.reward import TorchPreferenceModel
    from caikit_torch.sft import TorchOptimiser

__all__ = [
    "ALGORITHMS",
    "CAPABILITIES",
    "DEVICES",
    "DPO_LOSSES",
    "DTYPES",
    "PM_CAPABILITIES",
    "SFT_TARGETS",
    "SMOOTHED_DPO_LOSSES",
    "TorchOptimiserConfig",
    "TorchPreferenceConfig",
    "build_optimiser",
    "build_preference_model",
    "register_policy_optimisers",
    "register_preference_models",
]

#: Accepted values of :attr:`TorchOptimiserConfig.sft_target`.
SFT_TARGETS = ("final", "all")
#: Accepted values of :attr:`TorchOptimiserConfig.dtype`.
DTYPES = ("auto", "float32", "bfloat16")
#: Accepted values of :attr:`TorchOptimiserConfig.device`.
DEVICES = ("auto", "cpu", "cuda")
#: Accepted values of :attr:`TorchOptimiserConfig.algorithm` (the RL phase's algorithm).
ALGORITHMS = ("ppo", "dpo", "rloo", "grpo")
#: Accepted values of :attr:`TorchOptimiserConfig.dpo_loss` (TRL's ``DPOConfig.loss_type``).
DPO_LOSSES = ("sigmoid", "robust", "exo_pair", "ipo", "hinge")
#: The DPO losses that read ``label_smoothing`` (in TRL 1.16 the others ignore it).
SMOOTHED_DPO_LOSSES = ("robust", "exo_pair")
#: What the policy optimiser can do: SFT, PPO (and RLOO/GRPO) against a reward, and DPO.
CAPABILITIES = frozenset({SUPPORTS_SFT, SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS})
#: What the preference model declares: no optional capability (every PM fits, loads, scores).
PM_CAPABILITIES: frozenset[str] = frozenset()

_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _positive_number(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidValue(attribute.name, f"expected a number > 0, found {value!r}")


def _positive_int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(attribute.name, f"expected a positive integer, found {value!r}")


def _optional_positive_int(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidValue(
            attribute.name, f"expected a positive integer or nothing, found {value!r}"
        )


def _optional_positive_number(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None:
        _positive_number(instance, attribute, value)


def _unit_interval(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidValue(attribute.name, f"expected a number in [0, 1], found {value!r}")


def _at_least_two(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise InvalidValue(attribute.name, f"expected an integer >= 2, found {value!r}")


def _smoothing(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 0.5
    ):
        raise InvalidValue(
            attribute.name, f"expected a number in [0, 0.5) or nothing, found {value!r}"
        )


def _eval_fraction(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 0.5:
        raise InvalidValue(attribute.name, f"expected a number in [0, 0.5], found {value!r}")


def _dropout(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InvalidValue(attribute.name, f"expected a number in [0, 1), found {value!r}")


def _int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(attribute.name, f"expected an integer, found {value!r}")


def _bool(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidValue(attribute.name, f"expected true or false, found {value!r}")


def _one_of(choices: tuple[str, ...]) -> _Validator:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise InvalidValue(attribute.name, f"expected one of {allowed}, found {value!r}")

    return check


def _module_names(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise InvalidValue(
            attribute.name,
            f'expected a non-empty list of module names (or ["all-linear"]), found {value!r}',
        )


@attrs.frozen
class TorchOptimiserConfig:
    """Settings of the ``torch`` policy optimiser.

    :ivar learning_rate: AdamW's peak learning rate (linear decay, no warm-up).
    :ivar epochs: passes over the examples (TRL's ``num_train_epochs``; may be
        fractional). Ignored when ``max_steps`` is set.
    :ivar max_steps: stop after this many optimiser steps; nothing means train for
        ``epochs``.
    :ivar batch_size: examples per device per forward pass.
    :ivar gradient_accumulation_steps: forward passes per optimiser step; the
        effective batch is ``batch_size * gradient_accumulation_steps``.
    :ivar max_length: the most tokens of an example (prompt and revision); longer
        examples are truncated at the end.
    :ivar sft_target: what to fine-tune on. ``"final"`` (the paper's SL-CAI): the
        final revision of each trace. ``"all"``: every revision step of a trace,
        each as its own example for the same prompt (a trace without steps gives
        its final response).
    :ivar lora: train low-rank adapters instead of all weights; the adapters are
        merged into the base weights before saving, so the output is a plain
        checkpoint either way.
    :ivar lora_r: the adapters' rank.
    :ivar lora_alpha: the adapters' scaling numerator (scale = ``alpha / r``).
    :ivar lora_dropout: dropout on the adapters' input.
    :ivar lora_target_modules: module names to adapt (e.g. ``["q_proj", "v_proj"]``);
        ``["all-linear"]`` adapts every linear layer but the output head.
    :ivar dtype: the weights' dtype while training and in the saved checkpoint.
        ``"auto"`` keeps float32 weights, with bfloat16 mixed precision on a CUDA
        GPU that supports it; ``"bfloat16"`` trains and saves bfloat16 weights
        (half the memory).
    :ivar device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    :ivar gradient_checkpointing: recompute activations in the backward pass, trading
        about a fifth more compute for much less memory.
    :ivar seed: seeds weight initialisation (LoRA), data order and dropout; the same
        seed, data and device give the same weights.
    :ivar algorithm: the RL phase's algorithm (:meth:`TorchOptimiser.optimise`).
        ``"ppo"``: PPO against the preference model's score with a KL penalty to the
        reference (:mod:`caikit_torch.ppo`). ``"dpo"``: TRL's ``DPOTrainer`` on the
        AI-labelled pairs (the preference model is not used). ``"rloo"`` and
        ``"grpo"``: TRL's ``RLOOTrainer`` / ``GRPOTrainer`` with the preference model
        as the reward function.
    :ivar kl_coef: the weight of the KL divergence to the reference: PPO's (initial)
        KL coefficient, DPO's beta, and RLOO's and GRPO's beta.
    :ivar adaptive_kl: PPO: adapt ``kl_coef`` towards ``target_kl`` (Ziegler et al.).
    :ivar target_kl: PPO: the per-sequence KL the adaptive controller aims at.
    :ivar kl_bound: stop training (saving a checkpoint, raising ``TrainingStopped``)
        when the per-sequence KL to the reference exceeds it (PPO, RLOO, GRPO);
        nothing means no bound.
    :ivar ppo_steps: PPO, RLOO, GRPO: how many rollouts (a batch of sampled
        responses, scored, then ``ppo_epochs`` optimisation passes) to run.
    :ivar rollout_batch_size: PPO, RLOO, GRPO: prompts per rollout.
    :ivar mini_batch_size: PPO: sequences per optimiser step within a rollout;
        RLOO/GRPO: sequences per forward pass (gradients accumulate over the rollout).
    :ivar ppo_epochs: PPO: passes over each rollout; RLOO/GRPO: optimiser steps per
        rollout (TRL's ``num_iterations``).
    :ivar max_new_tokens: PPO, RLOO, GRPO: the most tokens a sampled response has.
    :ivar temperature: PPO, RLOO, GRPO: the sampling temperature of the rollouts.
    :ivar cliprange: PPO's policy ratio clip range; RLOO's and GRPO's ``epsilon``.
    :ivar vf_coef: PPO: the value loss's weight.
    :ivar gamma: PPO: the discount factor.
    :ivar lam: PPO: GAE's lambda.
    :ivar num_generations: RLOO, GRPO: responses sampled per prompt (the
        leave-one-out or group baseline needs at least 2).
    :ivar dpo_loss: DPO: TRL's loss type: ``"sigmoid"`` (the DPO paper), ``"robust"``
        (rDPO: unbiased under label noise), ``"exo_pair"`` (EXO), ``"ipo"`` or ``"hinge"``.
    :ivar label_smoothing: DPO with ``dpo_loss = "robust"`` or ``"exo_pair"``: the
        probability that a pair's label is flipped. Nothing derives it from the soft
        labels: the mean of ``min(p_a, 1 - p_a)`` over the pairs (clipped to
        [0.001, 0.49]). The other losses do not read it, so setting it with them is an
        error.
    """

    learning_rate: float = attrs.field(default=2e-5, validator=_positive_number)
    epochs: float = attrs.field(default=1.0, validator=_positive_number)
    max_steps: int | None = attrs.field(default=None, validator=_optional_positive_int)
    batch_size: int = attrs.field(default=8, validator=_positive_int)
    gradient_accumulation_steps: int = attrs.field(default=1, validator=_positive_int)
    max_length: int = attrs.field(default=1024, validator=_positive_int)
    sft_target: Literal["final", "all"] = attrs.field(
        default="final", validator=_one_of(SFT_TARGETS)
    )
    lora: bool = attrs.field(default=False, validator=_bool)
    lora_r: int = attrs.field(default=16, validator=_positive_int)
    lora_alpha: int = attrs.field(default=32, validator=_positive_int)
    lora_dropout: float = attrs.field(default=0.05, validator=_dropout)
    lora_target_modules: tuple[str, ...] = attrs.field(
        default=("all-linear",), validator=_module_names
    )
    dtype: Literal["auto", "float32", "bfloat16"] = attrs.field(
        default="auto", validator=_one_of(DTYPES)
    )
    device: Literal["auto", "cpu", "cuda"] = attrs.field(default="auto", validator=_one_of(DEVICES))
    gradient_checkpointing: bool = attrs.field(default=False, validator=_bool)
    seed: int = attrs.field(default=0, validator=_int)
    algorithm: Literal["ppo", "dpo", "rloo", "grpo"] = attrs.field(
        default="ppo", validator=_one_of(ALGORITHMS)
    )
    kl_coef: float = attrs.field(default=0.05, validator=_positive_number)
    adaptive_kl: bool = attrs.field(default=False, validator=_bool)
    target_kl: float = attrs.field(default=6.0, validator=_positive_number)
    kl_bound: float | None = attrs.field(default=None, validator=_optional_positive_number)
    ppo_steps: int = attrs.field(default=8, validator=_positive_int)
    rollout_batch_size: int = attrs.field(default=8, validator=_positive_int)
    mini_batch_size: int = attrs.field(default=4, validator=_positive_int)
    ppo_epochs: int = attrs.field(default=2, validator=_positive_int)
    max_new_tokens: int = attrs.field(default=48, validator=_positive_int)
    temperature: float = attrs.field(default=1.0, validator=_positive_number)
    cliprange: float = attrs.field(default=0.2, validator=_positive_number)
    vf_coef: float = attrs.field(default=0.1, validator=_positive_number)
    gamma: float = attrs.field(default=1.0, validator=_unit_interval)
    lam: float = attrs.field(default=0.95, validator=_unit_interval)
    num_generations: int = attrs.field(default=4, validator=_at_least_two)
    dpo_loss: Literal["sigmoid", "robust", "exo_pair", "ipo", "hinge"] = attrs.field(
        default="sigmoid", validator=_one_of(DPO_LOSSES)
    )
    label_smoothing: float | None = attrs.field(default=None, validator=_smoothing)

    def __attrs_post_init__(self) -> None:
        if self.label_smoothing is not None and self.dpo_loss not in SMOOTHED_DPO_LOSSES:
            raise InvalidValue(
                "label_smoothing",
                f"applies only with dpo_loss = 'robust' or 'exo_pair' (TRL's other DPO losses "
                f"ignore it), found dpo_loss = {self.dpo_loss!r}",
            )
        if self.algorithm == "ppo" and self.mini_batch_size > self.rollout_batch_size:
            raise InvalidValue(
                "mini_batch_size",
                f"expected at most rollout_batch_size = {self.rollout_batch_size} for PPO, "
                f"found {self.mini_batch_size}",
            )


@attrs.frozen
class TorchPreferenceConfig:
    """Settings of the ``torch`` preference model.

    :ivar learning_rate: AdamW's peak learning rate (linear decay, no warm-up).
    :ivar epochs: passes over the labelled comparisons (may be fractional); ignored
        when ``max_steps`` is set.
    :ivar max_steps: stop after this many optimiser steps; nothing means ``epochs``.
    :ivar batch_size: comparisons per optimiser step (each is two sequences), and
        sequences per forward pass when scoring.
    :ivar max_length: the most tokens of a (prompt, response) sequence; longer ones
        keep their last ``max_length`` tokens (the response's end, which the scalar
        head reads).
    :ivar seed: seeds the head's initialisation and the data order.
    :ivar device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    :ivar dtype: ``"auto"`` (float32 weights, bfloat16 autocast on a CUDA GPU that
        supports it), ``"float32"`` or ``"bfloat16"``.
    :ivar eval_fraction: the share of comparisons held out of training (chosen by a
        hash of the comparison id and the seed) to report ``eval_*`` metrics on.
    """

    learning_rate: float = attrs.field(default=1e-5, validator=_positive_number)
    epochs: float = attrs.field(default=1.0, validator=_positive_number)
    max_steps: int | None = attrs.field(default=None, validator=_optional_positive_int)
    batch_size: int = attrs.field(default=8, validator=_positive_int)
    max_length: int = attrs.field(default=1024, validator=_positive_int)
    seed: int = attrs.field(default=0, validator=_int)
    device: Literal["auto", "cpu", "cuda"] = attrs.field(default="auto", validator=_one_of(DEVICES))
    dtype: Literal["auto", "float32", "bfloat16"] = attrs.field(
        default="auto", validator=_one_of(DTYPES)
    )
    eval_fraction: float = attrs.field(default=0.0, validator=_eval_fraction)


def build_optimiser(config: TorchOptimiserConfig) -> TorchOptimiser:
    """SFT on revisions and RL-CAI (PPO, DPO, RLOO, GRPO) with TRL, CPU or CUDA."""
    from caikit_torch.sft import TorchOptimiser

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
    )
