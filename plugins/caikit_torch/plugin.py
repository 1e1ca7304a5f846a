"""The ``torch`` policy optimiser: supervised fine-tuning with TRL, in-process.

This module is what the ``caikit`` entry point names. It holds the plugin's
settings (:class:`TorchOptimiserConfig`) and its factory, and imports neither
torch, transformers nor TRL: those are imported by :mod:`caikit_torch.sft` when
the factory runs.

A run file configures it in its ``[policy_optimiser]`` table::

    [policy_optimiser]
    plugin = "torch"
    learning_rate = 2e-5
    epochs = 1
    sft_target = "final"   # or "all": every revision step is an example
    lora = false
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import attrs

from caikit_core.converter import InvalidValue
from caikit_core.hookspecs import Register, hookimpl
from caikit_core.interfaces import SUPPORTS_SFT

if TYPE_CHECKING:
    from caikit_torch.sft import TorchOptimiser

__all__ = [
    "ALGORITHMS",
    "CAPABILITIES",
    "DEVICES",
    "DTYPES",
    "SFT_TARGETS",
    "TorchOptimiserConfig",
    "build_optimiser",
    "register_policy_optimisers",
]

#: Accepted values of :attr:`TorchOptimiserConfig.sft_target`.
SFT_TARGETS = ("final", "all")
#: Accepted values of :attr:`TorchOptimiserConfig.dtype`.
DTYPES = ("auto", "float32", "bfloat16")
#: Accepted values of :attr:`TorchOptimiserConfig.device`.
DEVICES = ("auto", "cpu", "cuda")
#: Accepted values of :attr:`TorchOptimiserConfig.algorithm` (the RL phase's algorithm).
ALGORITHMS = ("ppo", "dpo", "rloo")
#: What this plugin can do today: supervised fine-tuning only.
CAPABILITIES = frozenset({SUPPORTS_SFT})

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
    :ivar algorithm: the RL phase's algorithm, reserved for RL-CAI. This plugin
        does SFT only for now, so the value is validated but not yet used.
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
    algorithm: Literal["ppo", "dpo", "rloo"] = attrs.field(
        default="ppo", validator=_one_of(ALGORITHMS)
    )


def build_optimiser(config: TorchOptimiserConfig) -> TorchOptimiser:
    """Supervised fine-tuning on revisions with TRL (full or LoRA), CPU or CUDA."""
    from caikit_torch.sft import TorchOptimiser

    return TorchOptimiser(config)


@hookimpl
def register_policy_optimisers(register: Register) -> None:
    """Register the ``torch`` policy optimiser."""
    register(
        "torch",
        build_optimiser,
        config=TorchOptimiserConfig,
        capabilities=CAPABILITIES,
        description="SFT on revisions with TRL's SFTTrainer (full or LoRA), CPU or CUDA",
    )
