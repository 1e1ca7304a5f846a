"""caikit_core.validators: the attrs validators plugins share, and their messages."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

from caikit_core import validators as v
from caikit_core.converter import InvalidValue, describe_error, structure


@attrs.frozen
class Settings:
    rate: float = attrs.field(default=1.0, validator=v.positive_number)
    floor: float = attrs.field(default=0.0, validator=v.non_negative_number)
    count: int = attrs.field(default=1, validator=v.positive_int)
    retries: int = attrs.field(default=0, validator=v.non_negative_int)
    seed: int = attrs.field(default=0, validator=v.integer)
    flag: bool = attrs.field(default=False, validator=v.boolean)
    mode: str = attrs.field(default="a", validator=v.one_of(("a", "b")))
    share: float = attrs.field(default=0.5, validator=v.number_in(0, 1, high_open=True))
    top_p: float = attrs.field(default=1.0, validator=v.number_in(0, 1, low_open=True))
    generations: int = attrs.field(default=2, validator=v.int_at_least(2))
    limit: int | None = attrs.field(default=None, validator=v.optional(v.positive_int))
    name: str | None = attrs.field(default=None, validator=v.optional(v.non_empty_string))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rate": 0}, "rate: expected a number > 0, found 0"),
        ({"rate": -1.5}, "rate: expected a number > 0, found -1.5"),
        (
            {"rate": math.inf},
            "rate: expected a number > 0, found inf (NaN and infinities are refused)",
        ),
        ({"rate": True}, "rate: expected a number > 0, found True"),
        ({"floor": -0.1}, "floor: expected a number >= 0, found -0.1"),
        ({"count": 0}, "count: expected a positive integer, found 0"),
        ({"count": 2.0}, "count: expected a positive integer, found 2.0"),
        ({"retries": -1}, "retries: expected an integer >= 0, found -1"),
        ({"seed": "3"}, "seed: expected an integer, found '3'"),
        ({"flag": 1}, "flag: expected true or false, found 1"),
        ({"mode": "c"}, "mode: expected one of 'a', 'b', found 'c'"),
        ({"share": 1.0}, "share: expected a number in [0, 1), found 1.0"),
        (
            {"share": math.nan},
            "share: expected a number in [0, 1), found nan (NaN and infinities are refused)",
        ),
        ({"top_p": 0.0}, "top_p: expected a number in (0, 1], found 0.0"),
        ({"generations": 1}, "generations: expected an integer >= 2, found 1"),
        ({"limit": 0}, "limit: expected a positive integer or nothing, found 0"),
        ({"name": "  "}, "name: expected a non-empty string or nothing, found '  '"),
    ],
)
def test_messages_name_the_field_and_the_value(changes: dict[str, Any], message: str) -> None:
    field, text = message.split(": ", 1)
    with pytest.raises(InvalidValue) as info:
        Settings(**changes)
    assert info.value.field == field and str(info.value) == text


def test_valid_values_and_nothing_pass() -> None:
    ok = Settings(rate=2, floor=0, count=3, share=0.0, top_p=1, generations=5, limit=None)
    assert ok.rate == 2 and ok.limit is None and ok.name is None
    assert Settings(limit=4, name="x").limit == 4


def test_a_run_file_reports_the_key_path() -> None:
    with pytest.raises(Exception) as info:
        structure({"share": 0.5, "count": 0}, Settings)
    assert describe_error(info.value, prefix="labeller") == [
        "labeller.count: expected a positive integer, found 0"
    ]
