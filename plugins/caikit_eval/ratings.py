"""Ratings from pairwise battles: Bradley-Terry strengths on the Elo scale, win-rate
matrices, bootstrap intervals over groups of battles, and Wilson intervals.

Pure Python (no numpy needed); every function is deterministic, and the bootstrap
is seeded.

A *battle* is ``(group, model_a, model_b, outcome)`` with ``outcome`` the score of
``model_a``: 1 (a wins), 0 (b wins) or 0.5 (a tie). ``group`` is what the bootstrap
resamples (the prompt: Arena-Hard resamples prompts, so the interval says how much
the ratings depend on which prompts were asked).

The Bradley-Terry model: ``P(i beats j) = s_i / (s_i + s_j)``; a tie counts as half
a win for each side (as Chatbot Arena and Arena-Hard count ties). The strengths are
fitted by Hunter's (2004) minorise-maximise iteration

    s_i <- W_i / sum_j n_ij / (s_i + s_j)

where ``W_i`` is i's total score and ``n_ij`` the battles between i and j, each
ordered pair of models given ``prior`` virtual ties so that a model that won (or
lost) every battle still gets a finite strength. On the Elo scale
``rating_i = base + scale * log10(s_i / s_anchor)``: with ``scale = 400`` a
100-point gap means ``P(win) = 1 / (1 + 10 ** (-100 / 400)) = 0.64``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from caikit_core.errors import CaikitError
from caikit_core.evaluation import Estimate

__all__ = [
    "ELO_BASE",
    "ELO_SCALE",
    "Battle",
    "bootstrap_ratings",
    "bradley_terry",
    "elo_ratings",
    "expected_score",
    "percentile",
    "wilson",
    "win_matrix",
]

ELO_BASE = 1000.0
ELO_SCALE = 400.0

#: (group, model_a, model_b, score of model_a: 1, 0.5 or 0)
Battle = tuple[str, str, str, float]


def _models_of(battles: Sequence[Battle], models: Sequence[str] | None) -> list[str]:
    if models is not None:
        return list(models)
    seen: dict[str, None] = {}
    for _, a, b, _ in battles:
        seen.setdefault(a)
        seen.setdefault(b)
    return list(seen)


def bradley_terry(
    battles: Sequence[Battle],
    models: Sequence[str] | None = None,
    *,
    prior: float = 0.1,
    iterations: int = 2000,
    tolerance: float = 1e-10,
) -> dict[str, float]:
    """Bradley-Terry strengths ``s_i`` (geometric mean 1) fitted to ``battles``.

    :param models: the models to rate (default: those in the battles, in order of
        appearance); a model in no battle gets strength 1.
    :param prior: virtual ties per ordered pair of models (> 0 keeps every strength
        finite; 0 is the plain maximum-likelihood fit, which needs every model to
        have won and lost at least once).
    :raises CaikitError: a battle names a model outside ``models``, an outcome is not
        in [0, 1], or ``prior`` is negative.
    """
    names = _models_of(battles, models)
    index = {m: i for i, m in enumerate(names)}
    k = len(names)
    if prior < 0:
        raise CaikitError(f"bradley_terry: prior must be >= 0, found {prior}")
    wins = [0.0] * k
    games = [[0.0] * k for _ in range(k)]
    for group, a, b, outcome in battles:
        if a not in index or b not in index:
            raise CaikitError(f"bradley_terry: battle {group!r} names a model not rated: {a}, {b}")
        if not 0.0 <= outcome <= 1.0 or a == b:
            raise CaikitError(
                f"bradley_terry: battle {group!r} ({a} vs {b}) has outcome {outcome}; "
                "expected a score in [0, 1] between two different models"
            )
        i, j = index[a], index[b]
        wins[i] += outcome
        wins[j] += 1.0 - outcome
        games[i][j] += 1.0
        games[j][i] += 1.0
    for i in range(k):
        for j in range(k):
            if i != j and prior:
                # prior virtual ties per ordered pair: prior wins each way, 2 * prior games
                games[i][j] += 2.0 * prior
                wins[i] += prior
    strengths = [1.0] * k
    for _ in range(iterations):
        new = []
        for i in range(k):
            denom = sum(games[i][j] / (strengths[i] + strengths[j]) for j in range(k) if j != i)
            new.append(wins[i] / denom if denom > 0 and wins[i] > 0 else strengths[i])
        log_mean = math.fsum(math.log(max(s, 1e-300)) for s in new) / k if k else 0.0
        new = [s / math.exp(log_mean) for s in new]
        change = max((abs(a - b) for a, b in zip(new, strengths, strict=True)), default=0.0)
        strengths = new
        if change < tolerance:
            break
    return {m: strengths[index[m]] for m in names}


def elo_ratings(
    strengths: Mapping[str, float],
    *,
    anchor: str | None = None,
    base: float = ELO_BASE,
    scale: float = ELO_SCALE,
) -> dict[str, float]:
    """Strengths on the Elo scale: ``base + scale * log10(s / s_anchor)``; without an
    anchor, relative to the geometric mean of the strengths (their mean rating is
    ``base``)."""
    if anchor is not None and anchor not in strengths:
        raise CaikitError(f"elo_ratings: anchor {anchor!r} is not among {sorted(strengths)}")
    if anchor is not None:
        ref = math.log10(strengths[anchor])
    else:
        ref = math.fsum(math.log10(s) for s in strengths.values()) / max(len(strengths), 1)
    return {m: base + scale * (math.log10(s) - ref) for m, s in strengths.items()}


def expected_score(rating_a: float, rating_b: float, *, scale: float = ELO_SCALE) -> float:
    """``P(a beats b)`` for two Elo ratings: ``1 / (1 + 10 ** ((r_b - r_a) / scale))``."""
    return 1.0 / (1.0 + math.pow(10.0, (rating_b - rating_a) / scale))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of sorted values, linearly interpolated (numpy's
    default ``linear`` method)."""
    if not sorted_values:
        raise CaikitError("percentile: no values")
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_ratings(
    battles: Sequence[Battle],
    models: Sequence[str] | None = None,
    *,
    rounds: int = 100,
    level: float = 0.9,
    seed: int = 0,
    anchor: str | None = None,
    prior: float = 0.1,
) -> dict[str, Estimate]:
    """Elo ratings with percentile-bootstrap intervals over battle *groups*.

    Each round draws as many groups as there are, with replacement, takes all the
    battles of the drawn groups, and refits. The interval is the ``(1 - level) / 2``
    and ``(1 + level) / 2`` quantiles of the refitted ratings (Arena-Hard: 100 rounds,
    5th-95th percentile, i.e. ``level = 0.9``), widened to contain the point estimate.
    ``n`` is the number of battles.
    """
    names = _models_of(battles, models)
    if not battles:
        raise CaikitError("bootstrap_ratings: no battles to rate from")
    point = elo_ratings(bradley_terry(battles, names, prior=prior), anchor=anchor)
    by_group: dict[str, list[Battle]] = {}
    for battle in battles:
        by_group.setdefault(battle[0], []).append(battle)
    groups = list(by_group)
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {m: [] for m in names}
    for _ in range(rounds):
        sample: list[Battle] = []
        for _ in groups:
            sample.extend(by_group[groups[rng.randrange(len(groups))]])
        ratings = elo_ratings(bradley_terry(sample, names, prior=prior), anchor=anchor)
        for m in names:
            draws[m].append(ratings[m])
    tail = (1.0 - level) / 2.0
    out: dict[str, Estimate] = {}
    for m in names:
        values = sorted(draws[m])
        low = percentile(values, tail) if values else point[m]
        high = percentile(values, 1.0 - tail) if values else point[m]
        out[m] = Estimate(
            point[m], min(low, point[m]), max(high, point[m]), len(battles), level=level
        )
    return out


def win_matrix(
    battles: Sequence[Battle], models: Sequence[str] | None = None
) -> list[dict[str, float | int | str]]:
    """One row per ordered pair ``(model, opponent)``: ``wins``, ``ties``, ``losses``,
    ``battles`` and ``win_rate = (wins + ties / 2) / battles`` of ``model`` against
    ``opponent`` (``nan``-free: a pair that never met is left out)."""
    names = _models_of(battles, models)
    counts: dict[tuple[str, str], list[int]] = {}
    for _, a, b, outcome in battles:
        for me, other, score in ((a, b, outcome), (b, a, 1.0 - outcome)):
            row = counts.setdefault((me, other), [0, 0, 0])
            row[0 if score == 1.0 else 1 if score == 0.5 else 2] += 1
    rows: list[dict[str, float | int | str]] = []
    for me in names:
        for other in names:
            if (me, other) not in counts:
                continue
            w, t, lo = counts[(me, other)]
            n = w + t + lo
            rows.append(
                {
                    "model": me,
                    "opponent": other,
                    "wins": w,
                    "ties": t,
                    "losses": lo,
                    "battles": n,
                    "win_rate": (w + t / 2.0) / n,
                }
            )
    return rows


def wilson(successes: int, n: int, *, level: float = 0.9) -> Estimate:
    """The share ``successes / n`` with its Wilson score interval at ``level``.

    :raises CaikitError: ``n`` is 0, or ``successes`` is outside ``[0, n]``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise CaikitError(f"wilson: expected 0 <= successes <= n and n > 0, found {successes}/{n}")
    z = _normal_quantile(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(
        p,
        max(0.0, min(p, centre - half)),
        min(1.0, max(p, centre + half)),
        n,
        level=level,
        method="wilson",
    )


def _normal_quantile(q: float) -> float:
    """The standard normal quantile by bisection on ``erf`` (exact to ~1e-12)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0
