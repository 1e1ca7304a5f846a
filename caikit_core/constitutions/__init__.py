"""Reading, writing and converting constitutions: one module per format.

``caikit`` (:mod:`caikit_core.constitutions.caikit`)
    The project's own schema, as TOML, YAML or JSON.
``anthropic`` (:mod:`caikit_core.constitutions.anthropic`)
    The supplementary prompt files of Bai et al. 2022 (arXiv 2212.08073).
``llm-swarm`` (:mod:`caikit_core.constitutions.llm_swarm`)
    The constitution of Hugging Face's CAI recipe.

Each format module has the same surface: ``read(path)`` (unvalidated),
``losses(constitution)`` (what the format cannot hold) and
``write(constitution, path)``. This package picks the module, validates, and
refuses a lossy write unless asked. Few-shot comparisons hold their
conversation as a Human/Assistant transcript (see
:mod:`caikit_core.constitutions.common`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Protocol

import attrs

from caikit_core.constitution import (
    DEFAULT_CONSTITUTION,
    Constitution,
    constitution_problems,
    validate_constitution,
)
from caikit_core.constitutions import anthropic, caikit, llm_swarm
from caikit_core.constitutions.anthropic import FILES as ANTHROPIC_FILES
from caikit_core.constitutions.caikit import (
    constitution_from_data,
    constitution_to_data,
    to_toml,
    to_yaml,
)
from caikit_core.constitutions.common import check_loss, few_shot_conversation, read_json
from caikit_core.errors import ConstitutionError

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


class _Format(Protocol):
    """What each format module provides."""

    def read(self, path: Path) -> Constitution: ...
    def losses(self, constitution: Constitution) -> list[str]: ...
    def write(self, constitution: Constitution, target: Path) -> None: ...


#: Format name -> the module that reads and writes it.
_MODULES: Final[Mapping[str, _Format]] = {
    "caikit": caikit,
    "anthropic": anthropic,
    "llm-swarm": llm_swarm,
}

FORMATS: Final = tuple(_MODULES)
"""The constitution formats, besides ``"auto"`` (detect from the path)."""


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
    module = _MODULES[fmt]
    check_loss(target, module.losses(constitution), lossy)
    try:
        module.write(constitution, target)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
        raise ConstitutionError(str(target), f"cannot write: {reason or exc}") from exc
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
        data = read_json(target)
        if isinstance(data, Mapping) and "constitutions" in data:
            return "llm-swarm"
        if isinstance(data, Mapping) and any(key in data for key in caikit.TOP_LEVEL_KEYS):
            return "caikit"
        if anthropic.file_kind(data) is not None:
            return "anthropic"
    raise ConstitutionError(
        str(target),
        "cannot tell the constitution format; pass one of " + ", ".join(FORMATS),
    )


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
    suffix = path.suffix.lower()
    if fmt != "caikit" and path.is_file() and suffix in (".toml", ".yaml", ".yml"):
        raise ConstitutionError(
            str(path),
            f"format {fmt!r} is read from JSON, but this is a {suffix} file; caikit's own "
            "format is the one written as TOML or YAML (use format 'caikit' or 'auto')",
        )
    return _MODULES[fmt].read(path)


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
