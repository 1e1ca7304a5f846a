"""Conformance checks for evaluation instruments (kind ``instrument``):
``caikit check instrument NAME``.

The instrument is built with its quick settings and evaluated once, against a
:class:`RecordingContext` wrapped around the kit's :class:`KitEvalContext` (the
bundled ``hf`` generator and ``direct`` labeller on the tiny model, a length-based
preference model, one checkpoint ``base``), or around the context a caller's
``eval_context_factory`` returns. The checks share that one evaluation.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from caikit_core.evaluation import (
    REQUIREMENTS,
    Estimate,
    EvalResult,
    read_result,
    write_result,
)
from caikit_core.records import Sample
from caikit_core.testing.checks import CheckContext, CheckFailed, role_check

__all__ = [
    "KitEvalContext",
    "LengthPreferenceModel",
    "RecordingContext",
    "check_instrument_calls_only_what_it_requires",
    "check_instrument_declares_known_requirements",
    "check_instrument_estimates_are_intervals",
    "check_instrument_result_is_named",
    "check_instrument_result_round_trips",
    "check_instrument_rows_back_the_metrics",
]

INSTRUMENT = "instrument"


class LengthPreferenceModel:
    """A stand-in trained preference model: the score is the response's length in words."""

    capabilities: frozenset[str] = frozenset()

    def fit(self, labelled: Sequence[Any], out: Path) -> Any:
        raise NotImplementedError("the kit's preference model is not trained")

    def load(self, path: Path) -> None:
        return None

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [float(len(s.response.split())) for s in samples]


class KitEvalContext:
    """The kit's EvalContext: everything on the tiny model, built on request."""

    def __init__(self, workdir: Path, seed: int = 0) -> None:
        self.run_dir: Path | None = workdir
        self.seed = seed
        self._checkpoints: dict[str, str] | None = None

    @property
    def checkpoints(self) -> Mapping[str, str]:
        if self._checkpoints is None:
            from caikit_core.testing import fixtures

            self._checkpoints = {"base": str(fixtures.tiny_model())}
        return self._checkpoints

    def generator(self, model: str) -> Any:
        from caikit_core.testing import fixtures

        path = self.checkpoints.get(model, model)
        return fixtures.hf_generator(Path(path))

    def labeller(self) -> Any:
        return self.labeller_with()

    def labeller_with(self, **settings: Any) -> Any:
        from caikit_core.converter import structure
        from caikit_core.plugins import get_registry
        from caikit_core.testing import fixtures

        spec = get_registry().get("labeller", "direct")
        config = structure(dict(settings), spec.config_cls)
        return spec.build(
            config,
            generator=fixtures.hf_generator(),
            constitution=fixtures.default_constitution(),
        )

    def preference_model(self) -> Any:
        return LengthPreferenceModel()


class RecordingContext:
    """Wraps an EvalContext and records which requirement each call used."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.used: set[str] = set()
        self.seed: int = inner.seed

    @property
    def checkpoints(self) -> Mapping[str, str]:
        self.used.add("checkpoints")
        value: Mapping[str, str] = self.inner.checkpoints
        return value

    @property
    def run_dir(self) -> Path | None:
        self.used.add("run")
        value: Path | None = self.inner.run_dir
        return value

    def generator(self, model: str) -> Any:
        self.used.add("generator")
        return self.inner.generator(model)

    def labeller(self) -> Any:
        self.used.add("labeller")
        return self.inner.labeller()

    def labeller_with(self, **settings: Any) -> Any:
        self.used.add("labeller")
        return self.inner.labeller_with(**settings)

    def preference_model(self) -> Any:
        self.used.add("preference_model")
        return self.inner.preference_model()


def _evaluated(ctx: CheckContext) -> tuple[EvalResult, set[str]]:
    """The instrument's result against a recording context (evaluated once)."""
    if "eval_result" not in ctx.cache:
        if ctx.eval_context_factory is not None:
            inner = ctx.eval_context_factory()
        else:
            inner = KitEvalContext(Path(tempfile.mkdtemp(prefix="caikit-check-eval-")))
        recording = RecordingContext(inner)
        result = ctx.instance.evaluate(recording)
        ctx.cache["eval_result"] = (result, set(recording.used))
    got: tuple[EvalResult, set[str]] = ctx.cache["eval_result"]
    return got


def _result(ctx: CheckContext) -> EvalResult:
    result = _evaluated(ctx)[0]
    if not isinstance(result, EvalResult):
        raise CheckFailed(
            f"evaluate(ctx) returned {type(result).__name__}; return a "
            "caikit_core.evaluation.EvalResult"
        )
    return result


@role_check(INSTRUMENT)
def check_instrument_declares_known_requirements(ctx: CheckContext) -> None:
    """``requires`` is a frozenset of names from ``caikit_core.evaluation.REQUIREMENTS``."""
    requires = getattr(ctx.instance, "requires", None)
    if not isinstance(requires, frozenset):
        raise CheckFailed(f"requires must be a frozenset of requirement names, found {requires!r}")
    unknown = sorted(requires - REQUIREMENTS)
    if unknown:
        raise CheckFailed(
            f"requires names unknown requirements {unknown} (known: {sorted(REQUIREMENTS)})"
        )


@role_check(INSTRUMENT)
def check_instrument_result_is_named(ctx: CheckContext) -> None:
    """The result is an EvalResult carrying the instrument's registered name."""
    result = _result(ctx)
    if ctx.spec is not None and result.instrument != ctx.spec.name:
        raise CheckFailed(
            f"EvalResult.instrument is {result.instrument!r}; it must be the registered "
            f"name {ctx.spec.name!r} (the report and find_results go by it)"
        )


@role_check(INSTRUMENT)
def check_instrument_estimates_are_intervals(ctx: CheckContext) -> None:
    """Every metric is an Estimate with finite ``low <= value <= high`` and ``n > 0``."""
    result = _result(ctx)
    for key, e in result.metrics.items():
        if not isinstance(e, Estimate):
            raise CheckFailed(f"metric {key!r} is {type(e).__name__}, not an Estimate")
        numbers = (e.value, e.low, e.high)
        if not all(isinstance(v, float | int) and math.isfinite(v) for v in numbers):
            raise CheckFailed(f"metric {key!r} has a value or bound that is not finite: {e}")
        if not e.low <= e.value <= e.high:
            raise CheckFailed(f"metric {key!r}: expected low <= value <= high, found {e}")
        if e.n <= 0:
            raise CheckFailed(f"metric {key!r}: n (its items) must be > 0, found {e.n}")


@role_check(INSTRUMENT)
def check_instrument_rows_back_the_metrics(ctx: CheckContext) -> None:
    """An instrument with metrics returns its per-item rows, all with the same keys."""
    result = _result(ctx)
    if result.metrics and not result.rows:
        raise CheckFailed(
            "the result has metrics but no rows: return one row per item so every "
            "number can be traced to its items"
        )
    keys = {tuple(sorted(r)) for r in result.rows}
    if len(keys) > 1:
        raise CheckFailed(f"rows must all have the same keys, found {len(keys)} different key sets")


@role_check(INSTRUMENT)
def check_instrument_result_round_trips(ctx: CheckContext) -> None:
    """The result survives ``write_result`` and ``read_result`` (JSON-able settings,
    tables and series; rows Parquet can hold)."""
    result = _result(ctx)
    folder = ctx.path("round-trip")
    try:
        write_result(result, folder)
        back = read_result(folder)
    except Exception as exc:
        raise CheckFailed(f"write_result/read_result failed: {type(exc).__name__}: {exc}") from exc
    same = (
        back.instrument == result.instrument
        and dict(back.metrics) == dict(result.metrics)
        and len(back.rows) == len(result.rows)
        and {k: [dict(r) for r in v] for k, v in back.tables.items()}
        == {k: [dict(r) for r in v] for k, v in result.tables.items()}
        and {k: [dict(r) for r in v] for k, v in back.series.items()}
        == {k: [dict(r) for r in v] for k, v in result.series.items()}
    )
    if not same:
        raise CheckFailed(
            "the result read back differs from the one written (metrics, tables, series "
            "or row count): use plain JSON values (str, int, float, bool, None, lists, dicts)"
        )


@role_check(INSTRUMENT)
def check_instrument_calls_only_what_it_requires(ctx: CheckContext) -> None:
    """``evaluate`` used only what ``requires`` declares (the run is checked against
    ``requires`` before anything runs, so an undeclared need fails late)."""
    used = _evaluated(ctx)[1]
    declared: frozenset[str] = getattr(ctx.instance, "requires", frozenset())
    extra = sorted(used - set(declared))
    if extra:
        raise CheckFailed(
            f"evaluate(ctx) used {extra}, which requires does not declare "
            f"(requires = {sorted(declared)}); add them to requires"
        )
