"""The instrument checks of the conformance kit: a conforming instrument passes every
one, and each check fails a deliberately broken instrument, with a message saying
what to fix. No model is loaded: the instruments run against a stand-in context."""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from caikit_core import hookimpl, plugins
from caikit_core.evaluation import Estimate, EvalResult
from caikit_core.records import PreferenceLabel
from caikit_core.testing.base import BaseInstrumentTests
from caikit_core.testing.kit import check_plugin, make_context, select_checks


class FakeLabeller:
    capabilities = frozenset()

    def label(self, comparisons: Any, *, seed: int) -> list[PreferenceLabel]:
        return [PreferenceLabel(f"l-{c.id}", c.id, 0.5, "fake") for c in comparisons]


class FakeContext:
    """An EvalContext with nothing behind it (a labeller that always says 0.5)."""

    checkpoints = {"base": "/nowhere"}
    run_dir = None
    seed = 0

    def generator(self, model: str) -> Any:
        return object()

    def labeller(self) -> Any:
        return FakeLabeller()

    def preference_model(self) -> Any:
        return object()


def good_result(name: str) -> EvalResult:
    return EvalResult(
        name,
        metrics={"share": Estimate(0.5, 0.25, 0.75, 2)},
        rows=[{"id": "a", "ok": 1.0}, {"id": "b", "ok": 0.0}],
        tables={"t": [{"k": "x", "v": 1}]},
    )


class Good:
    requires = frozenset({"labeller"})

    def evaluate(self, ctx: Any) -> EvalResult:
        ctx.labeller()
        return good_result("good")


def _register(name: str, instrument: Callable[[], Any]) -> None:
    @hookimpl
    def register_evaluations(register: Any) -> None:
        register(name, lambda config: instrument())

    module = types.ModuleType(f"inst_{name}")
    module.register_evaluations = register_evaluations  # type: ignore[attr-defined]
    plugins.get_plugin_manager().register(module, f"inst-{name}")


def _results(name: str, instrument: Callable[[], Any], tmp_path: Path) -> dict[str, Any]:
    _register(name, instrument)
    ctx = make_context("instrument", name, workdir=tmp_path, eval_context_factory=FakeContext)
    return {r.check: r for r in check_plugin("instrument", name, context=ctx)}


def _broken(evaluate: Callable[[Any], EvalResult], requires: Any = frozenset({"labeller"})) -> Any:
    return type("Broken", (), {"requires": requires, "evaluate": lambda self, ctx: evaluate(ctx)})()


def test_a_conforming_instrument_passes_every_check(tmp_path: Path) -> None:
    results = _results("good", Good, tmp_path)
    assert len(results) == len(select_checks("instrument")) == 6
    assert {r.status for r in results.values()} == {"passed"}, results


BROKEN: dict[str, tuple[Callable[[], Any], str]] = {
    "check_instrument_declares_known_requirements": (
        lambda: _broken(lambda ctx: good_result("bad"), requires=frozenset({"labeler"})),
        "requires names unknown requirements ['labeler']",
    ),
    "check_instrument_result_is_named": (
        lambda: _broken(lambda ctx: good_result("someone-else")),
        "EvalResult.instrument is 'someone-else'; it must be the registered name 'bad'",
    ),
    "check_instrument_estimates_are_intervals": (
        lambda: _broken(
            lambda ctx: EvalResult("bad", metrics={"x": Estimate(0.9, 0.1, 0.5, 3)}, rows=[{}])
        ),
        "metric 'x': expected low <= value <= high",
    ),
    "check_instrument_rows_back_the_metrics": (
        lambda: _broken(lambda ctx: EvalResult("bad", metrics={"x": Estimate.exact(1.0, 1)})),
        "the result has metrics but no rows",
    ),
    "check_instrument_result_round_trips": (
        lambda: _broken(
            lambda ctx: EvalResult("bad", tables={"t": [{"path": Path("/x")}]}, rows=[{"a": 1}])
        ),
        "write_result/read_result failed: TypeError",
    ),
    "check_instrument_calls_only_what_it_requires": (
        lambda: _broken(
            lambda ctx: (ctx.labeller(), ctx.checkpoints, good_result("bad"))[2],
            requires=frozenset({"labeller"}),
        ),
        "evaluate(ctx) used ['checkpoints'], which requires does not declare",
    ),
}


@pytest.mark.parametrize("check", sorted(BROKEN))
def test_each_check_fails_a_broken_instrument(check: str, tmp_path: Path) -> None:
    make, message = BROKEN[check]
    result = _results("bad", make, tmp_path)[check]
    assert result.status == "failed"
    assert message in result.reason


def test_an_n_of_zero_fails_the_interval_check(tmp_path: Path) -> None:
    bad = _broken(lambda ctx: EvalResult("bad", metrics={"x": Estimate(1, 1, 1, 0)}, rows=[{}]))
    result = _results("bad", lambda: bad, tmp_path)["check_instrument_estimates_are_intervals"]
    assert result.status == "failed" and "n (its items) must be > 0" in result.reason


def test_every_check_is_tested_against_a_broken_instrument() -> None:
    assert sorted(BROKEN) == sorted(c.name for c in select_checks("instrument"))


def test_two_plugins_registering_one_instrument_name_is_an_error() -> None:
    from caikit_core.errors import PluginError

    _register("twice", Good)
    _register_again = types.ModuleType("again")

    @hookimpl
    def register_evaluations(register: Any) -> None:
        register("twice", lambda config: Good())

    _register_again.register_evaluations = register_evaluations  # type: ignore[attr-defined]
    plugins.get_plugin_manager().register(_register_again, "again")
    with pytest.raises(PluginError, match="two plugins register the instrument name 'twice'"):
        plugins.get_registry()


def test_instruments_are_listed_but_are_no_run_role(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from caikit_core import cli

    _register("listed", Good)
    assert cli.main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "listed", "role": "instrument"}.items() <= next(
        r for r in rows if r["name"] == "listed"
    ).items()
    assert "instrument" not in plugins.ROLES and plugins.KIND_HOOKS["instrument"] == (
        "register_evaluations"
    )


def test_a_misspelt_evaluation_hook_suggests_the_right_one() -> None:
    from caikit_core.errors import PluginError

    @hookimpl
    def register_evaluation(register: Any) -> None: ...

    module = types.ModuleType("misspelt")
    module.register_evaluation = register_evaluation  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="did you mean 'register_evaluations'"):
        plugins.get_plugin_manager().register(module, "misspelt")


class TestGoodInstrumentThroughTheBaseClass(BaseInstrumentTests):
    """A third party's one-class test file: every instrument check as its own test."""

    @pytest.fixture
    def plugin(self) -> Any:
        return Good()

    @pytest.fixture
    def eval_context(self) -> Any:
        return FakeContext()


class TestBrokenInstrumentThroughTheBaseClass(BaseInstrumentTests):
    """A known failure is a strict xfail carrying its reason."""

    expected_failed_checks = {
        "check_instrument_calls_only_what_it_requires": "reads checkpoints undeclared"
    }

    @pytest.fixture
    def plugin(self) -> Any:
        return BROKEN["check_instrument_calls_only_what_it_requires"][0]()

    @pytest.fixture
    def eval_context(self) -> Any:
        return FakeContext()
