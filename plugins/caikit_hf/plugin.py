"""The ``hf`` generator: a Hugging Face transformers causal LM, run in-process.

This module is what the ``caikit`` entry point names. It holds the plugin's
settings (:class:`HFGeneratorConfig`) and its factory, and imports neither torch
nor transformers: those are imported by :mod:`caikit_hf.generator` when the
factory runs.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import attrs

from caikit_core.converter import InvalidValue
from caikit_core.hookspecs import Register, RegisterCommand, hookimpl
from caikit_core.interfaces import CAN_SCORE, SEEDED

if TYPE_CHECKING:
    from caikit_hf.generator import HFGenerator

__all__ = ["DTYPES", "TRUNCATION_POLICIES", "HFGeneratorConfig", "build_generator"]

#: Accepted values of :attr:`HFGeneratorConfig.dtype`.
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Accepted values of :attr:`HFGeneratorConfig.truncation`.
TRUNCATION_POLICIES = ("left", "skip")

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise InvalidValue(attribute.name, f"expected one of {allowed}, found {value!r}")

    return check


def _device(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise InvalidValue(
            attribute.name, f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {value!r}"
        )


def _positive_int(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(attribute.name, f"expected a positive integer, found {value!r}")


def _optional_context(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise InvalidValue(attribute.name, f"expected an integer >= 2, found {value!r}")


def _optional_text(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(attribute.name, f"expected a non-empty string, found {value!r}")


def _bool(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidValue(attribute.name, f"expected true or false, found {value!r}")


@attrs.frozen
class HFGeneratorConfig:
    """Settings of the ``hf`` generator.

    :ivar dtype: the weights' dtype. ``"auto"`` is float32 on CPU, and bfloat16 on
        CUDA (float16 where the GPU lacks bfloat16).
    :ivar device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``
        or ``"cuda:N"``.
    :ivar trust_remote_code: let transformers run code shipped with the checkpoint.
        Off by default; turn it on only for checkpoints you trust.
    :ivar max_batch_size: the most sequences in one forward pass: a generation
        request counts ``n`` sequences and a score request one per continuation.
        Larger inputs are split into micro-batches.
    :ivar truncation: what to do with a prompt that does not fit in the context
        together with ``max_new_tokens``: ``"left"`` drops its oldest tokens and
        records a warning on the generation; ``"skip"`` returns empty completions
        with finish reason ``"skipped"`` and the reason in the warnings. Either way
        the rest of the batch is generated.
    :ivar chat_template: a Jinja chat template used instead of the tokenizer's.
    :ivar max_context: the context length in tokens; ``None`` reads it from the
        model's config (``max_position_embeddings``) or the tokenizer.
    :ivar attn_implementation: passed to transformers (``"sdpa"``, ``"eager"``, ...);
        ``None`` lets transformers choose.
    :ivar revision: the hub revision (branch, tag or commit) of a hub model id.
    :ivar local_files_only: never contact the hub.
    :ivar prefix_reuse: make ``score`` cheaper without changing its results (equal
        within floating-point noise): token prefixes shared by several rows of one
        ``score`` call (e.g. instructions and few-shot examples) are encoded once and
        their KV cache reused by every row, and a request whose continuations are all
        single tokens is scored from one row's next-token distribution. Only used with
        the ``sdpa`` and ``eager`` attention implementations and a plain
        ``DynamicCache``; otherwise ``score`` runs without it.
    """

    dtype: str = attrs.field(default="auto", validator=_one_of(DTYPES))
    device: str = attrs.field(default="auto", validator=_device)
    trust_remote_code: bool = attrs.field(default=False, validator=_bool)
    max_batch_size: int = attrs.field(default=32, validator=_positive_int)
    truncation: str = attrs.field(default="left", validator=_one_of(TRUNCATION_POLICIES))
    chat_template: str | None = attrs.field(default=None, validator=_optional_text)
    max_context: int | None = attrs.field(default=None, validator=_optional_context)
    attn_implementation: str | None = attrs.field(default=None, validator=_optional_text)
    revision: str | None = attrs.field(default=None, validator=_optional_text)
    local_files_only: bool = attrs.field(default=False, validator=_bool)
    prefix_reuse: bool = attrs.field(default=True, validator=_bool)


def build_generator(config: HFGeneratorConfig, *, model: str) -> HFGenerator:
    """Load ``model`` (a local checkpoint folder or a hub id) as a generator.

    :raises caikit_core.errors.PluginError: the folder is missing, or has no
        tokenizer or model that transformers can load.
    """
    from caikit_hf.generator import HFGenerator

    return HFGenerator(config, model=model)


@hookimpl
def register_generators(register: Register) -> None:
    """Register the ``hf`` generator."""
    register(
        "hf",
        build_generator,
        config=HFGeneratorConfig,
        capabilities={CAN_SCORE, SEEDED},
        description="Hugging Face transformers causal LM (local folder or hub id), in-process",
    )


@hookimpl
def register_commands(register: RegisterCommand) -> None:
    """Add ``caikit models fetch|list|path`` (:mod:`caikit_hf.models`, imported here)."""
    from caikit_hf.models import register_models_command

    register_models_command(register)
