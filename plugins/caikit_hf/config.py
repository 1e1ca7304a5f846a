"""Settings of the ``hf`` generator (:class:`HFGeneratorConfig`).

:mod:`caikit_hf.plugin` registers it; :mod:`caikit_hf.generator` reads it. This
module imports neither torch nor transformers.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from caikit_core import validators
from caikit_core.converter import InvalidValue

__all__ = ["DTYPES", "TRUNCATION_POLICIES", "HFGeneratorConfig"]

#: Accepted values of :attr:`HFGeneratorConfig.dtype`.
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Accepted values of :attr:`HFGeneratorConfig.truncation`.
TRUNCATION_POLICIES = ("left", "skip")

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def device(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise InvalidValue(
            attribute.name, f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', found {value!r}"
        )


@attrs.frozen
class HFGeneratorConfig:
    """Settings of the ``hf`` generator.

    :ivar dtype: the weights' dtype. ``"auto"`` is float32 on CPU, and bfloat16 on
        CUDA (float16 where the GPU lacks bfloat16).
    :ivar device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``
        or ``"cuda:N"``.
    :ivar trust_remote_code: let transformers run code shipped with the checkpoint.
        Off by default; turn it on only for checkpoints you trust (logged when on).
    :ivar allow_pickle: load weights stored only as pickle (``pytorch_model.bin``,
        ``*.pt``, ...), which can run code when read. Off by default: such a local
        folder is refused naming the file, and weights are read from safetensors only
        (``use_safetensors=True``, also for hub ids). Logged when on.
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

    dtype: str = attrs.field(default="auto", validator=validators.one_of(DTYPES))
    device: str = attrs.field(default="auto", validator=device)
    trust_remote_code: bool = attrs.field(default=False, validator=validators.boolean)
    allow_pickle: bool = attrs.field(default=False, validator=validators.boolean)
    max_batch_size: int = attrs.field(default=32, validator=validators.positive_int)
    truncation: str = attrs.field(default="left", validator=validators.one_of(TRUNCATION_POLICIES))
    chat_template: str | None = attrs.field(
        default=None, validator=validators.optional(validators.non_empty_string)
    )
    max_context: int | None = attrs.field(
        default=None, validator=validators.optional(validators.int_at_least(2))
    )
    attn_implementation: str | None = attrs.field(
        default=None, validator=validators.optional(validators.non_empty_string)
    )
    revision: str | None = attrs.field(
        default=None, validator=validators.optional(validators.non_empty_string)
    )
    local_files_only: bool = attrs.field(default=False, validator=validators.boolean)
    prefix_reuse: bool = attrs.field(default=True, validator=validators.boolean)
