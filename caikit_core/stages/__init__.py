"""The SL-CAI and RL-CAI stages, one module each, in run order::

    prompts -+- responses -- revisions -- (helpfulness) -- sft -+  (SFT checkpoint = RL policy)
             |                                                 v
             +---------------------------------------------- pairs -- labels -- preference_model
                                                                                        |
                                                                                      policy
    (every stage that ran) -- eval                         (only with an [eval] table)

A run file's ``phases`` (and ``sl.sft``, ``sl.helpfulness_prompts``,
``rl.train_policy``) pick which run; :func:`stage_names` says which.
Adding a stage: a module here, one line in :data:`STAGES`, a row in
``docs/architecture.md``'s stage table and a ``test_stage_<name>_...`` test in
``tests/test_stages.py`` (``tests/test_stages.py`` fails without them).
"""

from __future__ import annotations

from caikit_core.config import RunConfig
from caikit_core.stages.base import Context, Stage, StageResult, WorkerSpec
from caikit_core.stages.eval import Eval
from caikit_core.stages.helpfulness import Helpfulness
from caikit_core.stages.labels import Labels
from caikit_core.stages.pairs import Pairs
from caikit_core.stages.policy import Policy
from caikit_core.stages.preference_model import PreferenceModelStage
from caikit_core.stages.prompts import Prompts
from caikit_core.stages.responses import Responses
from caikit_core.stages.revisions import Revisions
from caikit_core.stages.sft import SFT

__all__ = ["STAGES", "Context", "Stage", "StageResult", "WorkerSpec", "stage_names"]

#: every stage, in run order
STAGES: dict[str, type[Stage]] = {
    s.name: s
    for s in (
        Prompts,
        Responses,
        Revisions,
        Helpfulness,
        SFT,
        Pairs,
        Labels,
        PreferenceModelStage,
        Policy,
        Eval,
    )
}


def stage_names(config: RunConfig) -> list[str]:
    """The stages a run with ``config`` executes, in order."""
    return [name for name, stage in STAGES.items() if stage.included(config)]
