"""What the pairwise instruments share: asking a labeller about each pair in both
option orders, a preference model's scores, and accuracies with intervals.

Each pair is labelled twice, in two separate ``label`` calls under the same
comparison id (so a labeller that samples principles by id uses the same one in
both): once with the preferred response shown first (``A``) and once shown second
(``B``). An order counts 1 when the labeller prefers the preferred response, 0 when
it prefers the other and 0.5 for a tie (``p == 0.5``); an item's accuracy is the
mean of its two orders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from caikit_core.errors import CaikitError
from caikit_core.evaluation import Estimate, bootstrap
from caikit_core.records import Comparison, Sample
from caikit_eval.data import PairItem

__all__ = ["credit", "label_both_orders", "mean", "pm_scores", "share_estimate"]


def credit(p: float) -> float:
    """1 above 0.5, 0 below, 0.5 for a tie."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def share_estimate(values: Sequence[float], settings: Any, seed: int) -> Estimate:
    """The mean of per-item values with a seeded percentile bootstrap interval."""
    return bootstrap(list(values), mean, rounds=settings.rounds, level=settings.level, seed=seed)


def _comparisons(items: Sequence[PairItem], preferred_first: bool) -> list[Comparison]:
    return [
        Comparison(
            id=item.id,
            prompt_id=item.id,
            messages=item.messages,
            response_a=item.preferred if preferred_first else item.other,
            response_b=item.other if preferred_first else item.preferred,
        )
        for item in items
    ]


def _label(labeller: Any, batch: list[Comparison], seed: int) -> list[Any]:
    labels = list(labeller.label(batch, seed=seed))
    if len(labels) != len(batch) or any(
        x.comparison_id != c.id for x, c in zip(labels, batch, strict=False)
    ):
        raise CaikitError(
            f"the labeller returned {len(labels)} labels for {len(batch)} comparisons, "
            "or labels for other comparisons"
        )
    for x in labels:
        if not (isinstance(x.p_a, float) and math.isfinite(x.p_a) and 0.0 <= x.p_a <= 1.0):
            raise CaikitError(
                f"the labeller returned p_a={x.p_a!r} for {x.comparison_id}, not in [0, 1]"
            )
    return labels


def label_both_orders(
    labeller: Any, items: Sequence[PairItem], *, seed: int, batch_size: int
) -> list[tuple[Any, Any]]:
    """Per item, the labels with the preferred response shown first and second."""
    out: list[tuple[Any, Any]] = []
    for start in range(0, len(items), batch_size):
        batch = list(items[start : start + batch_size])
        first = _label(labeller, _comparisons(batch, True), seed)
        second = _label(labeller, _comparisons(batch, False), seed)
        out.extend(zip(first, second, strict=True))
    return out


def pm_scores(pm: Any, items: Sequence[PairItem], batch_size: int) -> list[tuple[float, float]]:
    """Per item, the preference model's score of the preferred and the other response."""
    out: list[tuple[float, float]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        samples = [
            Sample(f"{item.id}:{which}", item.id, item.messages, text)
            for item in batch
            for which, text in (("preferred", item.preferred), ("other", item.other))
        ]
        scores = [float(s) for s in pm.score(samples)]
        if len(scores) != len(samples):
            raise CaikitError(
                f"the preference model returned {len(scores)} scores for {len(samples)} responses"
            )
        out.extend(zip(scores[0::2], scores[1::2], strict=True))
    return out
