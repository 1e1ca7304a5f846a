"""caikit's own constitution schema, as TOML (``.toml``), YAML (``.yaml``/``.yml``)
or JSON (``.json``)::

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
    prompt = "Human: ..."               # see caikit_core.constitutions.common
    response_a = "..."
    response_b = "..."
    principle = "Which of these ...?"   # may be empty: the principle asked about
    answer = "A"                        # "A" or "B"
    rationale = "..."                   # optional chain of thought

Unknown keys and wrong types are errors, reported as ``key.path: problem``. The
format holds everything a :class:`~caikit_core.constitution.Constitution` holds.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from caikit_core import safe_yaml
from caikit_core.constitution import (
    Constitution,
    CritiqueFewShot,
    CritiqueRevisionPrinciple,
    FeedbackFewShot,
    FeedbackPrinciple,
)
from caikit_core.constitutions.common import (
    entry_problems,
    read_json,
    read_text,
    to_json,
    unknown_key,
    write_text,
)
from caikit_core.converter import show, structure, unstructure
from caikit_core.errors import ConstitutionError

__all__ = [
    "SECTIONS",
    "SUFFIXES",
    "TOP_LEVEL_KEYS",
    "constitution_from_data",
    "constitution_to_data",
    "losses",
    "read",
    "to_toml",
    "to_yaml",
    "write",
]

SUFFIXES: Final = (".toml", ".yaml", ".yml", ".json")

SECTIONS: Final[dict[str, type]] = {
    "critique_revision": CritiqueRevisionPrinciple,
    "feedback": FeedbackPrinciple,
    "critique_few_shot": CritiqueFewShot,
    "feedback_few_shot": FeedbackFewShot,
}

TOP_LEVEL_KEYS: Final = ("name", *SECTIONS)


def read(path: Path) -> Constitution:
    """Read a caikit TOML, YAML or JSON constitution (unvalidated)."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConstitutionError(
            str(path), "a caikit constitution is a .toml, .yaml, .yml or .json file"
        )
    text = read_text(path)
    data: Any
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConstitutionError(str(path), f"invalid TOML: {exc}") from None
    elif suffix == ".json":
        data = read_json(path)
    else:
        try:
            data = safe_yaml.load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConstitutionError(str(path), f"invalid YAML{where}: {problem}") from None
    return constitution_from_data(data, name=path.stem, source=str(path))


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
        if key not in TOP_LEVEL_KEYS:
            problems.append(unknown_key(str(key), TOP_LEVEL_KEYS))
    if "name" in data:
        if not isinstance(data["name"], str):
            problems.append(f"name: expected a string, found {show(data['name'])}")
        elif not data["name"].strip():
            problems.append("name: must not be empty")
        else:
            name = data["name"]
    sections: dict[str, tuple[Any, ...]] = {}
    for section, cls in SECTIONS.items():
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
                problems.extend(entry_problems(where, exc))
        sections[section] = tuple(items)
    if problems:
        raise ConstitutionError(source, problems)
    return Constitution(name=name, **sections)


def constitution_to_data(constitution: Constitution) -> dict[str, Any]:
    """Caikit-schema plain data: empty sections and ``None`` rationales left out."""
    data: dict[str, Any] = {"name": constitution.name}
    for section in SECTIONS:
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
    for section in SECTIONS:
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


def losses(constitution: Constitution) -> list[str]:
    """What this format cannot hold of ``constitution``: nothing."""
    return []


def write(constitution: Constitution, target: Path) -> None:
    """Write TOML, YAML or JSON by the suffix of ``target``."""
    suffix = target.suffix.lower()
    if suffix == ".toml":
        text = to_toml(constitution)
    elif suffix in (".yaml", ".yml"):
        text = to_yaml(constitution)
    elif suffix == ".json":
        text = to_json(constitution_to_data(constitution))
    else:
        raise ConstitutionError(
            str(target), "a caikit constitution is written as .toml, .yaml, .yml or .json"
        )
    write_text(target, text)


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


def _where(section: str, index: int, entry_id: str | None = None) -> str:
    return f"{section}[{index}]" + (f" (id {entry_id!r})" if entry_id else "")
