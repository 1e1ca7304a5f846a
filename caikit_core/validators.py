"""attrs validators for config classes, shared by the core and every plugin.

Each validator raises :class:`~caikit_core.converter.InvalidValue`, so
:func:`caikit_core.config.resolve` reports the problem at the field's key path
with the offending value, e.g. ``policy_optimiser.sft.learning_rate: expected a
number > 0, found -1.0``::

    import attrs
    from caikit_core import validators as v

    @attrs.frozen
    class MyConfig:
        retries: int = attrs.field(default=2, validator=v.non_negative_int)
        timeout: float = attrs.field(default=30.0, validator=v.positive_number)
        mode: str = attrs.field(default="fast", validator=v.one_of(("fast", "exact")))
        limit: int | None = attrs.field(default=None, validator=v.optional(v.positive_int))

The converter has already checked the type by the time a validator runs (``"3"``
is not an int), so these check values; they also refuse ``True`` where a number
is expected, for classes built directly in Python. Every numeric validator refuses
NaN and infinities (``nan < 0`` is false, so a bare comparison would let NaN
through), e.g. ``expected a number >= 0, found nan (NaN and infinities are refused)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from caikit_core.converter import InvalidValue

__all__ = [
    "NOT_FINITE",
    "Check",
    "boolean",
    "int_at_least",
    "integer",
    "non_empty_string",
    "non_negative_int",
    "non_negative_number",
    "number_in",
    "one_of",
    "optional",
    "positive_int",
    "positive_number",
]


class Check:
    """An attrs validator: ``ok(value)`` or ``InvalidValue("expected WHAT, found VALUE")``.

    :ivar what: what a valid value is, as the message says it (``"a number > 0"``).
    :ivar ok: the test a valid value passes.
    """

    def __init__(self, what: str, ok: Callable[[Any], bool]) -> None:
        self.what = what
        self.ok = ok

    def __call__(self, instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not self.ok(value):
            why = NOT_FINITE if isinstance(value, float) and not math.isfinite(value) else ""
            raise InvalidValue(attribute.name, f"expected {self.what}, found {value!r}{why}")

    def __repr__(self) -> str:
        return f"<validator: {self.what}>"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: what a message adds after a NaN or infinity
NOT_FINITE = " (NaN and infinities are refused)"


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN and infinities are never valid settings."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def optional(check: Check) -> Check:
    """``check``, or nothing (``None``): the message says ``... or nothing``."""
    return Check(f"{check.what} or nothing", lambda v: v is None or check.ok(v))


def int_at_least(low: int) -> Check:
    """An integer ``>= low`` (``"expected an integer >= 2, found 1"``)."""
    return Check(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """A number in an interval: ``number_in(0, 1, high_open=True)`` says ``[0, 1)``."""

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = bool(v > low) if low_open else bool(v >= low)
        below = bool(v < high) if high_open else bool(v <= high)
        return above and below

    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return Check(f"a number in {interval}", ok)


def one_of(choices: tuple[Any, ...]) -> Check:
    """One of ``choices`` (``"expected one of 'a', 'b', found 'c'"``)."""
    allowed = ", ".join(repr(c) for c in choices)
    return Check(f"one of {allowed}", lambda v: v in choices)


#: A finite number > 0.
positive_number = Check("a number > 0", lambda v: _is_number(v) and v > 0)
#: A finite number >= 0.
non_negative_number = Check("a number >= 0", lambda v: _is_number(v) and v >= 0)
#: An integer >= 1.
positive_int = Check("a positive integer", lambda v: _is_int(v) and v >= 1)
#: An integer >= 0.
non_negative_int = int_at_least(0)
#: Any integer.
integer = Check("an integer", _is_int)
#: ``true`` or ``false``.
boolean = Check("true or false", lambda v: isinstance(v, bool))
#: A string with something other than whitespace in it.
non_empty_string = Check("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
