"""The report tests' run directory: a real run of the caikit-echo fixture plugins (its
optimiser patched to report a PPO-like history, as the torch one does), plus
evaluation results written with :func:`caikit_core.evaluation.write_result`: a
``compare`` and an ``evasiveness`` result under the run's eval stage and an ``hhh``
one elsewhere (for ``--eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from caikit_core import plugins
from caikit_core.cli import main
from caikit_core.evaluation import Alarm, Estimate, EvalResult, write_result
from caikit_core.interfaces import FitReport
from caikit_core.store import RunStore

#: the eval stage's fingerprint recorded in the test run's run.json
EVAL_FP = "0123456789abcdef" * 4

HISTORY = [
    {
        "objective/scores": 1.0 + 0.5 * i,
        "objective/kl": 0.05 * i,
        "objective/entropy": 3.0 - 0.2 * i,
        "val/response_length": 20.0 + i,
    }
    for i in range(5)
]

COMPARE = EvalResult(
    instrument="compare",
    metrics={"win_rate/rl_vs_sl": Estimate(0.62, 0.55, 0.69, 200)},
    tables={
        "elo": [
            {"model": "sl", "rating": 1000.0, "low": 980.0, "high": 1020.0},
            {"model": "base", "rating": 950.0, "low": 930.0, "high": 970.0},
            {"model": "rl", "rating": 1050.0, "low": 1030.0, "high": 1070.0},
        ],
        "win_rates": [
            {"model": a, "opponent": b, "win_rate": w}
            for a, b, w in [
                ("rl", "sl", 0.62),
                ("sl", "rl", 0.38),
                ("rl", "base", 0.8),
                ("base", "rl", 0.2),
                ("sl", "base", 0.7),
                ("base", "sl", 0.3),
            ]
        ],
    },
)

EVASIVENESS = EvalResult(
    instrument="evasiveness",
    metrics={
        f"refusal_rate/{split}/{ckpt}": Estimate(v, max(0.0, v - 0.1), min(1.0, v + 0.1), 50)
        for (split, ckpt), v in {
            ("safe", "base"): 0.05,
            ("unsafe", "base"): 0.3,
            ("safe", "rl"): 0.4,
            ("unsafe", "rl"): 0.9,
        }.items()
    },
    alarms=[
        Alarm("over-refusal", "rl refuses 40% of safe prompts", {"checkpoint": "rl", "rate": 0.4})
    ],
)

HHH = EvalResult(
    instrument="hhh",
    metrics={
        "accuracy/direct": Estimate(0.51, 0.47, 0.55, 438),
        "accuracy/cot": Estimate(0.58, 0.54, 0.62, 438),
    },
    series={
        "revision-curve": [
            {"x": i, "value": 0.1 * i, "low": 0.1 * i - 0.05, "high": 0.1 * i + 0.05, "n": 40}
            for i in range(4)
        ]
    },
    tables={"per-category": [{"category": "harmless", "accuracy": 0.6, "n": 58}]},
    rows=[{"id": f"q{i}", "correct": i % 2 == 0} for i in range(6)],
    notes=["a synthetic result for the report tests"],
)


@pytest.fixture
def report_run(echo_run: Path, with_echo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The run directory of a finished echo run with two results under its eval stage;
    the ``hhh`` result is in ``<tmp>/hhh-result`` beside it."""
    import caikit_echo.plugin as echo  # type: ignore[import-not-found]

    def optimise(self: Any, policy: str, *args: Any) -> FitReport:
        out = args[-1]
        (out / "config.json").write_text("{}")
        return FitReport(str(out), {"kl": 0.2, "reward": 3.0}, history=HISTORY)

    monkeypatch.setattr(echo.CopyOptimiser, "optimise", optimise)
    assert main(["-q", "run", str(echo_run), "--show-traces", "0"]) == 0
    run_dir = echo_run.parent / "out"
    # as the eval stage leaves them: one folder per instrument in its artifact folder
    store = RunStore(run_dir)
    info = store.read_run()
    info["stages"]["eval"] = EVAL_FP
    store.write_run(info)
    stage = store.artifact_dir("eval", EVAL_FP)
    write_result(COMPARE, stage / "compare")
    write_result(EVASIVENESS, stage / "evasiveness")
    write_result(HHH, echo_run.parent / "hhh-result")
    return run_dir


@pytest.fixture
def with_report_plugin() -> None:
    """The report plugin registered as the bundled entry point would register it (an
    environment installed before the plugin existed has no ``report`` entry point)."""
    import caikit_report.plugin

    manager = plugins.get_plugin_manager()
    if "report" not in manager.plugin_origins():
        manager.register(caikit_report.plugin, "report", distribution="caikit", version="0.1.0")
