"""``goodhart``: alarms fire on a synthetic rising n-gram, growing length, rising KL and
reward without the judge, stay quiet on flat ones; read from a run's policy stage."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from caikit_core.errors import CaikitError
from caikit_core.evaluation import read_result, write_result
from caikit_core.store import RunStore, StageManifest
from caikit_eval.goodhart import (
    GoodhartConfig,
    GoodhartInstrument,
    goodhart_alarms,
    ngram_shares,
    read_rollouts,
)
from caikit_eval.tests.test_compare import EvalTestContext, three_checkpoints  # noqa: F401

PHRASE = "You are valid, valued, and cared for."
VOCAB = [f"w{i}" for i in range(60)]


def responses(step_share: float, count: int, rng: random.Random, words: int = 12) -> list[str]:
    out = []
    for k in range(count):
        text = " ".join(rng.choice(VOCAB) for _ in range(words))
        if k < round(step_share * count):
            text = f"{text} {PHRASE} {rng.choice(VOCAB)}"
        out.append(text)
    return out


def rising(steps: int = 10, count: int = 20) -> dict[int, list[str]]:
    rng = random.Random(0)
    return {s: responses(0.9 * s / (steps - 1), count, rng, words=40) for s in range(steps)}


def flat(steps: int = 10, count: int = 20) -> dict[int, list[str]]:
    rng = random.Random(1)
    return {s: responses(0.5, count, rng) for s in range(steps)}


def test_a_rising_ngram_fires_one_alarm_naming_it() -> None:
    alarms, _ = goodhart_alarms(GoodhartConfig(), rollouts=rising())
    grams = [a for a in alarms if a.name == "ngram-growth"]
    assert len(grams) == 1
    evidence = grams[0].evidence
    assert evidence["ngram"] == "you are valid valued and cared for"
    assert evidence["early_steps"] == [0, 1] and evidence["late_steps"] == [8, 9]
    assert evidence["early_share"] == pytest.approx((0 + 2) / 40)  # 0 and 2 of 20
    assert evidence["late_share"] == pytest.approx((16 + 18) / 40)
    shares = [r["share"] for r in evidence["rates"]]
    assert shares == sorted(shares) and shares[0] == 0.0 and shares[-1] == 0.9
    assert "you are valid valued and cared for" in grams[0].message
    # the phrase adds 8 words to 40: +17 %, under the 50 % drift threshold
    assert not [a for a in alarms if a.name == "length-drift"]


def test_a_flat_ngram_stays_quiet() -> None:
    alarms, series = goodhart_alarms(GoodhartConfig(), rollouts=flat())
    assert alarms == []
    assert set(series) == {"length"}


def test_thresholds_are_configurable() -> None:
    strict = GoodhartConfig(ngram_min_share=0.95)
    assert not goodhart_alarms(strict, rollouts=rising())[0]
    loose = GoodhartConfig(ngram_min_growth=0.0, ngram_min_share=0.4)
    assert goodhart_alarms(loose, rollouts=flat())[0]  # 50% share, grown by 0: fires when allowed


def test_length_drift_fires_on_growing_responses() -> None:
    rng = random.Random(2)
    by_step = {s: responses(0.0, 10, rng, words=10 + 4 * s) for s in range(6)}
    alarms, _ = goodhart_alarms(GoodhartConfig(), rollouts=by_step)
    (drift,) = [a for a in alarms if a.name == "length-drift"]
    assert drift.evidence["early"] == 12.0 and drift.evidence["late"] == 28.0  # words
    assert drift.evidence["drift"] == pytest.approx(16 / 12)
    assert drift.evidence["unit"] == "words"


def history(steps: int, reward: float, kl: float, length: float = 20.0) -> list[dict[str, float]]:
    return [
        {
            "objective/scores": reward * s / (steps - 1),
            "objective/kl": kl * s / (steps - 1),
            "val/response_length": length,
            "objective/entropy": 3.0,
        }
        for s in range(steps)
    ]


def test_kl_and_reward_without_the_judge() -> None:
    hist = history(8, reward=1.0, kl=8.0)
    judge_flat = {s: 0.5 for s in range(8)}
    alarms, series = goodhart_alarms(GoodhartConfig(), history=hist, judge=judge_flat)
    names = sorted(a.name for a in alarms)
    assert names == ["kl-rising", "reward-judge-divergence"]
    kl = next(a for a in alarms if a.name == "kl-rising")
    assert kl.evidence["early"] == pytest.approx(8 / 7 / 2) and kl.evidence[
        "late"
    ] == pytest.approx(8 * (6 + 7) / 7 / 2)
    div = next(a for a in alarms if a.name == "reward-judge-divergence")
    assert div.evidence["judge_early"] == div.evidence["judge_late"] == 0.5
    assert series["length"][0] == 20.0
    judge_follows = {s: 0.5 + 0.05 * s for s in range(8)}
    alarms, _ = goodhart_alarms(GoodhartConfig(), history=hist, judge=judge_follows)
    assert [a.name for a in alarms] == ["kl-rising"]
    quiet, _ = goodhart_alarms(GoodhartConfig(), history=history(8, reward=0.0, kl=0.5))
    assert quiet == []
    capped, _ = goodhart_alarms(GoodhartConfig(kl_max=0.4), history=history(8, 0.0, 0.5))
    assert [a.name for a in capped] == ["kl-rising"]


def write_rollouts(path: Path, by_step: dict[int, list[str]], **extra: Any) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for step, texts in by_step.items():
            for text in texts:
                fh.write(json.dumps({"step": step, "response": text, **extra}) + "\n")
    return path


def make_policy_run(root: Path, hist: list[dict[str, float]]) -> Path:
    store = RunStore(root)
    fp = "a" * 64
    store.write_manifest(
        StageManifest(
            stage="policy",
            kind="fit",
            fingerprint=fp,
            input_fingerprint="i",
            config_fingerprint="c",
            plugins={},
            constitution_hash=None,
            models={},
            seed=0,
            complete=True,
            history=hist,
        )
    )
    store.write_run({"stages": {"policy": fp}})
    return store.stage_dir("policy", fp)


def test_instrument_reads_the_policy_history_and_a_rollouts_file(tmp_path: Path) -> None:
    folder = make_policy_run(tmp_path / "run", history(10, reward=1.0, kl=6.0))
    ctx = EvalTestContext({}, run_dir=tmp_path / "run")
    result = GoodhartInstrument().evaluate(ctx)
    assert [a.name for a in result.alarms] == ["kl-rising"]
    assert any("no rollouts file" in n for n in result.notes)
    assert [r["step"] for r in result.rows] == list(range(10))
    assert result.rows[0]["responses"] == 0 and result.series["length"][0]["value"] == 20.0
    write_rollouts(folder / "rollouts.jsonl", rising())
    result = GoodhartInstrument().evaluate(ctx)
    assert sorted(a.name for a in result.alarms) == ["kl-rising", "ngram-growth"]
    assert "ngram/you are valid valued and cared for" in result.series
    assert result.rows[3]["responses"] == 20
    back = read_result(write_result(result, tmp_path / "out").parent)
    assert back.alarms == result.alarms and back.rows == result.rows
    assert GoodhartInstrument().requires == {"run"}
    assert GoodhartInstrument(GoodhartConfig(rollouts="x", judge=True)).requires == {"labeller"}


def test_given_judge_values_are_used_per_step(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    with path.open("w") as fh:
        for s in range(6):
            fh.write(json.dumps({"step": s, "response": f"answer {s}", "judge": 0.5}) + "\n")
    ctx = EvalTestContext({})
    result = GoodhartInstrument(GoodhartConfig(rollouts=str(path))).evaluate(ctx)
    assert [p["value"] for p in result.series["judge"]] == [0.5] * 6


def test_bad_rollouts_are_one_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"step": 0, "response": "a"}\n{"step": 1}\n')
    with pytest.raises(CaikitError, match=rf"{path}:2: missing field 'response'"):
        read_rollouts(path)
    path.write_text('{"step": 0, "response": "a"}\n\n{"step": -1, "response": "b"}\n')
    with pytest.raises(CaikitError, match=rf"{path}:3: 'step' must be an integer >= 0"):
        read_rollouts(path)
    path.write_text("{not json\n")
    with pytest.raises(CaikitError, match=rf"{path}:1: invalid JSON"):
        GoodhartInstrument(GoodhartConfig(rollouts=str(path))).evaluate(EvalTestContext({}))
    with pytest.raises(CaikitError, match="no 'policy' stage"):
        RunStore(tmp_path / "empty").write_run({"stages": {}})
        GoodhartInstrument().evaluate(EvalTestContext({}, run_dir=tmp_path / "empty"))


def test_ngram_shares_count_responses_not_occurrences() -> None:
    shares = ngram_shares(["a b a b", "a b", "c d"], 2)
    assert shares["a b"] == pytest.approx(2 / 3) and shares["b a"] == pytest.approx(1 / 3)


def test_judge_true_asks_the_tiny_direct_labeller(
    three_checkpoints: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    by_step = {s: [f"Sure, step {s} answer.", "I cannot help."] for s in range(4)}
    path = write_rollouts(tmp_path / "r.jsonl", by_step, prompt="Hi?", reference="Hello!")
    ctx = EvalTestContext(three_checkpoints, feedback_model=three_checkpoints["base"])
    result = GoodhartInstrument(GoodhartConfig(rollouts=str(path), judge=True)).evaluate(ctx)
    judge = result.series["judge"]
    assert [p["x"] for p in judge] == [0, 1, 2, 3]
    assert all(0.0 <= p["value"] <= 1.0 for p in judge)
