"""``hhh``: labeller (and preference model) accuracy on the 438 HHH comparisons, each
asked in both option orders (the CAI paper's Fig. 4 instrument)."""

from __future__ import annotations

from caikit_core.evaluation import EvalContext, EvalResult
from caikit_eval.accuracy import agreement
from caikit_eval.config import HHHConfig
from caikit_eval.data import HHH_FILE, data_file, read_hhh

__all__ = ["HHHAccuracy"]


class HHHAccuracy:
    """Labeller accuracy on the 438 HHH comparisons (the CAI paper's Fig. 4)."""

    def __init__(self, config: HHHConfig) -> None:
        self.config = config
        self.requires = frozenset(
            {"labeller"} | ({"preference_model"} if config.preference_model else set())
        )

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        pairs = read_hhh(data_file(self.config.path, HHH_FILE), self.config.limit)
        return agreement("hhh", pairs, ctx, self.config, with_pm=self.config.preference_model)
