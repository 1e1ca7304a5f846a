"""``position-bias``: the RLAIF paper's "% same position preferred" (Lee et al. 2023
report 18/21/56% for PaLM 2 L/S/XS): the share of pairs where the same *position*
wins in both option orders, with the labeller's debiasing off and on, and the
distribution of swap-consistency.

Each pair is labelled as (x, y) and as (y, x). With ``p1``, ``p2`` the labeller's
P(A) in the two orders, the same position wins in both when both are above 0.5
(A twice) or both below (B twice); a tie wins nothing. Swap-consistency is
``1 - |p1 - (1 - p2)|``: 1 when the two orders agree, 0 when the labeller answers
by position alone. The two variants are the run's labeller rebuilt with
``debias = false`` and ``debias = true`` (``ctx.labeller_with``); a labeller
without a ``debias`` setting, or a context that cannot rebuild it, is measured as
configured (``debias-as-configured``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from caikit_core.errors import CaikitError
from caikit_core.evaluation import EvalContext, EvalResult
from caikit_eval.config import PositionBiasConfig
from caikit_eval.data import HH_FILE, HHH_FILE, Pairs, data_file, read_hh_rlhf, read_hhh
from caikit_eval.pairwise import label_both_orders, mean, share_estimate

__all__ = ["PositionBias", "same_position", "swap_consistency"]

#: the RLAIF paper's (Lee et al. 2023) "% same position preferred" per PaLM 2 size
RLAIF_SAME_POSITION = {"PaLM 2 L": 0.18, "PaLM 2 S": 0.21, "PaLM 2 XS": 0.56}


def same_position(p1: float, p2: float) -> str:
    """``"A"`` or ``"B"`` when that position wins in both orders, else ``""``."""
    if p1 > 0.5 and p2 > 0.5:
        return "A"
    if p1 < 0.5 and p2 < 0.5:
        return "B"
    return ""


def swap_consistency(p1: float, p2: float) -> float:
    """1 when P(A) in one order is 1 - P(A) in the other, 0 for pure position."""
    return 1.0 - abs(p1 - (1.0 - p2))


def _variants(ctx: EvalContext) -> tuple[list[tuple[str, Any]], list[str]]:
    build = getattr(ctx, "labeller_with", None)
    if callable(build):
        try:
            return [("off", build(debias=False)), ("on", build(debias=True))], []
        except CaikitError as exc:
            note = (
                "measured as configured: the labeller cannot be rebuilt with debias off "
                f"and on ({exc})"
            )
            return [("as-configured", ctx.labeller())], [note]
    return [("as-configured", ctx.labeller())], [
        "measured as configured: the context cannot rebuild the labeller"
    ]


def _histogram(variant: str, values: Sequence[float], bins: int) -> list[dict[str, Any]]:
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int(v * bins)))] += 1
    return [
        {
            "debias": variant,
            "bin_low": i / bins,
            "bin_high": (i + 1) / bins,
            "count": c,
            "share": c / len(values),
        }
        for i, c in enumerate(counts)
    ]


class PositionBias:
    """Same-position preference with and without debiasing, and swap-consistency."""

    requires = frozenset({"labeller"})

    def __init__(self, config: PositionBiasConfig) -> None:
        self.config = config

    def _pairs(self) -> Pairs:
        if self.config.data == "hhh":
            return read_hhh(data_file(self.config.path, HHH_FILE), self.config.limit)
        return read_hh_rlhf(data_file(self.config.path, HH_FILE), self.config.limit)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        cfg = self.config
        pairs = self._pairs()
        variants, notes = _variants(ctx)
        rows: list[dict[str, Any]] = []
        metrics = {}
        table: list[dict[str, Any]] = []
        for variant, labeller in variants:
            labels = label_both_orders(
                labeller, pairs.items, seed=ctx.seed, batch_size=cfg.batch_size
            )
            mine = []
            for item, (first, second) in zip(pairs.items, labels, strict=True):
                p1, p2 = first.p_a, second.p_a
                won = same_position(p1, p2)
                mine.append(
                    {
                        "id": item.id,
                        "line": item.line,
                        "debias": variant,
                        "labeller": first.labeller,
                        "p_a_first": p1,
                        "p_a_second": p2,
                        "same_position": 1.0 if won else 0.0,
                        "position": won,
                        "swap_consistency": swap_consistency(p1, p2),
                        "labeller_swap_consistency": first.swap_consistency,
                    }
                )
            rows.extend(mine)
            metrics[f"same-position/debias-{variant}"] = share_estimate(
                [r["same_position"] for r in mine], cfg, ctx.seed
            )
            consistency = [r["swap_consistency"] for r in mine]
            metrics[f"swap-consistency/debias-{variant}"] = share_estimate(
                consistency, cfg, ctx.seed
            )
            table.extend(_histogram(variant, consistency, cfg.bins))
            own = [r["labeller_swap_consistency"] for r in mine]
            if all(isinstance(v, float) for v in own):  # the labeller asked both orders itself
                key = f"labeller-swap-consistency/debias-{variant}"
                metrics[key] = share_estimate(own, cfg, ctx.seed)
            a_share = mean([1.0 if r["position"] == "A" else 0.0 for r in mine])
            notes.append(f"debias {variant}: position A won both orders in {a_share:.1%} of pairs")
        notes.append(
            "RLAIF paper (Lee et al. 2023), % same position preferred: "
            + ", ".join(f"{k} {v:.0%}" for k, v in RLAIF_SAME_POSITION.items())
        )
        notes.insert(0, f"{len(pairs.items)} pairs from {pairs.path}, each labelled in both orders")
        if pairs.skipped:
            notes.append(f"skipped {len(pairs.skipped)} malformed pairs")
        return EvalResult(
            "position-bias",
            metrics=metrics,
            tables={"swap-consistency": table},
            rows=rows,
            notes=notes,
        )
