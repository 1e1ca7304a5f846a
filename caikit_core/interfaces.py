"""The role contracts, as :class:`typing.Protocol` classes, and capability flags.

A plugin's object satisfies its role's protocol structurally; it need not
inherit from anything. ``capabilities`` is what the conformance kit and the
pipeline read to decide what a plugin can be asked to do.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs

from caikit_core.records import (
    Comparison,
    Generation,
    GenerationRequest,
    LabelledComparison,
    PreferenceLabel,
    Prompt,
    RevisionTrace,
    Rollout,
    RolloutRequest,
    Sample,
    Score,
    ScoreRequest,
)

# --- capability flags -----------------------------------------------------------------

#: Generator: can score log-probabilities of given continuations (``score``).
CAN_SCORE = "score"
#: Generator: honours ``GenerationRequest.seed`` so the same seed gives the same text.
SEEDED = "seeded"
#: Generator: samples token ids for an RL policy (``rollout``) and takes the policy's
#: updated weights (``load_weights``): see :class:`RolloutGenerator`.
ROLLOUTS = "rollouts"
#: Critic: can revise without writing a critique first (the paper's ablation).
REVISE_WITHOUT_CRITIQUE = "revise-without-critique"
#: Labeller: scores both option orders and averages them.
DEBIAS = "debias"
#: Labeller: writes a chain-of-thought rationale before reading the option probabilities.
CHAIN_OF_THOUGHT = "chain-of-thought"
#: Labeller: clamps its probabilities to a declared interval.
CLAMP = "clamp"
#: Policy optimiser: supervised fine-tuning (``sft``).
SUPPORTS_SFT = "sft"
#: Policy optimiser: RL against a reward with a KL penalty to a reference (PPO).
SUPPORTS_PPO = "ppo"
#: Policy optimiser: a preference loss directly on labelled pairs (DPO and kin).
SUPPORTS_PREFERENCE_LOSS = "preference-loss"
#: Policy optimiser: takes its RL rollouts from a generator plugin
#: (``optimise(..., rollouts=generator)``, ``rl.rollouts = "generator"``).
GENERATOR_ROLLOUTS = "generator-rollouts"
#: Preference model or policy optimiser: its fits take ``checkpoint_dir=`` (a folder
#: that survives a kill, inside the stage folder), save resumable checkpoints there
#: and continue from the last one when called again; see docs/reliability.md#resumable-training.
RESUMABLE = "resumable"
#: Executor: runs batches in parallel, possibly on other machines.
DISTRIBUTED = "distributed"

ALL_CAPABILITIES = frozenset(
    {
        CAN_SCORE,
        SEEDED,
        ROLLOUTS,
        REVISE_WITHOUT_CRITIQUE,
        DEBIAS,
        CHAIN_OF_THOUGHT,
        CLAMP,
        SUPPORTS_SFT,
        SUPPORTS_PPO,
        SUPPORTS_PREFERENCE_LOSS,
        GENERATOR_ROLLOUTS,
        RESUMABLE,
        DISTRIBUTED,
    }
)


@attrs.frozen
class FitReport:
    """What a fit produced: where it saved, its final metrics (loss, accuracy, ...)
    and, optionally, per-step metrics (``history``: e.g. PPO's ``reward`` and ``kl``
    per step), which the run's manifest keeps and ``caikit run`` prints."""

    path: str
    metrics: dict[str, float] = attrs.field(factory=dict)
    history: Sequence[Mapping[str, float]] = ()


# --- the roles ------------------------------------------------------------------------


@runtime_checkable
class Generator(Protocol):
    """Chat messages in, ``n`` sampled completions per request out, in request order."""

    capabilities: frozenset[str]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]: ...

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Log-probabilities of continuations; only with the ``score`` capability."""
        ...


@runtime_checkable
class RolloutGenerator(Generator, Protocol):
    """A generator with the ``rollouts`` capability: an RL optimiser's sampler.

    ``rollout`` samples token ids (see :class:`~caikit_core.records.RolloutRequest`);
    ``load_weights`` replaces the model's weights with those of ``checkpoint``, an
    HF-format folder of the same architecture (the optimiser saves its updated
    policy there between steps), and drops anything computed with the old weights
    (e.g. a prefix cache).
    """

    def rollout(self, requests: Sequence[RolloutRequest]) -> list[Rollout]: ...

    def load_weights(self, checkpoint: Path) -> None: ...


@runtime_checkable
class Critic(Protocol):
    """Responses in, one revision trace per response out, in order."""

    capabilities: frozenset[str]

    def revise(self, samples: Sequence[Sample], *, seed: int) -> list[RevisionTrace]: ...


@runtime_checkable
class Labeller(Protocol):
    """Comparisons in, one preference label per comparison out, in order."""

    capabilities: frozenset[str]

    def label(self, comparisons: Sequence[Comparison], *, seed: int) -> list[PreferenceLabel]: ...


@runtime_checkable
class PreferenceModel(Protocol):
    """Trained on soft-labelled comparisons; scores (prompt, response) pairs.

    A model with the ``resumable`` capability is also called as
    ``fit(labelled, out, checkpoint_dir=folder)``; see :data:`RESUMABLE`."""

    capabilities: frozenset[str]

    def fit(self, labelled: Sequence[LabelledComparison], out: Path) -> FitReport: ...

    def score(self, samples: Sequence[Sample]) -> list[float]: ...

    def load(self, path: Path) -> None: ...


@runtime_checkable
class PolicyOptimiser(Protocol):
    """Fine-tunes a policy; checkpoints are HF-format folders named by path.

    An optimiser with the ``resumable`` capability is also called with
    ``checkpoint_dir=folder`` by ``sft`` and ``optimise``; see :data:`RESUMABLE`."""

    capabilities: frozenset[str]

    def sft(self, policy: str, examples: Sequence[RevisionTrace], out: Path) -> FitReport: ...

    def optimise(
        self,
        policy: str,
        reference: str,
        reward: PreferenceModel,
        prompts: Sequence[Prompt],
        labelled: Sequence[LabelledComparison],
        out: Path,
    ) -> FitReport:
        """RL-CAI. An optimiser with the ``generator-rollouts`` capability is also
        called with ``rollouts=`` a :class:`RolloutGenerator` loaded with ``policy``
        when the run asks for it (``rl.rollouts = "generator"``); it samples from it
        and pushes its updated weights into it between steps."""
        ...


class BatchWorker(Protocol):
    """A stage's worker as built by ``WorkerSpec.build()``: one batch in, its records out.

    Raises ``caikit_core.stages.base.BatchFailed`` (carrying ``key``) when the batch
    fails, so the runner can name the batch's records.
    """

    def __call__(self, key: Hashable, batch: list[Any]) -> list[Any]: ...


class WorkerFactory(Protocol):
    """What an executor receives for a stage: picklable, built where batches run."""

    def build(self) -> BatchWorker: ...


@runtime_checkable
class Executor(Protocol):
    """Maps a stage's worker over keyed batches, yielding ``(key, outputs)`` pairs.

    ``worker`` is a ``caikit_core.stages.base.WorkerSpec``: a module-level class and
    plain arguments, never a closure over loaded models. An executor calls
    ``worker.build()`` once in each process that runs batches (the build loads the
    stage's models there) and then ``built(key, batch)`` per batch. Results may come
    back in any order; an executor that retries may yield a key twice (the runner
    keeps one). ``describe`` labels the progress display; ``total`` is the number of
    items over all batches. An exception from a batch propagates (the runner names
    the failing records from its key).
    """

    capabilities: frozenset[str]

    def map(
        self,
        worker: WorkerFactory,
        batches: Iterable[tuple[Hashable, list[Any]]],
        *,
        total: int,
        describe: str,
    ) -> Iterator[tuple[Hashable, list[Any]]]: ...


# Roles, their hook names and protocols, in pipeline order.
ROLE_PROTOCOLS: dict[str, type] = {
    "generator": Generator,
    "critic": Critic,
    "labeller": Labeller,
    "preference_model": PreferenceModel,
    "policy_optimiser": PolicyOptimiser,
    "executor": Executor,
}
