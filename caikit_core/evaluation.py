"""The evaluation contract: what an instrument is, what it is given, what it returns.

An *instrument* measures something about models, generators, labellers or
preference models (labeller accuracy on HHH, refusal rates on XSTest, Elo ratings of
checkpoints, ...). Plugins ship instruments through the ``register_evaluations``
hook, exactly as they ship labellers; ``caikit eval NAME`` runs one alone and a
run's ``[eval]`` table runs them as the ``eval`` stage.

An instrument returns an :class:`EvalResult`: named numbers with intervals
(:class:`Estimate`), optional tables (e.g. an Elo table), series (e.g. a mean per
revision index) and alarms, plus per-item rows, so that every figure can be traced
to the items it was computed from. :func:`write_result` stores a result in a folder
as ``result.json`` and ``rows.parquet``; :func:`read_result` reads it back. The
report (``caikit report``) reads only these files.

:func:`find_results` finds a run directory's results: the ``eval`` stage's, in its
artifact folder ``stages/eval/<fingerprint>/artifact/<NAME>/``, and those
``caikit eval NAME --run RUN_DIR`` wrote to ``RUN_DIR/eval/<NAME>/``.

``result.json`` (``format`` 1)::

    {"format": 1, "instrument": "hhh", "settings": {...},
     "metrics": {"accuracy/direct": {"value": 0.51, "low": 0.47, "high": 0.55,
                                      "n": 438, "level": 0.9, "method": "bootstrap"}},
     "tables": {"elo": [{"model": "base", "rating": 1000.0, ...}, ...]},
     "series": {"revision-curve": [{"x": 0, "value": 0.1, "low": 0.0, "high": 0.2,
                                    "n": 40}, ...]},
     "alarms": [{"name": "ngram-growth", "message": "...", "evidence": {...}}],
     "rows": 438, "notes": ["..."]}

This module imports only the standard library, attrs and (when reading or writing
rows) pyarrow; :func:`find_results` also the run directory's layout
(:mod:`caikit_core.store`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from caikit_core.errors import CaikitError

__all__ = [
    "REQUIREMENTS",
    "RESULT_FILE",
    "RESULT_FORMAT",
    "ROWS_FILE",
    "Alarm",
    "Estimate",
    "EvalContext",
    "EvalResult",
    "Instrument",
    "bootstrap",
    "find_results",
    "format_estimate",
    "read_result",
    "write_result",
]

RESULT_FORMAT = 1
RESULT_FILE = "result.json"
ROWS_FILE = "rows.parquet"

#: What an instrument may ask the run for (``Instrument.requires``).
REQUIREMENTS = frozenset({"generator", "labeller", "preference_model", "checkpoints", "run"})


@attrs.frozen
class Estimate:
    """A number with its interval: ``low <= value <= high`` at confidence ``level``,
    from ``n`` items by ``method`` (``"bootstrap"``, ``"wilson"``, ``"exact"``: no
    interval, ``low == high == value``)."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.9
    method: str = "bootstrap"

    @classmethod
    def exact(cls, value: float, n: int) -> Estimate:
        return cls(value, value, value, n, level=1.0, method="exact")


@attrs.frozen
class Alarm:
    """A warning an instrument raises, with the evidence that tripped it."""

    name: str
    message: str
    evidence: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class EvalResult:
    """What an instrument returns (see the module docstring for the file format).

    :ivar rows: one mapping per item (the same keys in each), written as Parquet.
    """

    instrument: str
    metrics: Mapping[str, Estimate] = attrs.field(factory=dict)
    tables: Mapping[str, Sequence[Mapping[str, Any]]] = attrs.field(factory=dict)
    series: Mapping[str, Sequence[Mapping[str, Any]]] = attrs.field(factory=dict)
    alarms: Sequence[Alarm] = ()
    rows: Sequence[Mapping[str, Any]] = ()
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    notes: Sequence[str] = ()


@runtime_checkable
class EvalContext(Protocol):
    """What the core hands an instrument: the run's roles, built on request.

    Each accessor builds the plugin the run names for that role, with the run's
    settings; an instrument calls only those it declared in ``requires``.
    """

    #: named checkpoints to evaluate (``base``, ``sl``, ``rl`` and any others named)
    checkpoints: Mapping[str, str]
    #: the run directory, when the instrument runs as a stage or with ``--run``
    run_dir: Path | None
    seed: int

    def generator(self, model: str) -> Any:
        """The run's generator plugin built on ``model`` (a checkpoint or a hub id)."""
        ...

    def labeller(self) -> Any:
        """The run's labeller, on its feedback model."""
        ...

    def preference_model(self) -> Any:
        """The run's preference model, loaded from the run's trained one."""
        ...


@runtime_checkable
class Instrument(Protocol):
    """One measurement. ``requires`` names what it needs (:data:`REQUIREMENTS`),
    checked before anything runs; ``evaluate`` does the work."""

    requires: frozenset[str]

    def evaluate(self, ctx: EvalContext) -> EvalResult: ...


def bootstrap(
    items: Sequence[Any],
    statistic: Callable[[Sequence[Any]], float],
    *,
    rounds: int = 1000,
    level: float = 0.9,
    seed: int = 0,
) -> Estimate:
    """``statistic(items)`` with a percentile bootstrap interval: ``rounds``
    resamples of ``items`` with replacement, the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the resampled statistics. Seeded, so the
    same items give the same interval."""
    if not items:
        raise CaikitError("bootstrap: no items to estimate from")
    value = float(statistic(items))
    rng = random.Random(seed)
    n = len(items)
    draws = sorted(
        float(statistic([items[rng.randrange(n)] for _ in range(n)])) for _ in range(rounds)
    )
    tail = (1.0 - level) / 2.0
    low = draws[min(rounds - 1, max(0, math.floor(tail * rounds)))]
    high = draws[min(rounds - 1, max(0, math.ceil((1.0 - tail) * rounds) - 1))]
    return Estimate(value, min(low, value), max(high, value), n, level=level)


def _jsonable(result: EvalResult) -> dict[str, Any]:
    return {
        "format": RESULT_FORMAT,
        "instrument": result.instrument,
        "settings": dict(result.settings),
        "metrics": {k: attrs.asdict(e) for k, e in result.metrics.items()},
        "tables": {k: [dict(r) for r in rows] for k, rows in result.tables.items()},
        "series": {k: [dict(r) for r in rows] for k, rows in result.series.items()},
        "alarms": [attrs.asdict(a) for a in result.alarms],
        "rows": len(result.rows),
        "notes": list(result.notes),
    }


def write_result(result: EvalResult, folder: Path) -> Path:
    """Write ``result.json`` (and ``rows.parquet`` when there are rows) into
    ``folder``, each through a temporary file renamed into place; returns the
    JSON file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows_tmp = folder / (ROWS_FILE + ".tmp")
        pq.write_table(pa.Table.from_pylist([dict(r) for r in result.rows]), rows_tmp)
        rows_tmp.replace(folder / ROWS_FILE)
    target = folder / RESULT_FILE
    tmp = folder / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    tmp.replace(target)
    return target


def read_result(folder: Path) -> EvalResult:
    """Read back what :func:`write_result` wrote (rows included, when present).

    :raises CaikitError: the folder has no result, or one of an unknown format.
    """
    path = folder / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaikitError(f"{path}: no evaluation result here") from None
    except (OSError, ValueError) as exc:
        raise CaikitError(f"{path}: not a readable evaluation result ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise CaikitError(f"{path}: unknown result format (expected format {RESULT_FORMAT})")
    rows: list[dict[str, Any]] = []
    if (folder / ROWS_FILE).exists():
        import pyarrow.parquet as pq

        rows = pq.read_table(folder / ROWS_FILE).to_pylist()
    return EvalResult(
        instrument=str(data["instrument"]),
        metrics={k: Estimate(**e) for k, e in data.get("metrics", {}).items()},
        tables=data.get("tables", {}),
        series=data.get("series", {}),
        alarms=[Alarm(**a) for a in data.get("alarms", [])],
        rows=rows,
        settings=data.get("settings", {}),
        notes=data.get("notes", []),
    )


#: where ``caikit eval NAME --run RUN_DIR`` writes by default, under the run directory
STANDALONE_FOLDER = "eval"
#: the stage that runs a run file's ``[eval]`` instruments
EVAL_STAGE = "eval"


def find_results(run_dir: Path) -> dict[str, Path]:
    """The evaluation results of a run directory: instrument name -> the folder
    holding its ``result.json`` (read it with :func:`read_result`).

    First the ``eval`` stage's results (the stage fingerprint ``run.json`` records,
    one subfolder per instrument of its artifact folder), then those
    ``caikit eval NAME --run RUN_DIR`` wrote under ``RUN_DIR/eval/``, which replace a
    stage result of the same name (they are newer, or were asked for on their own).
    An empty dict when there are none.
    """
    found: dict[str, Path] = {}
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    stages = info.get("stages") if isinstance(info, dict) else None
    fp = stages.get(EVAL_STAGE) if isinstance(stages, dict) else None
    folders = []
    if isinstance(fp, str):
        from caikit_core.store import RunStore  # the run directory's layout

        folders.append(RunStore(run_dir).artifact_dir(EVAL_STAGE, fp))
    folders.append(run_dir / STANDALONE_FOLDER)
    for folder in folders:
        if folder.is_dir():
            for sub in sorted(folder.iterdir()):
                if (sub / RESULT_FILE).is_file():
                    found[sub.name] = sub
    return found


def format_estimate(estimate: Estimate) -> str:
    """``0.512 [0.470, 0.553] (90% bootstrap, n=438)``; ``0.5 (exact, n=4)``."""
    if estimate.method == "exact":
        return f"{estimate.value:.4g} (exact, n={estimate.n})"
    return (
        f"{estimate.value:.4g} [{estimate.low:.4g}, {estimate.high:.4g}] "
        f"({estimate.level:.0%} {estimate.method}, n={estimate.n})"
    )
