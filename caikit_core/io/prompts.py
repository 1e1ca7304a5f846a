"""Reading red-team prompts: JSONL, Parquet, plain text and hh-rlhf transcripts.

Formats:

``jsonl``
    One JSON object per line with a string field (``prompt`` by default) or a
    ``messages`` list of ``{role, content}``. ``.jsonl.gz`` is read too.
``parquet``
    The same columns in a Parquet file.
``text``
    One prompt per line; blank lines and lines starting with ``#`` are skipped.
``hh-rlhf``
    Anthropic's hh-rlhf rows ``{chosen, rejected}`` as ``\\n\\nHuman: ...\\n\\nAssistant: ...``
    transcripts; the prompt is the first Human turn.

Each prompt's id is derived from its messages, so the same prompt has the same id
in every file and every run. Duplicates are dropped (first kept) and empty
prompts skipped, each with a logged count.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from caikit_core.errors import CaikitError
from caikit_core.io.transcripts import first_human_turn
from caikit_core.records import Message, Prompt, stable_id

log = logging.getLogger("caikit.prompts")

FORMATS = ("auto", "jsonl", "parquet", "text", "hh-rlhf")


class PromptFileError(CaikitError):
    """A prompt file that cannot be read; the message names the file and line."""


def prompt_id(messages: tuple[Message, ...]) -> str:
    return stable_id("prompt", [(m.role, m.content) for m in messages])


def make_prompt(text_or_messages: str | tuple[Message, ...], source: str = "") -> Prompt:
    if isinstance(text_or_messages, str):
        messages: tuple[Message, ...] = (Message("user", text_or_messages),)
    else:
        messages = text_or_messages
    return Prompt(id=prompt_id(messages), messages=messages, source=source)


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text", ".txt.gz", ".text.gz")):
        return "text"
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        for _, row in _json_rows(path):
            if isinstance(row, dict) and first_human_turn(str(row.get("chosen"))) is not None:
                return "hh-rlhf"
            return "jsonl"
        return "jsonl"
    raise PromptFileError(
        f"{path}: cannot tell the prompt format from the name; set data.format to one of "
        + ", ".join(FORMATS[1:])
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The numbered lines of a text file (gzipped when named ``.gz``), each decoded as
    UTF-8; a line that is not UTF-8, a truncated or corrupt gzip stream, or a read
    error is a :class:`PromptFileError` naming the file and the line."""
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise PromptFileError(
                        f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at "
                        f"column {exc.start + 1}: {exc.reason})"
                    ) from None
                yield lineno, line
    except EOFError:
        raise PromptFileError(
            f"{path}:{lineno + 1}: the gzip stream is truncated (the file ends early)"
        ) from None
    except (OSError, zlib.error) as exc:
        raise PromptFileError(f"{path}:{lineno + 1}: cannot read: {exc}") from None


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        except RecursionError:
            raise PromptFileError(f"{path}:{lineno}: JSON nested too deeply") from None


def _from_row(row: Any, where: str, field: str) -> tuple[Message, ...] | str:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, found {type(row).__name__}")
    if field in row:
        value = row[field]
        if not isinstance(value, str):
            raise PromptFileError(f"{where}: '{field}' must be a string")
        return value
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
        if not ok:
            raise PromptFileError(f"{where}: 'messages' must be a list of {{role, content}}")
        return tuple(Message(m["role"], m["content"]) for m in msgs)
    raise PromptFileError(f"{where}: no '{field}' or 'messages' field")


def read_prompts(
    path: Path, *, format: str = "auto", field: str = "prompt", limit: int | None = None
) -> list[Prompt]:
    """Read prompts from ``path`` (see the module docstring for the formats)."""
    if not path.is_file():
        raise PromptFileError(f"{path}: prompt file not found")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS[1:]:
        raise PromptFileError(f"{path}: unknown prompt format '{fmt}'")
    raw: list[tuple[str, tuple[Message, ...] | str]] = []
    if fmt == "text":
        for lineno, line in _lines(path):
            text = line.strip()
            if text and not text.startswith("#"):
                raw.append((f"{path.name}:{lineno}", text))
    elif fmt == "jsonl":
        for lineno, row in _json_rows(path):
            raw.append((f"{path.name}:{lineno}", _from_row(row, f"{path}:{lineno}", field)))
    elif fmt == "hh-rlhf":
        for lineno, row in _json_rows(path):
            transcript = row.get("chosen") if isinstance(row, dict) else None
            if not isinstance(transcript, str):
                raise PromptFileError(f"{path}:{lineno}: expected a 'chosen' transcript")
            turn = first_human_turn(transcript)
            if turn is None:
                raise PromptFileError(f"{path}:{lineno}: transcript has no Human turn")
            raw.append((f"{path.name}:{lineno}", turn))
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise PromptFileError(f"{path}: cannot read Parquet: {exc}") from None
        for i, row in enumerate(rows):
            raw.append((f"{path.name}:row{i}", _from_row(row, f"{path}: row {i}", field)))
    prompts: list[Prompt] = []
    seen: set[str] = set()
    empty = duplicates = 0
    for where, value in raw:
        prompt = make_prompt(value, source=where)
        if not any(m.content.strip() for m in prompt.messages):
            empty += 1
            continue
        if prompt.id in seen:
            duplicates += 1
            continue
        seen.add(prompt.id)
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if empty:
        log.warning("%s: skipped %d empty prompt(s)", path, empty)
    if duplicates:
        log.info("%s: dropped %d duplicate prompt(s)", path, duplicates)
    return prompts
