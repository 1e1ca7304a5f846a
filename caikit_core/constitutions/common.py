"""What the constitution formats share: reading and writing files with errors that
name the file, problem lines for bad entries, and the conversation of a few-shot
comparison.

Few-shot comparisons
--------------------
:attr:`~caikit_core.constitution.FeedbackFewShot.prompt` holds the conversation
that the two responses answer, as a transcript
(:mod:`caikit_core.io.transcripts`): ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman:
..."``. Text without a leading ``Human:`` label is one human turn
(:func:`few_shot_conversation` turns either into messages). An empty
``principle`` stands for the principle being asked about: Anthropic's few-shot
comparisons carry no principle of their own.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caikit_core.constitution import FeedbackFewShot
from caikit_core.converter import describe_error
from caikit_core.errors import ConstitutionError
from caikit_core.io import atomic_path
from caikit_core.io.transcripts import parse_transcript
from caikit_core.records import Conversation, Message

__all__ = [
    "check_loss",
    "entry_problems",
    "few_shot_conversation",
    "read_json",
    "read_text",
    "to_json",
    "unknown_key",
    "write_text",
]


def few_shot_conversation(example: FeedbackFewShot) -> Conversation:
    """The conversation of a few-shot comparison (see the module docstring)."""
    prompt = example.prompt.strip()
    if prompt.startswith("Human:"):
        return parse_transcript(prompt)
    return (Message("user", prompt),)


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; a :class:`ConstitutionError` naming it if unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConstitutionError(str(path), "is a directory, expected a file") from None
    except UnicodeDecodeError as exc:
        raise ConstitutionError(str(path), f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConstitutionError(str(path), f"cannot read: {exc.strerror}") from None


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; invalid JSON is an error naming the line and column."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ConstitutionError(
            str(path), f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def unknown_key(key: str, allowed: Sequence[str]) -> str:
    """The problem line for an unknown ``key``, suggesting the closest of ``allowed``."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (allowed: {', '.join(allowed)})"
    return f"{key}: unknown key{hint}"


def entry_problems(where: str, exc: BaseException) -> list[str]:
    """``where: 'key': problem`` lines for a failure to structure one entry."""
    lines = []
    for line in describe_error(exc):
        key, _, problem = line.partition(": ")
        if key == "(top level)":
            lines.append(f"{where}: {problem}")
        elif problem == "required key is missing":
            lines.append(f"{where}: {key!r} is missing")
        else:
            lines.append(f"{where}: {key!r}: {problem}")
    return lines


def check_loss(target: Path, losses: list[str], lossy: bool) -> None:
    """Refuse to write ``target`` when the format loses content, unless ``lossy``."""
    if losses and not lossy:
        raise ConstitutionError(
            str(target),
            [f"this format cannot hold {loss}" for loss in losses]
            + ["pass lossy=True (--lossy) to write the rest anyway"],
        )


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line ends, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def to_json(data: Any) -> str:
    """Indented UTF-8 JSON text with a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
