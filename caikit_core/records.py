"""The records that flow between stages.

All are frozen attrs classes. They round-trip to plain dicts through the shared
converter (:func:`to_dict` / :func:`from_dict`) and to Arrow tables with a schema
derived from their annotations (:func:`to_arrow` / :func:`from_arrow`), so every
shard of a stage has the same schema even when a shard's lists are all empty.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from caikit_core.converter import converter

if TYPE_CHECKING:  # pyarrow (and numpy) load only when a table is built or read
    import pyarrow as pa

T = TypeVar("T")


def stable_id(*parts: object) -> str:
    """A 16-hex-digit id derived from ``parts`` (JSON-encoded, order-sensitive)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def derive_seed(seed: int, *key: object) -> int:
    """A 31-bit seed from the run seed and a key (e.g. record id, stage), so that
    sampling does not depend on batching, sharding or resuming."""
    return int(stable_id("seed", seed, *key), 16) & 0x7FFFFFFF


@attrs.frozen
class Message:
    """One chat turn."""

    role: str
    content: str


Conversation = tuple[Message, ...]


def chat_messages(conv: Conversation) -> list[dict[str, str]]:
    """A conversation as the ``[{"role": ..., "content": ...}]`` list chat templates take."""
    return [{"role": m.role, "content": m.content} for m in conv]


def conversation(*turns: tuple[str, str]) -> Conversation:
    """Build a conversation from ``(role, content)`` pairs."""
    return tuple(Message(role, content) for role, content in turns)


@attrs.frozen
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@attrs.frozen
class Prompt:
    """A prompt to answer: a conversation ending with a user turn."""

    id: str
    messages: Conversation
    source: str = ""


@attrs.frozen
class GenerationRequest:
    """Ask a generator for ``n`` completions of ``messages``.

    ``response_prefix`` is text the assistant turn starts with (the completion
    continues it). ``seed`` makes sampling reproducible per request, whatever the
    batch it lands in.
    """

    id: str
    messages: Conversation
    sampling: SamplingParams = SamplingParams()
    n: int = 1
    seed: int = 0
    response_prefix: str = ""


#: finish reasons a generator reports per completion
FINISH_EOS = "eos"
FINISH_LENGTH = "length"
FINISH_STOP = "stop"
#: the request was not run (e.g. its prompt does not fit the context); ``warnings`` says why
FINISH_SKIPPED = "skipped"


@attrs.frozen
class Generation:
    """The completions of one request, in sample order."""

    request_id: str
    texts: tuple[str, ...]
    finish_reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@attrs.frozen
class RolloutRequest:
    """Sample ``n`` continuations of ``prompt_ids`` for an RL policy, token for token.

    Tokens are drawn from the model's unfiltered distribution at ``temperature``
    (no top-k, no top-p; ``temperature == 0``: greedy), which is what the policy's
    own log-probabilities of them assume. A continuation ends after the first of
    ``stop_token_ids`` (kept) or after ``max_new_tokens``. ``seed`` makes it
    reproducible whatever batch it lands in.
    """

    id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 1.0
    n: int = 1
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


@attrs.frozen
class Rollout:
    """The continuations of one :class:`RolloutRequest`, as token ids, in sample order."""

    request_id: str
    token_ids: tuple[tuple[int, ...], ...]


@attrs.frozen
class ScoreRequest:
    """Score continuations of an assistant turn.

    The scored text is the chat-formatted ``messages`` with the assistant turn
    opened, then ``response_prefix``, then each continuation in turn.
    """

    id: str
    messages: Conversation
    continuations: tuple[str, ...]
    response_prefix: str = ""


@attrs.frozen
class Score:
    """``logprobs[i]`` is log P(continuations[i] | context), summed over its tokens."""

    request_id: str
    logprobs: tuple[float, ...]
    token_counts: tuple[int, ...] = ()


@attrs.frozen
class Sample:
    """A response to a prompt."""

    id: str
    prompt_id: str
    messages: Conversation
    response: str
    model: str = ""


@attrs.frozen
class RevisionStep:
    """One critique-revise step of a trace."""

    index: int
    principle_id: str
    critique_prompt: str
    critique: str
    revision_prompt: str
    revision: str


@attrs.frozen
class RevisionTrace:
    """A response and its successive revisions under sampled principles."""

    id: str
    prompt_id: str
    messages: Conversation
    initial_response: str
    steps: tuple[RevisionStep, ...]
    final_response: str
    critic: str = ""
    skipped_reason: str | None = None


@attrs.frozen
class Comparison:
    """Two responses to the same prompt, to be labelled."""

    id: str
    prompt_id: str
    messages: Conversation
    response_a: str
    response_b: str
    model: str = ""


@attrs.frozen
class OptionScore:
    """Raw option log-probs for one principle and one order of the options."""

    principle_id: str
    order: str  # "AB" or "BA"
    logprob_a: float
    logprob_b: float
    rationale: str | None = None


@attrs.frozen
class PreferenceLabel:
    """P(response A is preferred), with how it was obtained."""

    id: str
    comparison_id: str
    p_a: float
    labeller: str
    model: str = ""
    evidence: tuple[OptionScore, ...] = ()
    swap_consistency: float | None = None


@attrs.frozen
class LabelledComparison:
    """A comparison joined with its label: what a preference model trains on."""

    comparison: Comparison
    label: PreferenceLabel


# --- plain dict and Arrow round trips ------------------------------------------------


def to_dict(record: Any) -> dict[str, Any]:
    """Unstructure an attrs record to plain dicts and lists."""
    data = converter.unstructure(record)
    assert isinstance(data, dict)
    return data


def from_dict(data: dict[str, Any], cls: type[T]) -> T:
    """Structure a plain dict back into ``cls``."""
    return converter.structure(data, cls)


def _arrow_type(tp: Any) -> tuple[pa.DataType, bool]:
    """Arrow type of an annotation and whether it is nullable."""
    import pyarrow as pa

    scalars: dict[Any, pa.DataType] = {
        str: pa.string(),
        int: pa.int64(),
        float: pa.float64(),
        bool: pa.bool_(),
    }
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union for Arrow: {tp}")
        return _arrow_type(args[0])[0], True
    if tp in scalars:
        return scalars[tp], False
    if origin in (tuple, list):
        inner = typing.get_args(tp)[0]
        return pa.list_(_arrow_type(inner)[0]), False
    if attrs.has(tp):
        return pa.struct(_fields(tp)), False
    raise TypeError(f"unsupported annotation for Arrow: {tp}")


def _fields(cls: type) -> list[pa.Field]:
    import pyarrow as pa

    hints = typing.get_type_hints(cls)
    out = []
    for field in attrs.fields(cls):
        arrow_type, nullable = _arrow_type(hints[field.name])
        out.append(pa.field(field.name, arrow_type, nullable=nullable))
    return out


def arrow_schema(cls: type) -> pa.Schema:
    """The Arrow schema of a record class, derived from its annotations."""
    import pyarrow as pa

    return pa.schema(_fields(cls))


def to_arrow(records: Sequence[Any], cls: type) -> pa.Table:
    """Records of ``cls`` as an Arrow table with :func:`arrow_schema` ``(cls)``."""
    import pyarrow as pa

    return pa.Table.from_pylist([to_dict(r) for r in records], schema=arrow_schema(cls))


def from_arrow(table: pa.Table, cls: type[T]) -> list[T]:
    """Rows of an Arrow table as records of ``cls``."""
    return [from_dict(row, cls) for row in table.to_pylist()]


def iter_from_arrow(tables: Iterable[pa.Table], cls: type[T]) -> Iterable[T]:
    for table in tables:
        yield from from_arrow(table, cls)
