"""Bradley-Terry / Elo math on synthetic battles whose answers are known."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from caikit_core.errors import CaikitError
from caikit_eval.ratings import (
    Battle,
    bootstrap_ratings,
    bradley_terry,
    elo_ratings,
    expected_score,
    percentile,
    wilson,
    win_matrix,
)


def exact_battles(strengths: dict[str, float], scale: int = 1000) -> list[Battle]:
    """Battles whose win shares are exactly s_i / (s_i + s_j) (rounded to 1/scale)."""
    out: list[Battle] = []
    for a, b in itertools.combinations(strengths, 2):
        p = strengths[a] / (strengths[a] + strengths[b])
        wins = round(p * scale)
        out += [(f"{a}{b}{k}", a, b, 1.0 if k < wins else 0.0) for k in range(scale)]
    return out


def test_bradley_terry_recovers_known_strengths_from_a_synthetic_win_matrix() -> None:
    truth = {"base": 1.0, "sl": 2.0, "rl": 4.0, "other": 0.5}
    fitted = bradley_terry(exact_battles(truth), prior=0.0)
    geo = math.prod(truth.values()) ** (1 / len(truth))
    for model, s in truth.items():
        assert fitted[model] == pytest.approx(s / geo, rel=2e-3)


def test_elo_scale_anchor_and_expected_score() -> None:
    ratings = elo_ratings({"a": 1.0, "b": 10.0}, anchor="a")
    assert ratings == {"a": 1000.0, "b": 1400.0}
    assert expected_score(1400.0, 1000.0) == pytest.approx(10 / 11)
    centred = elo_ratings({"a": 1.0, "b": 100.0})
    assert centred["a"] == pytest.approx(600.0) and centred["b"] == pytest.approx(1400.0)


def test_recovered_elo_gaps_match_sampled_battles() -> None:
    rng = random.Random(7)
    truth = {"base": 1000.0, "sl": 1100.0, "rl": 1250.0}
    battles: list[Battle] = []
    for prompt in range(2000):
        for a, b in itertools.combinations(truth, 2):
            p = expected_score(truth[a], truth[b])
            battles.append((f"p{prompt}", a, b, 1.0 if rng.random() < p else 0.0))
    est = bootstrap_ratings(battles, rounds=100, seed=1, anchor="base")
    assert est["base"].value == pytest.approx(1000.0)
    for model, rating in truth.items():
        assert abs(est[model].value - rating) < 40  # ~4 standard errors
        assert est[model].low <= est[model].value <= est[model].high
    assert est["rl"].low > est["sl"].high  # the 150-point gap is resolved
    assert est["sl"].n == len(battles) and est["sl"].level == 0.9


def test_bootstrap_intervals_contain_the_point_estimate_and_are_seeded() -> None:
    battles: list[Battle] = [
        ("p1", "a", "b", 1.0),
        ("p2", "a", "b", 0.5),
        ("p3", "b", "a", 1.0),
        ("p4", "a", "b", 1.0),
    ]
    first = bootstrap_ratings(battles, rounds=50, seed=3)
    again = bootstrap_ratings(battles, rounds=50, seed=3)
    assert first == again
    for est in first.values():
        assert est.low <= est.value <= est.high


def test_prior_keeps_an_undefeated_model_finite() -> None:
    battles: list[Battle] = [(f"p{i}", "a", "b", 1.0) for i in range(10)]
    s = bradley_terry(battles, prior=0.1)
    # 10.1 wins vs 0.1 wins in 10.2 games: s_a / s_b = 101
    assert s["a"] / s["b"] == pytest.approx(101.0, rel=1e-6)


def test_win_matrix_counts_ties_as_half() -> None:
    battles: list[Battle] = [
        ("p1", "a", "b", 1.0),
        ("p2", "a", "b", 0.5),
        ("p3", "b", "a", 1.0),
        ("p4", "a", "b", 1.0),
    ]
    rows = {(r["model"], r["opponent"]): r for r in win_matrix(battles)}
    assert rows[("a", "b")] == {
        "model": "a",
        "opponent": "b",
        "wins": 2,
        "ties": 1,
        "losses": 1,
        "battles": 4,
        "win_rate": 0.625,
    }
    assert rows[("b", "a")]["win_rate"] == 0.375


def test_wilson_matches_the_textbook_value() -> None:
    est = wilson(8, 10, level=0.95)
    # Wilson 95% for 8/10: [0.4902, 0.9433]
    assert est.low == pytest.approx(0.4902, abs=1e-4)
    assert est.high == pytest.approx(0.9433, abs=1e-4)
    assert est.value == 0.8 and est.method == "wilson"
    zero = wilson(0, 5)
    assert zero.low == 0.0 and zero.value == 0.0 and zero.high > 0


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.05) == pytest.approx(1.15)
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)


@pytest.mark.parametrize(
    "battles",
    [[("p", "a", "a", 1.0)], [("p", "a", "b", 1.5)]],
)
def test_bad_battles_are_refused(battles: list[Battle]) -> None:
    with pytest.raises(CaikitError, match="battle 'p'"):
        bradley_terry(battles)


def test_wilson_refuses_empty() -> None:
    with pytest.raises(CaikitError, match="n > 0"):
        wilson(0, 0)
