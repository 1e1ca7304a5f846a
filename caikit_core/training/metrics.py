"""Metrics of a preference model against soft labels, shared by every PM backend.

For margins ``m = r_A - r_B`` and soft labels ``p = P(A preferred)``:

- ``loss``: mean cross-entropy between ``p`` and ``sigmoid(m)``;
- ``accuracy``: the share of non-tied labels (``p != 0.5``) whose side ``m`` picks;
- ``calibration``: expected calibration error of ``sigmoid(m)`` against ``p`` over
  :data:`CALIBRATION_BINS` equal-width bins;
- ``brier``: mean of ``(sigmoid(m) - p) ** 2``;
- ``examples``: the number of comparisons.

Computed in float64 with numpy (imported when called). The helpers below are what
every preference-model backend shares: label validation, the held-out split, and the
metrics of a model's scores on labelled comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from caikit_core.errors import CaikitError
from caikit_core.records import LabelledComparison, Sample, stable_id

__all__ = [
    "CALIBRATION_BINS",
    "check_soft_labels",
    "checked_scores",
    "comparison_metrics",
    "held_out_split",
    "preference_metrics",
]

#: Equal-width bins of ``sigmoid(r_A - r_B)`` for the ``calibration`` metric.
CALIBRATION_BINS = 5


def preference_metrics(margins: Sequence[float], p_a: Sequence[float]) -> dict[str, float]:
    """``loss``, ``accuracy``, ``calibration``, ``brier`` and ``examples`` (see the module).

    :param margins: ``r_A - r_B`` per comparison.
    :param p_a: the soft label of each comparison.
    :returns: the metrics; ``accuracy`` is left out when every label is a tie, and
        everything but ``examples`` when there are no comparisons.
    """
    import numpy as np

    if len(margins) != len(p_a):
        raise ValueError(f"{len(margins)} margins for {len(p_a)} labels")
    n = len(margins)
    out: dict[str, float] = {"examples": float(n)}
    if not n:
        return out
    m = np.asarray(margins, dtype=np.float64)
    p = np.asarray(p_a, dtype=np.float64)
    q = 1.0 / (1.0 + np.exp(-m))
    # -(p log sigmoid(m) + (1 - p) log sigmoid(-m)), with log sigmoid(x) = -log1p(exp(-x))
    log_q = -np.logaddexp(0.0, -m)
    log_not_q = -np.logaddexp(0.0, m)
    out["loss"] = float(np.mean(-(p * log_q + (1.0 - p) * log_not_q)))
    decided = p != 0.5
    if bool(decided.any()):
        right = (m > 0) == (p > 0.5)
        out["accuracy"] = float(right[decided].mean())
    bins = np.minimum((q * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    ece = 0.0
    for b in range(CALIBRATION_BINS):
        inside = bins == b
        if bool(inside.any()):
            ece += float(inside.mean()) * abs(float(q[inside].mean() - p[inside].mean()))
    out["calibration"] = ece
    out["brier"] = float(np.mean((q - p) ** 2))
    return out


def check_soft_labels(labelled: Sequence[LabelledComparison], who: str) -> None:
    """Refuse labels outside [0, 1], naming up to five comparisons.

    :raises CaikitError: ``who`` and the offending comparison ids and labels.
    """
    outside = [
        f"{lc.comparison.id} (p_a={lc.label.p_a!r})"
        for lc in labelled
        if lc.label.p_a < 0.0 or lc.label.p_a > 1.0
    ]
    if outside:
        raise CaikitError(
            f"{who}: labels must be probabilities in [0, 1]; found "
            + ", ".join(outside[:5])
            + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        )


def held_out_split(
    labelled: Sequence[LabelledComparison], fraction: float, seed: int
) -> tuple[list[LabelledComparison], list[LabelledComparison]]:
    """Training and held-out comparisons: a comparison is held out when a hash of
    ``(seed, comparison id)`` falls below ``fraction``, so the split does not depend on
    the order or the number of comparisons."""
    if fraction <= 0.0:
        return list(labelled), []
    train: list[LabelledComparison] = []
    held: list[LabelledComparison] = []
    for lc in labelled:
        draw = int(stable_id("pm-eval", seed, lc.comparison.id), 16) / 16**16
        (held if draw < fraction else train).append(lc)
    return train, held


def comparison_metrics(
    score: Callable[[list[Sample]], list[float]],
    labelled: Sequence[LabelledComparison],
    prefix: str = "",
) -> dict[str, float]:
    """:func:`preference_metrics` of a preference model's ``score`` on ``labelled``,
    each key prefixed with ``prefix`` (e.g. ``"eval_"``)."""

    def sample(lc: LabelledComparison, response: str) -> Sample:
        c = lc.comparison
        return Sample(stable_id("pm", c.id, response), c.prompt_id, c.messages, response)

    samples_a = [sample(lc, lc.comparison.response_a) for lc in labelled]
    samples_b = [sample(lc, lc.comparison.response_b) for lc in labelled]
    scores = score(samples_a + samples_b)
    n = len(labelled)
    margins = [scores[i] - scores[n + i] for i in range(n)]
    found = preference_metrics(margins, [lc.label.p_a for lc in labelled])
    return {f"{prefix}{k}": v for k, v in found.items()}


def checked_scores(
    reward: Callable[[list[Sample]], list[float]], samples: list[Sample], who: str
) -> list[float]:
    """``reward(samples)`` as floats, refusing a wrong count or a non-finite score.

    :raises CaikitError: ``who``, and the ids of up to five samples with non-finite scores.
    """
    scores = [float(x) for x in reward(samples)]
    if len(scores) != len(samples):
        raise CaikitError(
            f"{who}: the preference model returned {len(scores)} scores for "
            f"{len(samples)} responses"
        )
    bad = [s.id for s, x in zip(samples, scores, strict=True) if not math.isfinite(x)]
    if bad:
        raise CaikitError(
            f"{who}: the preference model returned non-finite scores for samples "
            + ", ".join(bad[:5])
        )
    return scores
