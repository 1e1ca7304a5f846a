"""The bundled instruments pass the conformance kit's instrument checks (on the kit's
tiny model, with their quick settings: two items, 50 bootstrap rounds)."""

from __future__ import annotations

from typing import Any

import pytest

from caikit_core.testing.kit import parametrize_with_checks

pytestmark = pytest.mark.usefixtures("eval_plugin", "one_torch_thread")


@parametrize_with_checks("instrument", "hhh")
def test_instrument_hhh(check: Any) -> None:
    check()


@parametrize_with_checks("instrument", "hh-alignment")
def test_instrument_hh_alignment(check: Any) -> None:
    check()


@parametrize_with_checks("instrument", "position-bias")
def test_instrument_position_bias(check: Any) -> None:
    check()
