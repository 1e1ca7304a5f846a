"""Reading, writing and converting constitutions.

Three formats are understood:

``caikit``
    The project's own schema, as TOML (``.toml``), YAML (``.yaml``/``.yml``) or
    JSON (``.json``)::

        name = "my-constitution"            # optional; defaults to the file's stem

        [[critique_revision]]
        id = "harm-general"
        critique = "Identify specific ways in which ..."
        revision = "Please rewrite the response ..."

        [[feedback]]
        id = "prefer-harmless"
        text = "Which of these assistant responses is less harmful?"

        [[critique_few_shot]]               # optional worked examples
        critique_request = "..."
        critique = "..."
        revision_request = "..."
        revision = "..."
        [[critique_few_shot.messages]]      # the conversation; ends with the
        role = "user"                       # assistant response that is critiqued
        content = "..."
        [[critique_few_shot.messages]]
        role = "assistant"
        content = "..."

        [[feedback_few_shot]]
        prompt = "Human: ..."               # see "Few-shot comparisons" below
        response_a = "..."
        response_b = "..."
        principle = "Which of these ...?"   # may be empty: see below
        answer = "A"                        # "A" or "B"
        rationale = "..."                   # optional chain of thought

    Unknown keys and wrong types are errors, reported as ``key.path: problem``.

``anthropic``
    The supplementary prompt files of Bai et al. 2022 (arXiv 2212.08073): a
    directory holding any of ``CritiqueRevisionInstructions.json`` (ids are its
    keys, e.g. ``harmful0``), ``RLMadisonInstructions.json`` (a list; ids are
    ``feedback0``, ``feedback1``, ...), ``CritiqueRevisionFewShotPrompts.json``,
    ``RLMadisonFewShotPrompts.json`` and ``RLMadisonPrecogFewShotPrompts.json``, or
    a single one of those files. The prompt framing (``"\\n\\nCritiqueRequest: "``,
    ``"\\n\\nCritique:"``, ``"RevisionRequest:"``, ``"Revision:"``, ``" Options:"``)
    is stripped so that principle texts are clean; writing adds it back.

``llm-swarm``
    The constitution of Hugging Face's CAI recipe (``huggingface/llm-swarm``,
    ``examples/constitutional-ai``): ``{"constitutions": [{"critic", "revision"}],
    "system_chat": [[{"role", "content"}, ...], ...]}``. Ids are ``llm-swarm-0``,
    ``llm-swarm-1``, ... Each ``system_chat`` entry is a critique few-shot chat: the
    conversation, then critique request (user), critique (assistant), revision
    request (user) and revision (assistant). The format has no feedback principles.

Few-shot comparisons
--------------------
:attr:`FeedbackFewShot.prompt` holds the conversation that the two responses
answer, as a transcript: ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``.
Text without a leading ``Human:`` label is one human turn
(:func:`few_shot_conversation` turns either into messages). An empty
``principle`` stands for the principle being asked about: Anthropic's few-shot
comparisons carry no principle of their own (``RLMadisonFewShotPrompts.json`` has
none, ``RLMadisonPrecogFewShotPrompts.json`` has a ``{}`` slot for it).

What cannot be mapped exactly
-----------------------------
* ``RLMadisonFewShotPrompts.json`` lists ``corrects`` and ``incorrects`` without an
  order of presentation. Each (correct, incorrect) pair becomes one example; the
  correct response is option A in the 1st, 3rd, ... example and option B in the
  2nd, 4th, ..., so that the few-shot answers are balanced.
* In ``RLMadisonPrecogFewShotPrompts.json`` the rationale follows the cue "Let's
  think step by step:", which is dropped (it is prompt framing, not reasoning).
  The conversations there label turns ``H:`` / ``A:``; they are stored with
  ``Human:`` / ``Assistant:`` labels like the other transcripts. The file's small
  framing variations (one example lacks the leading blank line, one says "a human
  and an assistant" without "(H)"/"(A)") are not kept; writing uses one form.
* Transcripts are split at ``"\\n\\nHuman:"``-style labels, so a turn whose text
  itself contains such a label cannot be told apart from two turns.
* Writing the ``anthropic`` format cannot keep few-shot comparisons that have a
  principle of their own, nor system turns, nor the constitution's name;
  principle ids of feedback principles become ``feedback<i>``. Writing
  ``llm-swarm`` drops the name, all ids, feedback principles and feedback
  few-shot examples. Both refuse to drop content (principles, examples, their
  principle text or turns) unless ``lossy=True``.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import yaml

from caikit_core.constitution import (
    DEFAULT_CONSTITUTION,
    Constitution,
    CritiqueFewShot,
    CritiqueRevisionPrinciple,
    FeedbackFewShot,
    FeedbackPrinciple,
    constitution_problems,
    validate_constitution,
)
from caikit_core.converter import describe_error, show, structure, unstructure
from caikit_core.errors import ConstitutionError
from caikit_core.io.transcripts import (
    HUMAN_ASSISTANT,
    SHORT_LABELS,
    parse_transcript,
    render_transcript,
    split_transcript,
)
from caikit_core.records import Conversation, Message

__all__ = [
    "ANTHROPIC_FILES",
    "FORMATS",
    "constitution_from_data",
    "constitution_to_data",
    "convert_constitution",
    "detect_format",
    "dump_constitution",
    "few_shot_conversation",
    "load_constitution",
    "to_toml",
    "to_yaml",
]

FORMATS: Final = ("caikit", "anthropic", "llm-swarm")
"""The constitution formats, besides ``"auto"`` (detect from the path)."""

ANTHROPIC_CRITIQUE_REVISION: Final = "CritiqueRevisionInstructions.json"
ANTHROPIC_FEEDBACK: Final = "RLMadisonInstructions.json"
ANTHROPIC_CRITIQUE_FEW_SHOT: Final = "CritiqueRevisionFewShotPrompts.json"
ANTHROPIC_FEEDBACK_FEW_SHOT: Final = "RLMadisonFewShotPrompts.json"
ANTHROPIC_FEEDBACK_COT_FEW_SHOT: Final = "RLMadisonPrecogFewShotPrompts.json"
ANTHROPIC_FILES: Final = (
    ANTHROPIC_CRITIQUE_REVISION,
    ANTHROPIC_FEEDBACK,
    ANTHROPIC_CRITIQUE_FEW_SHOT,
    ANTHROPIC_FEEDBACK_FEW_SHOT,
    ANTHROPIC_FEEDBACK_COT_FEW_SHOT,
)
"""The file names of Anthropic's published prompt files, in load order."""

_CAIKIT_SUFFIXES: Final = (".toml", ".yaml", ".yml", ".json")
_SECTIONS: Final[dict[str, type]] = {
    "critique_revision": CritiqueRevisionPrinciple,
    "feedback": FeedbackPrinciple,
    "critique_few_shot": CritiqueFewShot,
    "feedback_few_shot": FeedbackFewShot,
}
_TOP_LEVEL_KEYS: Final = ("name", *_SECTIONS)


# --- public entry points --------------------------------------------------------------


def load_constitution(
    path: str | Path | None = None,
    format: str = "auto",
    *,
    few_shot: bool | str | Path = True,
) -> Constitution:
    """Read and validate a constitution.

    :param path: a file or directory; ``None`` or ``"default"`` is the packaged
        default constitution (:data:`caikit_core.constitution.DEFAULT_CONSTITUTION`).
    :param format: ``"auto"`` (see :func:`detect_format`), ``"caikit"``,
        ``"anthropic"`` or ``"llm-swarm"``.
    :param few_shot: ``True`` keeps the few-shot examples of ``path``, ``False``
        drops them, and a path (or ``"default"``) takes them from that
        constitution, in any format, instead.
    :raises ConstitutionError: the file is missing, unreadable, malformed or
        invalid; the message names the file and the entry.
    """
    fmt = _check_format(format)
    if path is None or str(path) == "default":
        path, fmt = DEFAULT_CONSTITUTION, "caikit"
    source = Path(path)
    constitution = _read(source, fmt)
    if few_shot is False:
        constitution = attrs.evolve(constitution, critique_few_shot=(), feedback_few_shot=())
    elif few_shot is not True:
        few_shot_path = DEFAULT_CONSTITUTION if str(few_shot) == "default" else Path(few_shot)
        examples = _read(few_shot_path, "auto")
        problems = constitution_problems(examples, principles=False)
        if problems:
            raise ConstitutionError(str(few_shot_path), problems)
        constitution = attrs.evolve(
            constitution,
            critique_few_shot=examples.critique_few_shot,
            feedback_few_shot=examples.feedback_few_shot,
        )
    return validate_constitution(constitution, str(source))


def dump_constitution(
    constitution: Constitution,
    path: str | Path,
    format: str = "caikit",
    *,
    lossy: bool = False,
) -> Path:
    """Write a constitution and return the path written.

    ``"caikit"`` writes TOML, YAML or JSON by the suffix of ``path``;
    ``"llm-swarm"`` writes JSON; ``"anthropic"`` writes a directory of the
    published file names (removing those of them it does not write, so that no
    stale file is read back). ``"auto"`` picks caikit for ``.toml``/``.yaml``/
    ``.yml``, llm-swarm for ``.json`` and anthropic for a path without a suffix.

    :raises ConstitutionError: the constitution is invalid, the path does not
        suit the format, or the format cannot hold part of the content and
        ``lossy`` is false.
    """
    fmt = _check_format(format)
    target = Path(path)
    if fmt == "auto":
        fmt = _dump_format(target)
    validate_constitution(constitution, f"constitution {constitution.name!r}")
    if fmt == "caikit":
        suffix = target.suffix.lower()
        if suffix == ".toml":
            text = to_toml(constitution)
        elif suffix in (".yaml", ".yml"):
            text = to_yaml(constitution)
        elif suffix == ".json":
            text = _to_json(constitution_to_data(constitution))
        else:
            raise ConstitutionError(
                str(target), "a caikit constitution is written as .toml, .yaml, .yml or .json"
            )
        _write_text(target, text)
    elif fmt == "llm-swarm":
        _check_loss(target, _llm_swarm_losses(constitution), lossy)
        _write_text(target, _to_json(_llm_swarm_data(constitution)))
    else:
        _check_loss(target, _anthropic_losses(constitution), lossy)
        _write_anthropic(constitution, target)
    return target


def convert_constitution(
    src: str | Path,
    dst: str | Path,
    src_format: str = "auto",
    dst_format: str = "auto",
    *,
    lossy: bool = False,
) -> Constitution:
    """Read ``src`` and write it to ``dst``; return the constitution converted.

    This backs ``caikit constitution convert SRC DST``; see
    :func:`load_constitution` and :func:`dump_constitution` for the formats.
    """
    constitution = load_constitution(src, src_format)
    dump_constitution(constitution, dst, dst_format, lossy=lossy)
    return constitution


def detect_format(path: str | Path) -> str:
    """The format of an existing constitution file or directory.

    A directory is ``anthropic`` if it holds one of :data:`ANTHROPIC_FILES`;
    ``.toml``, ``.yaml`` and ``.yml`` files are ``caikit``; a ``.json`` file is
    ``anthropic`` by its name or shape, ``llm-swarm`` if it has a
    ``"constitutions"`` key, and ``caikit`` if it has caikit's top-level keys.
    """
    target = Path(path)
    if target.is_dir():
        if any((target / name).is_file() for name in ANTHROPIC_FILES):
            return "anthropic"
        raise ConstitutionError(
            str(target),
            "a constitution directory must hold Anthropic's prompt files "
            f"({', '.join(ANTHROPIC_FILES)}); none found",
        )
    if not target.exists():
        raise ConstitutionError(str(target), "no such file or directory")
    suffix = target.suffix.lower()
    if suffix in (".toml", ".yaml", ".yml"):
        return "caikit"
    if suffix == ".json":
        if target.name in ANTHROPIC_FILES:
            return "anthropic"
        data = _read_json(target)
        if isinstance(data, Mapping) and "constitutions" in data:
            return "llm-swarm"
        if isinstance(data, Mapping) and any(key in data for key in _TOP_LEVEL_KEYS):
            return "caikit"
        if _anthropic_kind(data) is not None:
            return "anthropic"
    raise ConstitutionError(
        str(target),
        "cannot tell the constitution format; pass one of " + ", ".join(FORMATS),
    )


# --- caikit's schema --------------------------------------------------------------------


def constitution_from_data(
    data: Any, *, name: str = "constitution", source: str = ""
) -> Constitution:
    """Build a constitution from caikit-schema plain data, as read from a file.

    ``name`` is used when the data has none. Problems (unknown keys, wrong types,
    missing fields) raise :class:`ConstitutionError` with one line each; the
    constitution is not validated further (see :func:`validate_constitution`).
    """
    if not isinstance(data, Mapping):
        raise ConstitutionError(source, f"expected a table at the top level, found {show(data)}")
    problems: list[str] = []
    for key in data:
        if key not in _TOP_LEVEL_KEYS:
            problems.append(_unknown_key(str(key), _TOP_LEVEL_KEYS))
    if "name" in data:
        if not isinstance(data["name"], str):
            problems.append(f"name: expected a string, found {show(data['name'])}")
        elif not data["name"].strip():
            problems.append("name: must not be empty")
        else:
            name = data["name"]
    sections: dict[str, tuple[Any, ...]] = {}
    for section, cls in _SECTIONS.items():
        raw = data.get(section, [])
        if not isinstance(raw, list):
            problems.append(f"{section}: expected a list of tables, found {show(raw)}")
            continue
        items: list[Any] = []
        for index, entry in enumerate(raw):
            entry_id = entry.get("id") if isinstance(entry, Mapping) else None
            where = _where(section, index, entry_id if isinstance(entry_id, str) else None)
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: expected a table, found {show(entry)}")
                continue
            try:
                items.append(structure(entry, cls))
            except Exception as exc:
                problems.extend(_entry_problems(where, exc))
        sections[section] = tuple(items)
    if problems:
        raise ConstitutionError(source, problems)
    return Constitution(name=name, **sections)


def constitution_to_data(constitution: Constitution) -> dict[str, Any]:
    """Caikit-schema plain data: empty sections and ``None`` rationales left out."""
    data: dict[str, Any] = {"name": constitution.name}
    for section in _SECTIONS:
        entries = unstructure(getattr(constitution, section))
        for entry in entries:
            if entry.get("rationale", "") is None:
                del entry["rationale"]
        if entries:
            data[section] = entries
    return data


def to_toml(constitution: Constitution, *, header: str = "") -> str:
    """The constitution as caikit TOML; ``header`` becomes leading ``#`` comments."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    if lines:
        lines.append("")
    data = constitution_to_data(constitution)
    lines.append(f"name = {_toml_string(data['name'])}")
    for section in _SECTIONS:
        for entry in data.get(section, []):
            lines += ["", f"[[{section}]]"]
            tables: list[tuple[str, list[dict[str, Any]]]] = []
            for key, value in entry.items():
                if isinstance(value, list) and value:
                    tables.append((key, value))
                else:
                    lines.append(f"{key} = {_toml_value(value)}")
            for key, items in tables:
                for item in items:
                    lines += ["", f"[[{section}.{key}]]"]
                    lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def to_yaml(constitution: Constitution) -> str:
    """The constitution as caikit YAML; multi-line strings use block style."""
    return yaml.dump(
        constitution_to_data(constitution),
        Dumper=_YamlDumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )


# --- few-shot comparisons ---------------------------------------------------------------


def few_shot_conversation(example: FeedbackFewShot) -> Conversation:
    """The conversation of a few-shot comparison (see the module docstring)."""
    prompt = example.prompt.strip()
    if prompt.startswith("Human:"):
        return parse_transcript(prompt)
    return (Message("user", prompt),)


# --- reading --------------------------------------------------------------------------


def _check_format(format: str) -> str:
    if format in ("auto", *FORMATS):
        return format
    choices = ("auto", *FORMATS)
    close = difflib.get_close_matches(format, choices, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConstitutionError(
        "", f"unknown constitution format {format!r} (expected one of {', '.join(choices)}){hint}"
    )


def _read(path: Path, fmt: str) -> Constitution:
    """Read a constitution without validating it."""
    if not path.exists():
        raise ConstitutionError(str(path), "no such file or directory")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "caikit":
        return _read_caikit(path)
    if fmt == "anthropic":
        return _read_anthropic(path)
    return _read_llm_swarm(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise ConstitutionError(str(path), "is a directory, expected a file") from None
    except UnicodeDecodeError as exc:
        raise ConstitutionError(str(path), f"not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise ConstitutionError(str(path), f"cannot read: {exc.strerror}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise ConstitutionError(
            str(path), f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None


def _read_caikit(path: Path) -> Constitution:
    suffix = path.suffix.lower()
    if suffix not in _CAIKIT_SUFFIXES:
        raise ConstitutionError(
            str(path), "a caikit constitution is a .toml, .yaml, .yml or .json file"
        )
    text = _read_text(path)
    data: Any
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConstitutionError(str(path), f"invalid TOML: {exc}") from None
    elif suffix == ".json":
        data = _read_json(path)
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConstitutionError(str(path), f"invalid YAML{where}: {problem}") from None
    return constitution_from_data(data, name=path.stem, source=str(path))


def _where(section: str, index: int, entry_id: str | None = None) -> str:
    return f"{section}[{index}]" + (f" (id {entry_id!r})" if entry_id else "")


def _unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (allowed: {', '.join(allowed)})"
    return f"{key}: unknown key{hint}"


def _entry_problems(where: str, exc: BaseException) -> list[str]:
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


# --- the anthropic format -------------------------------------------------------------


def _read_anthropic(path: Path) -> Constitution:
    if path.is_dir():
        files = [path / name for name in ANTHROPIC_FILES if (path / name).is_file()]
        if not files:
            raise ConstitutionError(
                str(path), f"holds none of Anthropic's prompt files ({', '.join(ANTHROPIC_FILES)})"
            )
    else:
        files = [path]
    parts: dict[str, list[Any]] = {section: [] for section in _SECTIONS}
    for file in files:
        data = _read_json(file)
        kind = file.name if file.name in ANTHROPIC_FILES else _anthropic_kind(data)
        if kind is None:
            raise ConstitutionError(
                str(file), "not one of Anthropic's prompt files: " + ", ".join(ANTHROPIC_FILES)
            )
        section, parse = _ANTHROPIC_PARSERS[kind]
        problems: list[str] = []
        parts[section].extend(parse(data, problems))
        if problems:
            raise ConstitutionError(str(file), problems)
    return Constitution(name=path.stem, **{k: tuple(v) for k, v in parts.items()})


def _anthropic_kind(data: Any) -> str | None:
    """Which Anthropic prompt file ``data`` looks like (its file name), if any."""
    if isinstance(data, Mapping) and data and all(isinstance(v, Mapping) for v in data.values()):
        if all("edit_request" in v or "prompt" in v for v in data.values()):
            return ANTHROPIC_CRITIQUE_REVISION
        return None
    if not isinstance(data, list) or not data:
        return None
    if all(isinstance(item, str) for item in data):
        if any("CritiqueRequest:" in item for item in data):
            return ANTHROPIC_CRITIQUE_FEW_SHOT
        return ANTHROPIC_FEEDBACK
    if all(isinstance(item, Mapping) for item in data):
        if any("corrects" in item or "incorrects" in item for item in data):
            return ANTHROPIC_FEEDBACK_FEW_SHOT
        if all(set(item) == {"prompt"} for item in data):
            return ANTHROPIC_FEEDBACK_COT_FEW_SHOT
    return None


def _unframe(text: str, request_label: str, answer_label: str) -> str:
    """Strip ``"\\n\\n<request_label>: "`` and ``"\\n\\n<answer_label>:"`` framing."""
    text = text.strip()
    if text.startswith(f"{request_label}:"):
        text = text[len(request_label) + 1 :]
    if text.endswith(f"{answer_label}:"):
        text = text[: -len(answer_label) - 1]
    return text.strip()


def _parse_critique_revision(data: Any, problems: list[str]) -> list[CritiqueRevisionPrinciple]:
    if not isinstance(data, Mapping):
        problems.append(f"expected an object of id: {{prompt, edit_request}}, found {show(data)}")
        return []
    out = []
    for key, entry in data.items():
        where = repr(key)
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: expected an object, found {show(entry)}")
            continue
        problems.extend(
            f"{where}: {_unknown_key(str(k), ('prompt', 'edit_request'))}"
            for k in entry
            if k not in ("prompt", "edit_request")
        )
        prompt = entry.get("prompt")
        edit_request = entry.get("edit_request")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        elif isinstance(prompt, list):
            problems.append(
                f"{where}: 'prompt' must hold exactly one critique request, found {len(prompt)}"
            )
            continue
        for name, value in (("prompt", prompt), ("edit_request", edit_request)):
            if name not in entry:
                problems.append(f"{where}: {name!r} is missing")
            elif not isinstance(value, str):
                problems.append(f"{where}: {name!r}: expected a string, found {show(value)}")
        if isinstance(prompt, str) and isinstance(edit_request, str):
            out.append(
                CritiqueRevisionPrinciple(
                    id=str(key),
                    critique=_unframe(prompt, "CritiqueRequest", "Critique"),
                    revision=_unframe(edit_request, "RevisionRequest", "Revision"),
                )
            )
    return out


def _anthropic_strings(data: Any, problems: list[str]) -> list[tuple[int, str]]:
    if not isinstance(data, list):
        problems.append(f"expected a list of strings, found {show(data)}")
        return []
    out = []
    for index, item in enumerate(data):
        if isinstance(item, str):
            out.append((index, item))
        else:
            problems.append(f"[{index}]: expected a string, found {show(item)}")
    return out


def _parse_feedback(data: Any, problems: list[str]) -> list[FeedbackPrinciple]:
    out = []
    for index, text in _anthropic_strings(data, problems):
        text = text.strip()
        text = text.removesuffix("Options:").strip()
        out.append(FeedbackPrinciple(id=f"feedback{index}", text=text))
    return out


_CRITIQUE_LABELS: Final = (
    "Human",
    "Assistant",
    "CritiqueRequest",
    "Critique",
    "RevisionRequest",
    "Revision",
)
_CRITIQUE_TAIL: Final = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")


def _parse_critique_few_shot(data: Any, problems: list[str]) -> list[CritiqueFewShot]:
    out = []
    for index, text in _anthropic_strings(data, problems):
        try:
            parts = split_transcript(text, _CRITIQUE_LABELS)
        except ValueError:
            problems.append(f"[{index}]: expected a transcript starting with Human:")
            continue
        if parts and parts[-1] == ("Human", ""):
            parts.pop()  # the examples end by opening the next conversation
        labels = tuple(label for label, _ in parts)
        head, tail = parts[:-4], parts[-4:]
        if (
            labels[-4:] != _CRITIQUE_TAIL
            or not head
            or any(label not in ("Human", "Assistant") for label, _ in head)
            or head[-1][0] != "Assistant"
        ):
            problems.append(
                f"[{index}]: expected Human/Assistant turns ending with an Assistant turn, then "
                f"{', '.join(_CRITIQUE_TAIL)}; found {', '.join(labels)}"
            )
            continue
        out.append(
            CritiqueFewShot(
                messages=tuple(
                    Message("user" if label == "Human" else "assistant", content)
                    for label, content in head
                ),
                critique_request=tail[0][1],
                critique=tail[1][1],
                revision_request=tail[2][1],
                revision=tail[3][1],
            )
        )
    return out


def _comparison_prompt(text: str) -> str | None:
    """The canonical transcript of a comparison prompt ending with a human turn."""
    try:
        messages = parse_transcript(text)
    except ValueError:
        return None
    if not messages or messages[-1].role != "user":
        return None
    return render_transcript(messages)


def _parse_feedback_few_shot(data: Any, problems: list[str]) -> list[FeedbackFewShot]:
    if not isinstance(data, list):
        problems.append(f"expected a list of {{prompt, corrects, incorrects}}, found {show(data)}")
        return []
    out: list[FeedbackFewShot] = []
    for index, entry in enumerate(data):
        where = f"[{index}]"
        if not isinstance(entry, Mapping):
            problems.append(f"{where}: expected an object, found {show(entry)}")
            continue
        allowed = ("prompt", "corrects", "incorrects")
        problems.extend(
            f"{where}: {_unknown_key(str(k), allowed)}" for k in entry if k not in allowed
        )
        ok = True
        for name in allowed:
            value = entry.get(name)
            expected = str if name == "prompt" else list
            if name not in entry:
                problems.append(f"{where}: {name!r} is missing")
                ok = False
            elif not isinstance(value, expected) or (
                expected is list and not (value and all(isinstance(v, str) for v in value))
            ):
                kind = "a string" if expected is str else "a non-empty list of strings"
                problems.append(f"{where}: {name!r}: expected {kind}, found {show(value)}")
                ok = False
        if not ok:
            continue
        prompt = _comparison_prompt(entry["prompt"])
        if prompt is None:
            problems.append(
                f"{where}: 'prompt': expected a Human/Assistant transcript ending with a "
                f"Human turn, found {show(entry['prompt'])}"
            )
            continue
        for correct, incorrect in itertools.product(entry["corrects"], entry["incorrects"]):
            correct_first = len(out) % 2 == 0
            out.append(
                FeedbackFewShot(
                    prompt=prompt,
                    response_a=(correct if correct_first else incorrect).strip(),
                    response_b=(incorrect if correct_first else correct).strip(),
                    principle="",
                    answer="A" if correct_first else "B",
                )
            )
    return out


_COT_PATTERN: Final = re.compile(
    r"\A\s*Human:\s*Consider the following conversation between a human(?: \(H\))? "
    r"and an assistant(?: \(A\))?:\s*\n(?P<conversation>.*?)\n\s*\{\}\s*\n"
    r"\s*\(A\) \[\[\[(?P<a>.*?)\]\]\]\s*\n"
    r"\s*\(B\) \[\[\[(?P<b>.*?)\]\]\]\s*\n"
    r"\s*Assistant:\s*(?:Let's think step by step:)?(?P<rationale>.*?)"
    r"\n\s*Human:\s*So the answer is:\s*\((?P<answer>[AB])\)\s*\Z",
    re.DOTALL,
)
_COT_LEAD: Final = "Consider the following conversation between a human (H) and an assistant (A):"
_COT_CUE: Final = "Let's think step by step:"


def _parse_feedback_cot_few_shot(data: Any, problems: list[str]) -> list[FeedbackFewShot]:
    if not isinstance(data, list):
        problems.append(f"expected a list of {{prompt}}, found {show(data)}")
        return []
    out = []
    for index, entry in enumerate(data):
        where = f"[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("prompt"), str):
            problems.append(
                f"{where}: expected an object with a string 'prompt', found {show(entry)}"
            )
            continue
        problems.extend(
            f"{where}: {_unknown_key(str(k), ('prompt',))}" for k in entry if k != "prompt"
        )
        match = _COT_PATTERN.match(entry["prompt"])
        conversation: Conversation = ()
        if match:
            try:
                conversation = parse_transcript(match["conversation"].strip(), SHORT_LABELS)
            except ValueError:
                conversation = ()
        if not match or not conversation or conversation[-1].role != "user":
            problems.append(
                f"{where}: 'prompt': expected 'Human: Consider the following conversation ...', "
                "H:/A: turns ending with H:, '{}', '(A) [[[...]]]', '(B) [[[...]]]', "
                "'Assistant: <reasoning>' and 'Human: So the answer is: (A|B)'"
            )
            continue
        out.append(
            FeedbackFewShot(
                prompt=render_transcript(conversation),
                response_a=match["a"].strip(),
                response_b=match["b"].strip(),
                principle="",
                answer=match["answer"],
                rationale=match["rationale"].strip(),
            )
        )
    return out


_ANTHROPIC_PARSERS: Final[dict[str, tuple[str, Callable[[Any, list[str]], Sequence[Any]]]]] = {
    ANTHROPIC_CRITIQUE_REVISION: ("critique_revision", _parse_critique_revision),
    ANTHROPIC_FEEDBACK: ("feedback", _parse_feedback),
    ANTHROPIC_CRITIQUE_FEW_SHOT: ("critique_few_shot", _parse_critique_few_shot),
    ANTHROPIC_FEEDBACK_FEW_SHOT: ("feedback_few_shot", _parse_feedback_few_shot),
    ANTHROPIC_FEEDBACK_COT_FEW_SHOT: ("feedback_few_shot", _parse_feedback_cot_few_shot),
}


def _anthropic_losses(constitution: Constitution) -> list[str]:
    losses = []
    for index, example in enumerate(constitution.critique_few_shot):
        if any(m.role not in HUMAN_ASSISTANT for m in example.messages):
            losses.append(f"the system turns of critique_few_shot[{index}]")
    for index, feedback_example in enumerate(constitution.feedback_few_shot):
        if not _anthropic_can_hold(feedback_example):
            losses.append(
                f"feedback_few_shot[{index}], whose prompt does not end with a human turn"
            )
        elif feedback_example.principle.strip():
            losses.append(f"the principle of feedback_few_shot[{index}]")
    return losses


def _anthropic_can_hold(example: FeedbackFewShot) -> bool:
    """Whether the conversation of a few-shot comparison can be written and read back."""
    try:
        messages = few_shot_conversation(example)
    except ValueError:
        return False
    return bool(messages) and messages[-1].role == "user"


def _anthropic_files(constitution: Constitution) -> dict[str, Any]:
    """The Anthropic files' contents for a constitution (only the non-empty ones)."""
    files: dict[str, Any] = {}
    if constitution.critique_revision:
        files[ANTHROPIC_CRITIQUE_REVISION] = {
            p.id: {
                "prompt": [f"\n\nCritiqueRequest: {p.critique}\n\nCritique:"],
                "edit_request": f"\n\nRevisionRequest: {p.revision}\n\nRevision:",
            }
            for p in constitution.critique_revision
        }
    if constitution.feedback:
        files[ANTHROPIC_FEEDBACK] = [f"\n{p.text} Options:" for p in constitution.feedback]
    if constitution.critique_few_shot:
        files[ANTHROPIC_CRITIQUE_FEW_SHOT] = [
            "\n\n"
            + render_transcript([m for m in e.messages if m.role in HUMAN_ASSISTANT])
            + f"\n\nCritiqueRequest: {e.critique_request}\n\nCritique: {e.critique}"
            + f"\n\nRevisionRequest: {e.revision_request}\n\nRevision: {e.revision}\n\nHuman:"
            for e in constitution.critique_few_shot
        ]
    plain, reasoned = [], []
    for example in filter(_anthropic_can_hold, constitution.feedback_few_shot):
        conversation = few_shot_conversation(example)
        correct, incorrect = example.response_a, example.response_b
        if example.answer == "B":
            correct, incorrect = incorrect, correct
        if example.rationale is None:
            plain.append(
                {
                    "prompt": f"\n\n{render_transcript(conversation)}\n\nAssistant:",
                    "corrects": [correct],
                    "incorrects": [incorrect],
                }
            )
        else:
            turns = render_transcript(conversation, SHORT_LABELS)
            reasoned.append(
                {
                    "prompt": f"\n\nHuman: {_COT_LEAD}\n\n{turns}\n\n{{}}\n"
                    f" (A) [[[{example.response_a}]]]\n (B) [[[{example.response_b}]]]\n\n"
                    f"Assistant: {_COT_CUE} {example.rationale}\n\n"
                    f"Human:\nSo the answer is: ({example.answer})"
                }
            )
    if plain:
        files[ANTHROPIC_FEEDBACK_FEW_SHOT] = plain
    if reasoned:
        files[ANTHROPIC_FEEDBACK_COT_FEW_SHOT] = reasoned
    return files


def _write_anthropic(constitution: Constitution, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise ConstitutionError(str(target), "the anthropic format is written to a directory")
    target.mkdir(parents=True, exist_ok=True)
    files = _anthropic_files(constitution)
    for name in ANTHROPIC_FILES:
        if name in files:
            _write_text(target / name, _to_json(files[name]))
        else:
            (target / name).unlink(missing_ok=True)


# --- the llm-swarm format -------------------------------------------------------------


@attrs.frozen
class _LlmSwarmPrinciple:
    critic: str
    revision: str


def _read_llm_swarm(path: Path) -> Constitution:
    data = _read_json(path)
    source = str(path)
    if not isinstance(data, Mapping):
        raise ConstitutionError(source, f"expected an object at the top level, found {show(data)}")
    allowed = ("constitutions", "system_chat")
    problems = [_unknown_key(str(k), allowed) for k in data if k not in allowed]
    principles: list[CritiqueRevisionPrinciple] = []
    raw_principles = data.get("constitutions")
    if not isinstance(raw_principles, list):
        problems.append(
            "constitutions: is missing"
            if "constitutions" not in data
            else f"constitutions: expected a list, found {show(raw_principles)}"
        )
        raw_principles = []
    for index, entry in enumerate(raw_principles):
        try:
            item = structure(entry, _LlmSwarmPrinciple)
        except Exception as exc:
            problems.extend(_entry_problems(f"constitutions[{index}]", exc))
            continue
        principles.append(
            CritiqueRevisionPrinciple(f"llm-swarm-{index}", item.critic, item.revision)
        )
    examples: list[CritiqueFewShot] = []
    chats = data.get("system_chat", [])
    if not isinstance(chats, list):
        problems.append(f"system_chat: expected a list of chats, found {show(chats)}")
        chats = []
    for index, chat in enumerate(chats):
        example = _llm_swarm_example(f"system_chat[{index}]", chat, problems)
        if example is not None:
            examples.append(example)
    if problems:
        raise ConstitutionError(source, problems)
    return Constitution(
        name=path.stem, critique_revision=tuple(principles), critique_few_shot=tuple(examples)
    )


def _llm_swarm_example(where: str, chat: Any, problems: list[str]) -> CritiqueFewShot | None:
    if not isinstance(chat, list):
        problems.append(f"{where}: expected a list of messages, found {show(chat)}")
        return None
    messages: list[Message] = []
    for turn, raw in enumerate(chat):
        try:
            messages.append(structure(raw, Message))
        except Exception as exc:
            problems.extend(_entry_problems(f"{where}[{turn}]", exc))
    if len(messages) != len(chat):
        return None
    roles = [m.role for m in messages]
    head, tail = messages[:-4], messages[-4:]
    if (
        len(messages) < 6
        or roles[-4:] != ["user", "assistant", "user", "assistant"]
        or head[-1].role != "assistant"
    ):
        problems.append(
            f"{where}: cannot map to a critique few-shot example: expected the conversation "
            "(ending with an assistant turn), then critique request (user), critique "
            "(assistant), revision request (user) and revision (assistant); found roles "
            + (", ".join(roles) or "none")
        )
        return None
    return CritiqueFewShot(
        messages=tuple(head),
        critique_request=tail[0].content,
        critique=tail[1].content,
        revision_request=tail[2].content,
        revision=tail[3].content,
    )


def _llm_swarm_losses(constitution: Constitution) -> list[str]:
    losses = []
    if constitution.feedback:
        losses.append(f"the {len(constitution.feedback)} feedback principles")
    if constitution.feedback_few_shot:
        losses.append(f"the {len(constitution.feedback_few_shot)} feedback few-shot examples")
    return losses


def _llm_swarm_data(constitution: Constitution) -> dict[str, Any]:
    return {
        "constitutions": [
            {"critic": p.critique, "revision": p.revision} for p in constitution.critique_revision
        ],
        "system_chat": [
            [
                *unstructure(e.messages),
                {"role": "user", "content": e.critique_request},
                {"role": "assistant", "content": e.critique},
                {"role": "user", "content": e.revision_request},
                {"role": "assistant", "content": e.revision},
            ]
            for e in constitution.critique_few_shot
        ],
    }


# --- writing --------------------------------------------------------------------------


def _dump_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".toml", ".yaml", ".yml"):
        return "caikit"
    if suffix == ".json":
        return "llm-swarm"
    if not suffix or path.is_dir():
        return "anthropic"
    raise ConstitutionError(
        str(path),
        "cannot tell the format to write from the suffix; use .toml, .yaml, .yml (caikit), "
        ".json (llm-swarm) or a directory (anthropic), or name the format",
    )


def _check_loss(target: Path, losses: list[str], lossy: bool) -> None:
    if losses and not lossy:
        raise ConstitutionError(
            str(target),
            [f"this format cannot hold {loss}" for loss in losses]
            + ["pass lossy=True (--lossy) to write the rest anyway"],
        )


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file in the same directory, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


_TOML_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_escape(text: str, *, multiline: bool) -> str:
    out = []
    for char in text:
        code = ord(char)
        if char == "\n" and multiline:
            out.append(char)
        elif char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConstitutionError("", f"cannot write a lone surrogate (U+{code:04X}) to TOML")
        else:
            out.append(char)
    return "".join(out)


def _toml_string(text: str) -> str:
    """A TOML basic string; multi-line (``\"\"\"``) when ``text`` has newlines."""
    if "\n" in text:
        # The newline right after the opening delimiter is not part of the string.
        return '"""\n' + _toml_escape(text, multiline=True) + '"""'
    return '"' + _toml_escape(text, multiline=False) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list) and not value:
        return "[]"
    raise TypeError(f"cannot write {show(value)} to a caikit TOML constitution")


class _YamlDumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings in literal block style where possible."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_YamlDumper.add_representer(str, _represent_str)
