"""The one cattrs converter shared by records and config.

It is strict where a config file can be wrong: ``"3"`` is not an int, ``1`` is
not a bool, ``2.5`` is not an int, a string is not a list, and unknown keys are
rejected. An attrs class with a ``moved_keys`` class variable (a mapping of old key
to message, e.g. ``{"ppo_steps": "moved to policy_optimiser.ppo.steps"}``) has those
keys refused with their message instead. :func:`describe_error` turns a structuring
failure into lines of ``key.path: expected ..., found ...``.
"""

from __future__ import annotations

import difflib
import reprlib
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn

converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


class InvalidValue(ValueError):
    """Raised by attrs validators so the error is reported at the field's key path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 60, 60, 60
    return r


_REPR = _bounded_repr()


def show(value: Any) -> str:
    """How a found value is quoted in error messages: at most about 60 characters,
    built in bounded time however large the value (a few items of a few levels)."""
    kinds: dict[type, str] = {dict: "table", list: "list", tuple: "list"}
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, str):
        text = repr(value[:61])
    elif isinstance(value, (dict, list, tuple, set, frozenset)):
        text = _REPR.repr(value)
    else:
        try:
            text = repr(value)
        except ValueError:  # an int of more digits than Python converts
            text = f"<a {kind} too large to show>"
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})"


def _strict(kind: type, accepted: tuple[type, ...]) -> Callable[[Any, Any], Any]:
    name = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[
        kind.__name__
    ]

    def hook(value: Any, _type: Any) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
            raise TypeError(f"expected {name}, found {show(value)}")
        return kind(value)

    return hook


converter.register_structure_hook(int, _strict(int, (int,)))
converter.register_structure_hook(float, _strict(float, (int, float)))
converter.register_structure_hook(str, _strict(str, (str,)))
converter.register_structure_hook(bool, _strict(bool, (bool,)))


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _literal_hook(tp: Any) -> Callable[[Any, Any], Any]:
    allowed = typing.get_args(tp)

    def hook(value: Any, _type: Any) -> Any:
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        options = ", ".join(repr(a) for a in allowed)
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
            if close:
                hint = f"; did you mean '{close[0]}'?"
        raise ValueError(f"expected one of {options}, found {show(value)}{hint}")

    return hook


def _is_homogeneous_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        return True
    if origin is tuple:
        args = typing.get_args(tp)
        return len(args) == 2 and args[1] is Ellipsis
    return False


def _sequence_hook(tp: Any) -> Callable[[Any, Any], Any]:
    inner = typing.get_args(tp)[0]
    container: type = list if typing.get_origin(tp) is list else tuple

    def hook(value: Any, _type: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, found {show(value)}")
        out: list[Any] = []
        errors: list[Exception] = []
        for index, item in enumerate(value):
            try:
                out.append(converter.structure(item, inner))
            except Exception as exc:
                exc.__notes__ = [
                    *getattr(exc, "__notes__", []),
                    IterableValidationNote(f"Structuring {tp} @ index {index}", index, inner),
                ]
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return container(out)

    return hook


def _attrs_hook(cls: type) -> Callable[[Any, Any], Any]:
    structure_fn: Callable[[Any, Any], Any] = make_dict_structure_fn(
        cls, converter, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True
    )

    moved: Mapping[str, str] = getattr(cls, "moved_keys", None) or {}

    def hook(value: Any, _type: Any) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a table, found {show(value)}")
        if moved:
            errors = [InvalidValue(key, moved[key]) for key in value if key in moved]
            if len(errors) == 1:
                raise errors[0]
            if errors:
                raise ExceptionGroup("keys that moved", errors)
        try:
            return structure_fn(value, cls)
        except (InvalidValue, ClassValidationError):
            errors = _validator_errors(structure_fn, value, cls)
            if len(errors) > 1:  # attrs stops at the first failing validator: report all
                raise ExceptionGroup("invalid values", errors) from None
            raise

    return hook


def _validator_errors(
    structure_fn: Callable[[Any, Any], Any], value: Any, cls: type
) -> list[InvalidValue]:
    """Every field validator's error for ``value`` (empty when the instance cannot be
    built with validators off, e.g. a post-init check fails: the first error stands)."""
    with attrs.validators.disabled():
        try:
            instance = structure_fn(value, cls)
        except Exception:
            return []
    errors: list[InvalidValue] = []
    for field in attrs.fields(cls):
        if field.validator is None:
            continue
        try:
            field.validator(instance, field, getattr(instance, field.name))
        except InvalidValue as exc:
            errors.append(exc)
    return errors


converter.register_structure_hook_factory(_is_literal, _literal_hook)
converter.register_structure_hook_factory(_is_homogeneous_sequence, _sequence_hook)
converter.register_structure_hook_factory(attrs.has, _attrs_hook)


def describe_error(exc: BaseException, prefix: str = "") -> list[str]:
    """Lines of ``key.path: problem`` for a structuring failure, in file order."""
    lines: list[str] = []
    _walk(exc, [prefix] if prefix else [], lines)
    return lines


def _join(path: list[str]) -> str:
    out = ""
    for part in path:
        if part.startswith("["):
            out += part
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _walk(exc: BaseException, path: list[str], lines: list[str]) -> None:
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, IterableValidationNote):
                _walk(sub, [*path, f"[{note.index}]"], lines)
            else:
                name = getattr(note, "name", "?")
                if isinstance(sub, KeyError):
                    lines.append(f"{_join([*path, name])}: required key is missing")
                else:
                    _walk(sub, [*path, name], lines)
        for sub in without:
            _walk(sub, path, lines)
    elif isinstance(exc, ForbiddenExtraKeysError):
        fields = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            msg = f"{_join([*path, key])}: unknown key"
            close = difflib.get_close_matches(key, fields, n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
            elif fields:
                msg += f" (allowed: {', '.join(fields)})"
            lines.append(msg)
    elif isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            _walk(inner, path, lines)
    elif isinstance(exc, InvalidValue):
        lines.append(f"{_join([*path, exc.field])}: {exc}")
    else:
        lines.append(f"{_join(path)}: {exc}")


def unstructure(obj: Any) -> Any:
    """Turn attrs instances (and containers of them) into plain dicts and lists."""
    return converter.unstructure(obj)


def structure(data: Any, cls: Any) -> Any:
    """Build ``cls`` from plain data, strictly (see the module docstring)."""
    return converter.structure(data, cls)
