"""RUN_DIR/metrics.jsonl: one line per completed stage and per fit step, written by the
runner once per stage and fingerprint (a rerun that skips stages adds nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from caikit_core.config import load_run
from caikit_core.interfaces import FitReport
from caikit_core.plugins import get_registry
from caikit_core.runner import Runner
from caikit_core.stages import STAGES
from caikit_core.store import RunStore

HISTORY = [
    {"objective/scores": 1.0 + i, "objective/kl": 0.1 * i, "objective/entropy": 2.0 - 0.1 * i}
    for i in range(3)
]


def _run(path: Path) -> None:
    Runner(load_run(path, get_registry())).execute()


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def with_history(with_echo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The echo fixture's optimiser, reporting a three-step history as PPO would."""
    import caikit_echo.plugin as echo  # type: ignore[import-not-found]

    def optimise(self: Any, policy: str, *args: Any) -> FitReport:
        out = args[-1]
        (out / "config.json").write_text("{}")
        return FitReport(str(out), {"kl": 0.2, "reward": 3.0}, history=HISTORY)

    monkeypatch.setattr(echo.CopyOptimiser, "optimise", optimise)


def test_metrics_log_has_a_line_per_stage_and_per_step(echo_run: Path, with_history: None) -> None:
    _run(echo_run)
    out = echo_run.parent / "out"
    info = json.loads((out / "run.json").read_text())
    lines = _lines(out)
    stages = [x for x in lines if x["type"] == "stage"]
    # each stage once, in run order
    assert [x["stage"] for x in stages] == [n for n in STAGES if n in info["stages"]]
    assert len(stages) == len(info["stages"]) == 8
    store = RunStore(out)
    for x in stages:
        assert x["fingerprint"] == info["stages"][x["stage"]]
        manifest = store.read_manifest(x["stage"], x["fingerprint"])
        assert manifest is not None
        assert x["rows"] == manifest.rows
        assert x["seconds"] == manifest.timings["seconds"]
        assert x["metrics"] == manifest.metrics
        assert x["step"] is None
    assert {x["stage"]: x["rows"] for x in stages}["responses"] == 11
    steps = [x for x in lines if x["type"] == "step"]
    assert [(x["stage"], x["step"]) for x in steps] == [("policy", 0), ("policy", 1), ("policy", 2)]
    assert [x["metrics"] for x in steps] == HISTORY
    assert all(x["fingerprint"] == info["stages"]["policy"] for x in steps)
    # the step lines come just before their stage's line
    assert [x["type"] for x in lines[-4:]] == ["step", "step", "step", "stage"]
    assert {k: v for k, v in lines[-1].items() if k not in ("seconds", "finished_at")} == {
        "type": "stage",
        "stage": "policy",
        "fingerprint": info["stages"]["policy"],
        "kind": "fit",
        "rows": 0,
        "step": None,
        "metrics": {"kl": 0.2, "reward": 3.0},
    }


def test_rerun_adds_no_line_and_a_lost_log_is_rebuilt_from_the_manifests(
    echo_run: Path, with_history: None
) -> None:
    _run(echo_run)
    out = echo_run.parent / "out"
    first = (out / "metrics.jsonl").read_bytes()
    _run(echo_run)  # every stage skipped
    assert (out / "metrics.jsonl").read_bytes() == first
    # a process killed after a stage's manifest but before its lines: the rerun adds
    # exactly the missing stage's lines (and those of the stages after it), no others
    lines = first.decode().splitlines(keepends=True)
    policy_at = next(i for i, x in enumerate(lines) if json.loads(x)["stage"] == "policy")
    (out / "metrics.jsonl").write_text("".join(lines[:policy_at]) + '{"type": "st')  # torn
    _run(echo_run)
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert again[policy_at] == '{"type": "st'  # the torn line is left, never completed
    assert [json.loads(x) for x in again[policy_at + 1 :]] == [
        json.loads(x) for x in lines[policy_at:]
    ]
    (out / "metrics.jsonl").unlink()
    _run(echo_run)
    assert (out / "metrics.jsonl").read_bytes() == first
