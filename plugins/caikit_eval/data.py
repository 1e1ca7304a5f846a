"""The evaluation files: the 438 HHH comparisons and hh-rlhf's human-chosen pairs,
read into :class:`PairItem` (a conversation, the reference-preferred response and
the other one).

A missing field, a line that is not JSON or a text that is not a Human/Assistant
transcript is a :class:`~caikit_core.errors.CaikitError` naming the file and line.
hh-rlhf has a few pairs whose two transcripts differ before the last response, or
end on a human turn; those are skipped and counted (:attr:`Pairs.skipped`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from caikit_core.errors import CaikitError
from caikit_core.io.transcripts import parse_transcript
from caikit_core.records import Conversation

__all__ = [
    "HHH_FILE",
    "HH_FILE",
    "PairItem",
    "Pairs",
    "data_file",
    "read_hh_rlhf",
    "read_hhh",
]

#: the files under the shared data folder (``$CAIKIT_DATA``, else ``../shared/data``
#: beside the checkout)
HHH_FILE = "anthropic-cai/evals/438HHHEvaluations.jsonl"
HH_FILE = "hh-rlhf/harmless-base/test.jsonl.gz"


@attrs.frozen
class PairItem:
    """One comparison with a reference answer: ``preferred`` is the HHH-correct or
    human-chosen response, ``other`` the one it was preferred to."""

    id: str
    line: int
    messages: Conversation
    preferred: str
    other: str


@attrs.frozen
class Pairs:
    """The items read, and the ``(line, why)`` of the pairs skipped."""

    path: Path
    items: tuple[PairItem, ...]
    skipped: tuple[tuple[int, str], ...] = ()


def data_file(setting: str | None, default: str) -> Path:
    """The file a ``path`` setting names, else ``default`` under the shared data folder.

    :raises CaikitError: the file does not exist (the message says how to point at it).
    """
    if setting:
        path = Path(setting).expanduser()
    else:
        root = os.environ.get("CAIKIT_DATA")
        base = (
            Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "data"
        )
        path = base / default
    if not path.is_file():
        raise CaikitError(
            f"{path}: evaluation data not found (give the instrument's path setting, "
            "or set CAIKIT_DATA to the folder holding " + default + ")"
        )
    return path


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except ValueError as exc:
                    raise CaikitError(f"{path}:{number}: not a JSON line ({exc})") from None
                if not isinstance(row, dict):
                    raise CaikitError(
                        f"{path}:{number}: expected a JSON object, found {type(row).__name__}"
                    )
                yield number, row
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CaikitError(f"{path}: cannot read ({exc})") from None


def _text(path: Path, number: int, row: dict[str, Any], field: str, what: str) -> str:
    if field not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise CaikitError(
            f"{path}:{number}: missing field '{field}' (not {what}; its fields: {fields})"
        )
    value = row[field]
    if not isinstance(value, str):
        raise CaikitError(
            f"{path}:{number}: field '{field}' must be a string, found {type(value).__name__}"
        )
    return value


def _split(path: Path, number: int, field: str, text: str) -> Conversation:
    try:
        return parse_transcript(text)
    except ValueError as exc:
        raise CaikitError(
            f"{path}:{number}: field '{field}' is not a Human/Assistant transcript ({exc})"
        ) from None


def _pair(
    path: Path, number: int, row: dict[str, Any], fields: tuple[str, str], what: str, prefix: str
) -> PairItem | str:
    """The pair of one line, or why it is skipped."""
    good, bad = (_text(path, number, row, f, what) for f in fields)
    a, b = _split(path, number, fields[0], good), _split(path, number, fields[1], bad)
    if not a or not b or a[-1].role != "assistant" or b[-1].role != "assistant":
        return "a transcript does not end with an assistant response"
    if a[:-1] != b[:-1]:
        return "the two transcripts differ before the last response"
    return PairItem(f"{prefix}:{number}", number, a[:-1], a[-1].content, b[-1].content)


def _read(
    path: Path, fields: tuple[str, str], what: str, prefix: str, limit: int | None, strict: bool
) -> Pairs:
    items: list[PairItem] = []
    skipped: list[tuple[int, str]] = []
    for number, row in _lines(path):
        if limit is not None and len(items) >= limit:
            break
        got = _pair(path, number, row, fields, what, prefix)
        if isinstance(got, str):
            if strict:
                raise CaikitError(f"{path}:{number}: {got}")
            skipped.append((number, got))
        else:
            items.append(got)
    if not items:
        raise CaikitError(f"{path}: no comparisons in the file")
    return Pairs(path, tuple(items), tuple(skipped))


def read_hhh(path: Path, limit: int | None = None) -> Pairs:
    """The HHH comparisons (``text_correct``, ``text_incorrect`` transcripts; every
    line must hold a valid pair)."""
    return _read(
        path, ("text_correct", "text_incorrect"), "an HHH evaluation line", "hhh", limit, True
    )


def read_hh_rlhf(path: Path, limit: int | None = None) -> Pairs:
    """hh-rlhf pairs (``chosen``, ``rejected`` transcripts); malformed pairs skipped."""
    return _read(path, ("chosen", "rejected"), "an hh-rlhf line", "hh", limit, False)
