"""``hh-alignment``: the RLAIF paper's "AI labeler alignment" on hh-rlhf harmless-base
test: the share of pairs where the labeller prefers the human-chosen response."""

from __future__ import annotations

from caikit_core.evaluation import EvalContext, EvalResult
from caikit_eval.accuracy import agreement
from caikit_eval.config import HHAlignmentConfig
from caikit_eval.data import HH_FILE, data_file, read_hh_rlhf

__all__ = ["HHAlignment"]


class HHAlignment:
    """Share of hh-rlhf harmless-base test pairs where the labeller prefers the human's choice."""

    requires = frozenset({"labeller"})

    def __init__(self, config: HHAlignmentConfig) -> None:
        self.config = config

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        pairs = read_hh_rlhf(data_file(self.config.path, HH_FILE), self.config.limit)
        return agreement("hh-alignment", pairs, ctx, self.config, with_pm=False)
