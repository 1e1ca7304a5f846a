"""``revision-curve``: scores per revision index of traces read from a real run directory."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from caikit_core.errors import CaikitError
from caikit_core.evaluation import read_result, write_result
from caikit_core.records import RevisionStep, RevisionTrace, Sample, conversation, to_arrow
from caikit_core.store import RunStore, ShardInfo, StageManifest
from caikit_eval.revision_curve import (
    RevisionCurveConfig,
    RevisionCurveInstrument,
    curve,
    revision_samples,
)
from caikit_eval.tests.test_compare import EvalTestContext


def trace(i: int, texts: Sequence[str], skipped: str | None = None) -> RevisionTrace:
    steps = tuple(
        RevisionStep(k + 1, f"principle-{k}", "critique?", "critique", "revise?", text)
        for k, text in enumerate(texts[1:])
    )
    return RevisionTrace(
        id=f"t{i}",
        prompt_id=f"p{i}",
        messages=conversation(("user", f"prompt {i}")),
        initial_response=texts[0],
        steps=steps,
        final_response=texts[-1],
        skipped_reason=skipped,
    )


TRACES = [
    trace(0, ["rude", "kind", "kind kind"]),
    trace(1, ["no", "kind", "kind"]),
    trace(2, ["kind", "kind kind", "kind kind kind"]),
    trace(3, ["meh", "kind kind"]),  # one revision only
    trace(4, ["x", "kind"], skipped="prompt too long"),
]


class KindnessModel:
    """Scores a response by how often it says "kind"."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.calls = 0

    def score(self, samples: Sequence[Sample]) -> list[float]:
        self.calls += 1
        return [float(s.response.split().count("kind")) for s in samples]


def make_run(root: Path, traces: Sequence[RevisionTrace], *, complete: bool = True) -> Path:
    store = RunStore(root)
    fp = "f" * 64
    name = store.write_shard("revisions", fp, 0, to_arrow(list(traces), RevisionTrace))
    store.write_manifest(
        StageManifest(
            stage="revisions",
            kind="map",
            fingerprint=fp,
            input_fingerprint="i",
            config_fingerprint="c",
            plugins={},
            constitution_hash=None,
            models={},
            seed=0,
            record_type="RevisionTrace",
            total_shards=1,
            shards=[ShardInfo(0, name, len(traces), len(traces), 0.0)] if complete else [],
            complete=complete,
            rows=len(traces),
        )
    )
    store.write_run({"stages": {"revisions": fp}})
    return root


def test_revision_curve_means_per_index_from_a_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", TRACES)
    pm = KindnessModel()
    ctx = EvalTestContext({}, run_dir=run, preference=pm, seed=1)
    result = RevisionCurveInstrument(RevisionCurveConfig(rounds=200)).evaluate(ctx)
    series = result.series["revision-curve"]
    assert [p["x"] for p in series] == [0, 1, 2]
    # by hand: index 0 -> 0,0,1,0; index 1 -> 1,1,2,2; index 2 -> 2,1,3 (trace 3 stops)
    assert [p["value"] for p in series] == [0.25, 1.5, 2.0]
    assert [p["n"] for p in series] == [4, 4, 3]
    for point in series:
        assert point["low"] <= point["value"] <= point["high"]
    assert result.metrics["gain/1"].value == pytest.approx(1.25)  # 1, 1, 1, 2
    assert result.metrics["gain/2"].value == pytest.approx(5 / 3)  # 2, 1, 2
    assert pm.calls == 1 and len(result.rows) == 4 + 3 + 3 + 3 - 2  # 11 samples
    assert {r["principle_id"] for r in result.rows if r["revision"] == 2} == {"principle-1"}
    assert any("1 traces skipped" in n for n in result.notes)
    back = read_result(write_result(result, tmp_path / "out").parent)
    assert back.series == {"revision-curve": series}


def test_curve_is_seeded_and_intervals_contain_the_mean() -> None:
    triples = [(f"t{i}", k, math.sin(i + k) + k) for i in range(20) for k in range(3)]
    first = curve(triples, rounds=100, seed=3)
    assert first == curve(triples, rounds=100, seed=3)
    for est in first[1].values():
        assert est.low <= est.value <= est.high


def test_revision_samples_skip_skipped_traces() -> None:
    items = revision_samples(TRACES)
    assert {t.id for t, _, _ in items} == {"t0", "t1", "t2", "t3"}
    assert items[0][2].response == "rude" and items[0][1] == 0


def test_no_run_dir_or_an_unfinished_stage_is_one_clear_error(tmp_path: Path) -> None:
    instrument = RevisionCurveInstrument()
    with pytest.raises(CaikitError, match="needs a run directory"):
        instrument.evaluate(EvalTestContext({}, preference=KindnessModel()))
    run = make_run(tmp_path / "run", TRACES, complete=False)
    with pytest.raises(CaikitError, match="incomplete"):
        instrument.evaluate(EvalTestContext({}, run_dir=run, preference=KindnessModel()))
    with pytest.raises(CaikitError, match="not a caikit run directory"):
        instrument.evaluate(EvalTestContext({}, run_dir=tmp_path, preference=KindnessModel()))
    only_skipped = make_run(tmp_path / "skipped", TRACES[4:])
    with pytest.raises(CaikitError, match="no traces to score"):
        instrument.evaluate(EvalTestContext({}, run_dir=only_skipped, preference=KindnessModel()))
