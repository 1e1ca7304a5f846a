"""Settings of the ``torch`` plugins: :class:`TorchOptimiserConfig` and
:class:`TorchPreferenceConfig`.

Both extend the core's backend-neutral settings
(:mod:`caikit_core.training.settings`) with what only this backend has: device,
dtype, LoRA and gradient checkpointing. A run file configures them as::

    [policy_optimiser]
    plugin = "torch"
    algorithm = "ppo"      # RL-CAI: "ppo", "dpo", "rloo" or "grpo"
    lora = false

    [policy_optimiser.sft]
    learning_rate = 2e-5
    target = "final"       # or "all": every revision step is an example

    [policy_optimiser.ppo]
    learning_rate = 1e-5
    kl_coef = 0.05

    [preference_model]
    plugin = "torch"
    learning_rate = 1e-5

This module imports neither torch, transformers nor TRL.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from caikit_core import validators as v
from caikit_core.converter import InvalidValue
from caikit_core.interfaces import (
    GENERATOR_ROLLOUTS,
    RESUMABLE,
    SUPPORTS_PPO,
    SUPPORTS_PREFERENCE_LOSS,
    SUPPORTS_SFT,
)
from caikit_core.training.settings import (
    ALGORITHMS,
    DPO_LOSSES,
    NOT_FINGERPRINTED,
    SFT_TARGETS,
    SMOOTHED_DPO_LOSSES,
    PolicyOptimiserSettings,
    PreferenceModelSettings,
)

__all__ = [
    "ALGORITHMS",
    "CAPABILITIES",
    "DEVICES",
    "DPO_LOSSES",
    "DTYPES",
    "PM_CAPABILITIES",
    "SFT_TARGETS",
    "SINGLE_PROCESS_ALGORITHMS",
    "SMOOTHED_DPO_LOSSES",
    "TorchOptimiserConfig",
    "TorchPreferenceConfig",
    "module_names",
]

#: Accepted values of ``dtype``.
DTYPES = ("auto", "float32", "bfloat16")
#: Accepted values of ``device``.
DEVICES = ("auto", "cpu", "cuda")
#: What the policy optimiser can do: SFT, PPO (and RLOO/GRPO) against a reward, and DPO;
#: PPO, RLOO and GRPO can take their rollouts from a generator plugin; every fit resumes
#: from checkpoints (``resumable``; RLOO and GRPO not with a rollout generator).
CAPABILITIES = frozenset(
    {SUPPORTS_SFT, SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS, GENERATOR_ROLLOUTS, RESUMABLE}
)
#: The RL algorithms that train in one process only (``num_processes = 1``): their
#: rollouts sample inside the training loop, which is not sharded yet.
SINGLE_PROCESS_ALGORITHMS = ("ppo", "rloo", "grpo")
#: What the preference model declares: its fit resumes from checkpoints (``resumable``).
PM_CAPABILITIES: frozenset[str] = frozenset({RESUMABLE})


def module_names(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """A non-empty list of module names (or ``["all-linear"]``)."""
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(x, str) and x.strip() for x in value)
    ):
        raise InvalidValue(
            attribute.name,
            f'expected a non-empty list of module names (or ["all-linear"]), found {value!r}',
        )


@attrs.frozen
class TorchOptimiserConfig(PolicyOptimiserSettings):
    """Settings of the ``torch`` policy optimiser: the algorithm tables of
    :class:`~caikit_core.training.settings.PolicyOptimiserSettings` (``sft``, ``dpo``,
    ``ppo``, ``rloo``, ``grpo``), plus:

    :ivar lora: train low-rank adapters instead of all weights (SFT, DPO, RLOO,
        GRPO; PPO trains all weights); the adapters are merged into the base weights
        before saving, so the output is a plain checkpoint either way.
    :ivar lora_r: the adapters' rank.
    :ivar lora_alpha: the adapters' scaling numerator (scale = ``alpha / r``).
    :ivar lora_dropout: dropout on the adapters' input.
    :ivar lora_target_modules: module names to adapt (e.g. ``["q_proj", "v_proj"]``);
        ``["all-linear"]`` adapts every linear layer but the output head.
    :ivar dtype: the weights' dtype while training and in the saved checkpoint.
        ``"auto"`` keeps float32 weights, with bfloat16 mixed precision on a CUDA
        GPU that supports it; ``"bfloat16"`` trains and saves bfloat16 weights.
    :ivar device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    :ivar gradient_checkpointing: recompute activations in the backward pass, trading
        about a fifth more compute for much less memory.
    :ivar num_processes: train data-parallel in this many worker processes the fit
        launches itself (:mod:`caikit_torch.distributed`; gloo on CPU, NCCL on CUDA):
        SFT and DPO; refused at load with ``algorithm`` ``"ppo"``, ``"rloo"`` or
        ``"grpo"`` (so a run with SFT across processes names ``"dpo"``).
        ``batch_size`` stays the batch of one process, so the global batch is
        ``batch_size * num_processes * gradient_accumulation_steps``.
    :ivar allow_pickle: load a policy or reference folder whose weights are only
        pickle files (``pytorch_model.bin``, ...); off by default: such a folder is
        refused naming the file. Logged when on. Not fingerprinted: it permits a load,
        it changes no result.
    """

    lora: bool = attrs.field(default=False, validator=v.boolean)
    lora_r: int = attrs.field(default=16, validator=v.positive_int)
    lora_alpha: int = attrs.field(default=32, validator=v.positive_int)
    lora_dropout: float = attrs.field(default=0.05, validator=v.number_in(0, 1, high_open=True))
    lora_target_modules: tuple[str, ...] = attrs.field(
        default=("all-linear",), validator=module_names
    )
    dtype: Literal["auto", "float32", "bfloat16"] = attrs.field(
        default="auto", validator=v.one_of(DTYPES)
    )
    device: Literal["auto", "cpu", "cuda"] = attrs.field(
        default="auto", validator=v.one_of(DEVICES)
    )
    gradient_checkpointing: bool = attrs.field(default=False, validator=v.boolean)
    num_processes: int = attrs.field(default=1, validator=v.positive_int)
    allow_pickle: bool = attrs.field(default=False, validator=v.boolean, metadata=NOT_FINGERPRINTED)

    def __attrs_post_init__(self) -> None:
        if self.num_processes > 1 and self.algorithm in SINGLE_PROCESS_ALGORITHMS:
            raise InvalidValue(
                "num_processes",
                f"expected 1 with algorithm = {self.algorithm!r}, which samples in its "
                'training loop (only SFT and DPO train across processes: algorithm = "dpo"), '
                f"found {self.num_processes}",
            )


@attrs.frozen
class TorchPreferenceConfig(PreferenceModelSettings):
    """Settings of the ``torch`` preference model: those of
    :class:`~caikit_core.training.settings.PreferenceModelSettings`, plus:

    :ivar device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.
    :ivar dtype: ``"auto"`` (float32 weights, bfloat16 autocast on a CUDA GPU that
        supports it), ``"float32"`` or ``"bfloat16"``.
    :ivar num_processes: train data-parallel in this many worker processes (as the
        policy optimiser's); the global batch is ``batch_size * num_processes``
        comparisons. Scoring stays in the calling process.
    :ivar allow_pickle: load a trunk or preference-model folder whose weights are only
        pickle files (as the policy optimiser's); not fingerprinted.
    """

    device: Literal["auto", "cpu", "cuda"] = attrs.field(
        default="auto", validator=v.one_of(DEVICES)
    )
    dtype: Literal["auto", "float32", "bfloat16"] = attrs.field(
        default="auto", validator=v.one_of(DTYPES)
    )
    num_processes: int = attrs.field(default=1, validator=v.positive_int)
    allow_pickle: bool = attrs.field(default=False, validator=v.boolean, metadata=NOT_FINGERPRINTED)
