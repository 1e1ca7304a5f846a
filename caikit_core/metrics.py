"""Metrics of a preference model against soft labels, shared by every PM backend.

For margins ``m = r_A - r_B`` and soft labels ``p = P(A preferred)``:

- ``loss``: mean cross-entropy between ``p`` and ``sigmoid(m)``;
- ``accuracy``: the share of non-tied labels (``p != 0.5``) whose side ``m`` picks;
- ``calibration``: expected calibration error of ``sigmoid(m)`` against ``p`` over
  :data:`CALIBRATION_BINS` equal-width bins;
- ``brier``: mean of ``(sigmoid(m) - p) ** 2``;
- ``examples``: the number of comparisons.

Computed in float64 with numpy (imported when called).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CALIBRATION_BINS", "preference_metrics"]

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
