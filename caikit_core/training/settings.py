"""Backend-neutral settings of the policy optimiser's algorithms and of the preference
model, as TRL gives each trainer its own config.

A backend's policy-optimiser config (``caikit_torch.config.TorchOptimiserConfig``,
``caikit_jax.config.JaxOptimiserConfig``) extends :class:`PolicyOptimiserSettings`
with what only it has (device, dtype, LoRA), so a run file's algorithm tables are
the same for ``plugin = "torch"`` and ``plugin = "jax"``::

    [policy_optimiser]
    plugin = "torch"          # or "jax": nothing below changes
    algorithm = "ppo"         # the RL phase's algorithm: "ppo", "dpo", "rloo", "grpo"
    seed = 0

    [policy_optimiser.sft]    # SL-CAI: fine-tuning on the revisions
    learning_rate = 2e-5
    epochs = 1

    [policy_optimiser.ppo]    # RL-CAI with algorithm = "ppo"
    learning_rate = 1e-5      # its own rate: a two-phase run can differ from SFT's
    steps = 8
    kl_coef = 0.05

    [policy_optimiser.dpo]    # RL-CAI with algorithm = "dpo"
    beta = 0.1

Each class validates its fields with the offending value in the message
(``policy_optimiser.ppo.steps: expected a positive integer, found 0``), and
checks between fields say both numbers. A key of the old flat layout
(``policy_optimiser.ppo_steps``) is refused with where it moved
(:data:`MOVED_KEYS`). A third-party backend may extend these classes too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import attrs

from caikit_core import validators as v
from caikit_core.converter import InvalidValue

__all__ = [
    "ALGORITHMS",
    "CHECKPOINT_EVERY_MINUTES",
    "DPO_LOSSES",
    "MOVED_KEYS",
    "NOT_FINGERPRINTED",
    "REPORT_PACKAGES",
    "REPORT_TARGETS",
    "SFT_TARGETS",
    "SMOOTHED_DPO_LOSSES",
    "CheckpointSettings",
    "DPOSettings",
    "GroupRLSettings",
    "OptimisationSettings",
    "PPOSettings",
    "PolicyOptimiserSettings",
    "PreferenceModelSettings",
    "SFTSettings",
]

#: Accepted values of :attr:`SFTSettings.target`.
SFT_TARGETS = ("final", "all")
#: Accepted values of :attr:`PolicyOptimiserSettings.algorithm` (the RL phase's).
ALGORITHMS = ("ppo", "dpo", "rloo", "grpo")
#: Accepted values of :attr:`DPOSettings.loss` (TRL's ``DPOConfig.loss_type``).
DPO_LOSSES = ("sigmoid", "robust", "exo_pair", "ipo", "hinge")
#: The DPO losses that read ``label_smoothing`` (in TRL 1.16 the others ignore it).
SMOOTHED_DPO_LOSSES = ("robust", "exo_pair")

#: Accepted values of ``report_to``: where TRL trainers also log their metrics
#: (transformers' reporting integrations), besides the run's metrics.jsonl.
REPORT_TARGETS = ("tensorboard", "trackio")
#: The Python package each ``report_to`` target needs.
REPORT_PACKAGES: Mapping[str, str] = {"tensorboard": "tensorboard", "trackio": "trackio"}
#: attrs field metadata of a setting that does not change results (where metrics are
#: reported): :meth:`caikit_core.config.RoleRef.options` leaves it out of fingerprints.
NOT_FINGERPRINTED: Mapping[str, bool] = {"fingerprint": False}

#: The default of ``checkpoint_every_minutes``: a killed fit loses at most about this
#: much training, and a short run (a test, a quickstart) writes no checkpoint at all.
CHECKPOINT_EVERY_MINUTES = 30.0

_report_targets = v.Check(
    f"a list of distinct names from {', '.join(repr(t) for t in REPORT_TARGETS)}",
    lambda value: all(t in REPORT_TARGETS for t in value) and len(set(value)) == len(value),
)

_optional_positive_number = v.optional(v.positive_number)
_optional_positive_int = v.optional(v.positive_int)
_unit_interval = v.number_in(0, 1)


@attrs.frozen
class CheckpointSettings:
    """When a fit saves a resumable checkpoint into its stage folder (a backend that
    declares the ``resumable`` capability; see docs/reliability.md#resumable-training). Neither
    field changes results, so neither is fingerprinted: changing one reruns nothing.

    :ivar checkpoint_every_steps: save after every this many optimiser steps (PPO,
        RLOO, GRPO: rollout steps); nothing: no step-based checkpoints.
    :ivar checkpoint_every_minutes: save after the first step that ends this many
        minutes after the last save (or the start); nothing: no time-based
        checkpoints. Default :data:`CHECKPOINT_EVERY_MINUTES`.
    """

    checkpoint_every_steps: int | None = attrs.field(
        default=None, validator=_optional_positive_int, metadata=NOT_FINGERPRINTED
    )
    checkpoint_every_minutes: float | None = attrs.field(
        default=CHECKPOINT_EVERY_MINUTES,
        validator=_optional_positive_number,
        metadata=NOT_FINGERPRINTED,
    )


@attrs.frozen
class OptimisationSettings:
    """What every gradient-based fit on a dataset shares.

    :ivar learning_rate: AdamW's peak learning rate (linear decay, no warm-up).
    :ivar epochs: passes over the data (may be fractional); ignored when
        ``max_steps`` is set.
    :ivar max_steps: stop after this many optimiser steps; nothing means ``epochs``.
    :ivar batch_size: examples per device per forward pass.
    :ivar max_length: the most tokens of an example; longer ones are truncated.
    """

    learning_rate: float = attrs.field(default=2e-5, validator=v.positive_number)
    epochs: float = attrs.field(default=1.0, validator=v.positive_number)
    max_steps: int | None = attrs.field(default=None, validator=_optional_positive_int)
    batch_size: int = attrs.field(default=8, validator=v.positive_int)
    max_length: int = attrs.field(default=1024, validator=v.positive_int)


@attrs.frozen
class SFTSettings(OptimisationSettings):
    """SL-CAI: supervised fine-tuning on the revisions (``[policy_optimiser.sft]``).

    :ivar gradient_accumulation_steps: forward passes per optimiser step; the
        effective batch is ``batch_size * gradient_accumulation_steps``.
    :ivar target: ``"final"`` (the paper's SL-CAI): the final revision of each
        trace. ``"all"``: every revision step of a trace, each as its own example
        for the same prompt (a trace without steps gives its final response).
    """

    gradient_accumulation_steps: int = attrs.field(default=1, validator=v.positive_int)
    target: Literal["final", "all"] = attrs.field(default="final", validator=v.one_of(SFT_TARGETS))


@attrs.frozen
class DPOSettings(OptimisationSettings):
    """RL-CAI with ``algorithm = "dpo"``: a preference loss on the AI-labelled pairs
    (``[policy_optimiser.dpo]``; the preference model is not used).

    :ivar gradient_accumulation_steps: forward passes per optimiser step.
    :ivar beta: the weight of the implicit KL to the reference (DPO's beta).
    :ivar loss: TRL's loss type: ``"sigmoid"`` (the DPO paper), ``"robust"`` (rDPO:
        unbiased under label noise), ``"exo_pair"`` (EXO), ``"ipo"`` or ``"hinge"``.
    :ivar label_smoothing: with ``loss = "robust"`` or ``"exo_pair"``: the
        probability that a pair's label is flipped. Nothing derives it from the soft
        labels (the mean of ``min(p_a, 1 - p_a)``, clipped to [0.001, 0.49]). The
        other losses do not read it, so setting it with them is an error.
    """

    gradient_accumulation_steps: int = attrs.field(default=1, validator=v.positive_int)
    beta: float = attrs.field(default=0.05, validator=v.positive_number)
    loss: Literal["sigmoid", "robust", "exo_pair", "ipo", "hinge"] = attrs.field(
        default="sigmoid", validator=v.one_of(DPO_LOSSES)
    )
    label_smoothing: float | None = attrs.field(
        default=None, validator=v.optional(v.number_in(0, 0.5, high_open=True))
    )

    def __attrs_post_init__(self) -> None:
        if self.label_smoothing is not None and self.loss not in SMOOTHED_DPO_LOSSES:
            raise InvalidValue(
                "label_smoothing",
                f"applies only with loss = 'robust' or 'exo_pair' (TRL's other DPO losses "
                f"ignore it), found loss = {self.loss!r}",
            )


@attrs.frozen
class PPOSettings:
    """RL-CAI with ``algorithm = "ppo"``: PPO against the preference model's score with
    a KL penalty to the reference (``[policy_optimiser.ppo]``).

    :ivar learning_rate: AdamW's learning rate.
    :ivar steps: how many rollouts (a batch of sampled responses, scored, then
        ``epochs`` optimisation passes) to run.
    :ivar rollout_batch_size: prompts per rollout.
    :ivar mini_batch_size: sequences per optimiser step within a rollout.
    :ivar epochs: passes over each rollout.
    :ivar max_new_tokens: the most tokens a sampled response has.
    :ivar temperature: the rollouts' sampling temperature.
    :ivar max_length: the most tokens of prompt and response; longer prompts are left out.
    :ivar kl_coef: the (initial) weight of the KL divergence to the reference.
    :ivar adaptive_kl: adapt ``kl_coef`` towards ``target_kl`` (Ziegler et al.).
    :ivar target_kl: the per-sequence KL the adaptive controller aims at.
    :ivar kl_bound: stop training (saving a checkpoint, raising ``TrainingStopped``)
        when the per-sequence KL to the reference exceeds it; nothing: no bound.
    :ivar cliprange: the policy ratio's clip range.
    :ivar vf_coef: the value loss's weight.
    :ivar gamma: the discount factor.
    :ivar lam: GAE's lambda.
    """

    learning_rate: float = attrs.field(default=2e-5, validator=v.positive_number)
    steps: int = attrs.field(default=8, validator=v.positive_int)
    rollout_batch_size: int = attrs.field(default=8, validator=v.positive_int)
    mini_batch_size: int = attrs.field(default=4, validator=v.positive_int)
    epochs: int = attrs.field(default=2, validator=v.positive_int)
    max_new_tokens: int = attrs.field(default=48, validator=v.positive_int)
    temperature: float = attrs.field(default=1.0, validator=v.positive_number)
    max_length: int = attrs.field(default=1024, validator=v.positive_int)
    kl_coef: float = attrs.field(default=0.05, validator=v.positive_number)
    adaptive_kl: bool = attrs.field(default=False, validator=v.boolean)
    target_kl: float = attrs.field(default=6.0, validator=v.positive_number)
    kl_bound: float | None = attrs.field(default=None, validator=_optional_positive_number)
    cliprange: float = attrs.field(default=0.2, validator=v.positive_number)
    vf_coef: float = attrs.field(default=0.1, validator=v.positive_number)
    gamma: float = attrs.field(default=1.0, validator=_unit_interval)
    lam: float = attrs.field(default=0.95, validator=_unit_interval)

    def __attrs_post_init__(self) -> None:
        if self.mini_batch_size > self.rollout_batch_size:
            raise InvalidValue(
                "mini_batch_size",
                f"expected at most rollout_batch_size = {self.rollout_batch_size}, "
                f"found {self.mini_batch_size}",
            )


@attrs.frozen
class GroupRLSettings:
    """RL-CAI with ``algorithm = "rloo"`` or ``"grpo"`` (``[policy_optimiser.rloo]``,
    ``[policy_optimiser.grpo]``): TRL's ``RLOOTrainer`` / ``GRPOTrainer`` with the
    preference model as the reward function.

    :ivar learning_rate: AdamW's peak learning rate.
    :ivar steps: how many rollouts to run.
    :ivar rollout_batch_size: prompts per rollout.
    :ivar mini_batch_size: sequences per forward pass (gradients accumulate over
        the rollout).
    :ivar iterations: optimiser steps per rollout (TRL's ``num_iterations``).
    :ivar max_new_tokens: the most tokens a sampled response has.
    :ivar temperature: the rollouts' sampling temperature.
    :ivar max_length: the most tokens of prompt and response; longer prompts are left out.
    :ivar beta: the weight of the KL divergence to the reference.
    :ivar kl_bound: stop training (saving a checkpoint) when the per-sequence KL to
        the reference exceeds it; nothing: no bound.
    :ivar epsilon: the policy ratio's clip range.
    :ivar num_generations: responses sampled per prompt (the leave-one-out or group
        baseline needs at least 2).
    """

    learning_rate: float = attrs.field(default=2e-5, validator=v.positive_number)
    steps: int = attrs.field(default=8, validator=v.positive_int)
    rollout_batch_size: int = attrs.field(default=8, validator=v.positive_int)
    mini_batch_size: int = attrs.field(default=4, validator=v.positive_int)
    iterations: int = attrs.field(default=2, validator=v.positive_int)
    max_new_tokens: int = attrs.field(default=48, validator=v.positive_int)
    temperature: float = attrs.field(default=1.0, validator=v.positive_number)
    max_length: int = attrs.field(default=1024, validator=v.positive_int)
    beta: float = attrs.field(default=0.05, validator=v.positive_number)
    kl_bound: float | None = attrs.field(default=None, validator=_optional_positive_number)
    epsilon: float = attrs.field(default=0.2, validator=v.positive_number)
    num_generations: int = attrs.field(default=4, validator=v.int_at_least(2))


def _moved(old: str, *new: str) -> tuple[str, str]:
    return old, "moved to " + ", ".join(f"policy_optimiser.{n}" for n in new)


_RL = ("ppo", "rloo", "grpo")
_ALL = ("sft", "dpo", *_RL)

#: The flat keys of the policy optimiser's old layout, and where each moved.
MOVED_KEYS: Mapping[str, str] = dict(
    [
        _moved("learning_rate", *(f"{t}.learning_rate" for t in _ALL)),
        _moved("epochs", "sft.epochs", "dpo.epochs"),
        _moved("max_steps", "sft.max_steps", "dpo.max_steps"),
        _moved("batch_size", "sft.batch_size", "dpo.batch_size"),
        _moved(
            "gradient_accumulation_steps",
            "sft.gradient_accumulation_steps",
            "dpo.gradient_accumulation_steps",
        ),
        _moved("max_length", *(f"{t}.max_length" for t in _ALL)),
        _moved("sft_target", "sft.target"),
        _moved("kl_coef", "ppo.kl_coef", "dpo.beta", "rloo.beta", "grpo.beta"),
        _moved("adaptive_kl", "ppo.adaptive_kl"),
        _moved("target_kl", "ppo.target_kl"),
        _moved("kl_bound", *(f"{t}.kl_bound" for t in _RL)),
        _moved("ppo_steps", *(f"{t}.steps" for t in _RL)),
        _moved("rollout_batch_size", *(f"{t}.rollout_batch_size" for t in _RL)),
        _moved("mini_batch_size", *(f"{t}.mini_batch_size" for t in _RL)),
        _moved("ppo_epochs", "ppo.epochs", "rloo.iterations", "grpo.iterations"),
        _moved("max_new_tokens", *(f"{t}.max_new_tokens" for t in _RL)),
        _moved("temperature", *(f"{t}.temperature" for t in _RL)),
        _moved("cliprange", "ppo.cliprange", "rloo.epsilon", "grpo.epsilon"),
        _moved("vf_coef", "ppo.vf_coef"),
        _moved("gamma", "ppo.gamma"),
        _moved("lam", "ppo.lam"),
        _moved("num_generations", "rloo.num_generations", "grpo.num_generations"),
        _moved("dpo_loss", "dpo.loss"),
        _moved("label_smoothing", "dpo.label_smoothing"),
    ]
)


@attrs.frozen
class PolicyOptimiserSettings(CheckpointSettings):
    """The policy optimiser's backend-neutral settings: the RL algorithm, the seed and
    one table per algorithm. Backends extend it with their own fields.

    :ivar algorithm: the RL phase's algorithm: ``"ppo"`` (:attr:`ppo`), ``"dpo"``
        (:attr:`dpo`), ``"rloo"`` (:attr:`rloo`) or ``"grpo"`` (:attr:`grpo`).
    :ivar seed: seeds weight initialisation, data order, sampling and dropout; the
        same seed, data and device give the same weights.
    :ivar sft: SL-CAI's fine-tuning.
    :ivar dpo: DPO's settings.
    :ivar ppo: PPO's settings.
    :ivar rloo: RLOO's settings.
    :ivar grpo: GRPO's settings.
    :ivar report_to: also log the trainers' metrics to these
        (:data:`REPORT_TARGETS`; each needs its package, :data:`REPORT_PACKAGES`);
        not fingerprinted: changing it reruns nothing.
    :ivar checkpoint_every_steps: see :class:`CheckpointSettings` (every fit of the
        optimiser: SFT and the RL algorithm).
    :ivar checkpoint_every_minutes: see :class:`CheckpointSettings`.
    """

    #: Old flat keys refused with where they moved (read by the converter).
    moved_keys: ClassVar[Mapping[str, str]] = MOVED_KEYS

    algorithm: Literal["ppo", "dpo", "rloo", "grpo"] = attrs.field(
        default="ppo", validator=v.one_of(ALGORITHMS)
    )
    seed: int = attrs.field(default=0, validator=v.integer)
    sft: SFTSettings = attrs.field(factory=SFTSettings)
    dpo: DPOSettings = attrs.field(factory=DPOSettings)
    ppo: PPOSettings = attrs.field(factory=PPOSettings)
    rloo: GroupRLSettings = attrs.field(factory=GroupRLSettings)
    grpo: GroupRLSettings = attrs.field(factory=GroupRLSettings)
    report_to: tuple[str, ...] = attrs.field(
        default=(), validator=_report_targets, metadata=NOT_FINGERPRINTED
    )

    def rl_settings(self) -> PPOSettings | DPOSettings | GroupRLSettings:
        """The table of :attr:`algorithm`."""
        table: PPOSettings | DPOSettings | GroupRLSettings = getattr(self, self.algorithm)
        return table


@attrs.frozen
class PreferenceModelSettings(OptimisationSettings):
    """The preference model's backend-neutral settings (``[preference_model]``).

    :ivar learning_rate: AdamW's peak learning rate (linear decay, no warm-up).
    :ivar batch_size: comparisons per optimiser step (each is two sequences), and
        sequences per forward pass when scoring.
    :ivar max_length: the most tokens of a (prompt, response) sequence; longer ones
        keep their last ``max_length`` tokens (the response's end, which a scalar
        head reads).
    :ivar seed: seeds the head's initialisation and the data order.
    :ivar eval_fraction: the share of comparisons held out of training (chosen by a
        hash of the comparison id and the seed) to report ``eval_*`` metrics on.
    :ivar report_to: also log the trainer's metrics to these (as the policy
        optimiser's ``report_to``); not fingerprinted.
    :ivar checkpoint_every_steps: as :attr:`CheckpointSettings.checkpoint_every_steps`.
    :ivar checkpoint_every_minutes: as :attr:`CheckpointSettings.checkpoint_every_minutes`.
    """

    learning_rate: float = attrs.field(default=1e-5, validator=v.positive_number)
    seed: int = attrs.field(default=0, validator=v.integer)
    eval_fraction: float = attrs.field(default=0.0, validator=v.number_in(0, 0.5))
    report_to: tuple[str, ...] = attrs.field(
        default=(), validator=_report_targets, metadata=NOT_FINGERPRINTED
    )
    checkpoint_every_steps: int | None = attrs.field(
        default=None, validator=_optional_positive_int, metadata=NOT_FINGERPRINTED
    )
    checkpoint_every_minutes: float | None = attrs.field(
        default=CHECKPOINT_EVERY_MINUTES,
        validator=_optional_positive_number,
        metadata=NOT_FINGERPRINTED,
    )
