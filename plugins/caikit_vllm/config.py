"""Settings of the ``vllm`` generator (:class:`VLLMGeneratorConfig`).

:mod:`caikit_vllm.plugin` registers it; :mod:`caikit_vllm.generator` reads it. This
module imports neither vllm nor torch.
"""

from __future__ import annotations

from typing import Any

import attrs

from caikit_core import validators
from caikit_core.converter import InvalidValue

__all__ = ["DTYPES", "TRUNCATION_POLICIES", "VLLMGeneratorConfig"]

#: Accepted values of :attr:`VLLMGeneratorConfig.dtype` (passed to vLLM as they are).
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Accepted values of :attr:`VLLMGeneratorConfig.truncation` (the ``hf`` generator's).
TRUNCATION_POLICIES = ("left", "skip")


def _context_fits(
    instance: VLLMGeneratorConfig, attribute: attrs.Attribute[Any], value: Any
) -> None:
    limit = instance.max_model_len
    if value is not None and limit is not None and value > limit:
        raise InvalidValue(
            attribute.name, f"expected at most max_model_len ({limit}), found {value!r}"
        )


@attrs.frozen
class VLLMGeneratorConfig:
    """Settings of the ``vllm`` generator (vLLM's offline ``LLM`` engine, in-process).

    :ivar dtype: the weights' dtype, passed to vLLM. ``"auto"`` is vLLM's choice,
        which runs a float32 checkpoint in half precision; use ``"float32"`` for
        results equal to ``hf``'s on CPU.
    :ivar max_model_len: the engine's context length in tokens (prompt plus
        completion); ``None`` lets vLLM read it from the model's config.
    :ivar max_context: the context length the truncation policy uses; ``None``:
        the engine's ``max_model_len``. Must not exceed ``max_model_len``.
    :ivar truncation: a prompt that does not fit in the context together with
        ``max_new_tokens``: ``"left"`` drops its oldest tokens and records a warning
        on the generation; ``"skip"`` returns empty completions with finish reason
        ``"skipped"`` and the reason in the warnings (as the ``hf`` generator does).
    :ivar chat_template: a Jinja chat template used instead of the tokenizer's.
    :ivar tensor_parallel_size: GPUs the model is split over; at most the number
        of visible CUDA devices (1 on a machine without one).
    :ivar gpu_memory_utilization: the share of the device's memory vLLM reserves
        for weights and KV cache (on CPU: of the memory of a NUMA node).
    :ivar enable_prefix_caching: vLLM's automatic prefix caching; ``None`` keeps
        vLLM's default. ``score`` does not depend on it (see docs/plugins.md).
    :ivar enforce_eager: run the model eagerly (no CUDA graphs or torch.compile):
        a much faster start, slower decoding.
    :ivar seed: the engine's seed. Sampling uses each request's own seed, so no
        text depends on it.
    :ivar trust_remote_code: let vLLM and transformers run code shipped with the
        checkpoint. Off by default; turn it on only for checkpoints you trust.
    :ivar allow_pickle: load a local folder whose weights are only pickle files
        (``pytorch_model.bin``, ...); off by default: such a folder is refused naming
        the file. Logged when on.
    :ivar revision: the hub revision (branch, tag or commit) of a hub model id.
    :ivar max_num_seqs: the most sequences vLLM runs in one step; ``None``: vLLM's default.
    """

    dtype: str = attrs.field(default="auto", validator=validators.one_of(DTYPES))
    max_model_len: int | None = attrs.field(
        default=None, validator=validators.optional(validators.int_at_least(2))
    )
    max_context: int | None = attrs.field(
        default=None,
        validator=[validators.optional(validators.int_at_least(2)), _context_fits],
    )
    truncation: str = attrs.field(default="left", validator=validators.one_of(TRUNCATION_POLICIES))
    chat_template: str | None = attrs.field(
        default=None, validator=validators.optional(validators.non_empty_string)
    )
    tensor_parallel_size: int = attrs.field(default=1, validator=validators.positive_int)
    gpu_memory_utilization: float = attrs.field(
        default=0.9, validator=validators.number_in(0.0, 1.0, low_open=True)
    )
    enable_prefix_caching: bool | None = attrs.field(
        default=None, validator=validators.optional(validators.boolean)
    )
    enforce_eager: bool = attrs.field(default=False, validator=validators.boolean)
    seed: int = attrs.field(default=0, validator=validators.non_negative_int)
    trust_remote_code: bool = attrs.field(default=False, validator=validators.boolean)
    allow_pickle: bool = attrs.field(default=False, validator=validators.boolean)
    revision: str | None = attrs.field(
        default=None, validator=validators.optional(validators.non_empty_string)
    )
    max_num_seqs: int | None = attrs.field(
        default=None, validator=validators.optional(validators.positive_int)
    )
