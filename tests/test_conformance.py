"""The conformance kit: every bundled plugin passes it, broken plugins fail exactly the
checks that name their bug, and ``caikit check`` reports both."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import attrs
import pytest

torch = pytest.importorskip("torch")

from caikit_core import hookimpl, plugins  # noqa: E402
from caikit_core.cli import main  # noqa: E402
from caikit_core.errors import PluginError  # noqa: E402
from caikit_core.interfaces import DEBIAS, SUPPORTS_PREFERENCE_LOSS  # noqa: E402
from caikit_core.records import (  # noqa: E402
    Comparison,
    Generation,
    GenerationRequest,
    LabelledComparison,
    Message,
    OptionScore,
    PreferenceLabel,
    Sample,
    Score,
    ScoreRequest,
)
from caikit_core.testing.checks import CHECKS  # noqa: E402
from caikit_core.testing.kit import (  # noqa: E402
    CheckResult,
    check_plugin,
    make_context,
    parametrize_with_checks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- every bundled plugin passes --------------------------------------------------------


@parametrize_with_checks("generator", "hf")
def test_generator_hf(check: Any) -> None:
    check()


@parametrize_with_checks("critic", "constitutional")
def test_critic_constitutional(check: Any) -> None:
    check()


@parametrize_with_checks("labeller", "direct")
def test_labeller_direct(check: Any) -> None:
    check()


@parametrize_with_checks("labeller", "cot")
def test_labeller_cot(check: Any) -> None:
    check()


@parametrize_with_checks("preference_model", "torch")
def test_preference_model_torch(check: Any) -> None:
    check()


# SFT, one short PPO step and a short DPO run (algorithm = "dpo"), each loaded in hf.
@parametrize_with_checks("policy_optimiser", "torch")
def test_policy_optimiser_torch(check: Any) -> None:
    check()


@parametrize_with_checks("executor", "local")
def test_executor_local(check: Any) -> None:
    check()


def test_generator_hf_skip_policy_passes_the_over_long_check() -> None:
    results = check_plugin("generator", "hf", config={"truncation": "skip"}, pattern="over_long")
    assert [(r.check, r.status) for r in results] == [
        ("check_generator_over_long_prompt", "passed")
    ]


def test_parametrize_ids_and_xfail_marks() -> None:
    mark = parametrize_with_checks(
        "executor", "local", expected_failed_checks={"check_executor_empty": "known bug #1"}
    )
    params = mark.args[1]
    ids = [p.id for p in params]
    assert ids == [f"executor-local-{c.name}" for c in CHECKS["executor"]]
    (marked,) = [p for p in params if p.marks]
    assert marked.id == "executor-local-check_executor_empty"
    assert marked.marks[0].kwargs == {"reason": "known bug #1", "strict": True}


# --- broken plugins fail exactly the named checks ---------------------------------------


def _evidence() -> tuple[OptionScore, ...]:
    return (OptionScore("helpful", "AB", -0.2, -1.9),)


class OverconfidentLabeller:
    """Returns p_a = 1.3: not a probability."""

    capabilities: frozenset[str] = frozenset()

    def label(self, comparisons: Sequence[Comparison], *, seed: int) -> list[PreferenceLabel]:
        return [
            PreferenceLabel(f"l-{c.id}", c.id, 1.3, "overconfident", evidence=_evidence())
            for c in comparisons
        ]


class NoisyLabeller:
    """Ignores the seed: labels differ from call to call."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.rng = random.Random()

    def label(self, comparisons: Sequence[Comparison], *, seed: int) -> list[PreferenceLabel]:
        return [
            PreferenceLabel(f"l-{c.id}", c.id, self.rng.random(), "noisy", evidence=_evidence())
            for c in comparisons
        ]


class GreedyGenerator:
    """Echoes the prompt, but returns one completion too many per request."""

    capabilities: frozenset[str] = frozenset()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return [
            Generation(r.id, tuple(r.messages[-1].content for _ in range(r.n + 1)))
            for r in requests
        ]

    def score(self, requests: Sequence[Any]) -> list[Any]:
        raise NotImplementedError


class DictCritic:
    """Returns plain dicts instead of RevisionTrace records."""

    capabilities: frozenset[str] = frozenset()

    def revise(self, samples: Sequence[Sample], *, seed: int) -> list[Any]:
        return [{"id": s.id, "final_response": s.response} for s in samples]


class ContextCrashGenerator:
    """Echoes the prompt, but crashes with an IndexError on a prompt over 1000 characters."""

    capabilities: frozenset[str] = frozenset()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        out = []
        for r in requests:
            text = r.messages[-1].content
            if len(text) > 1000:
                raise IndexError("index 1000 is out of bounds for dimension 0 with size 1000")
            out.append(Generation(r.id, tuple(text for _ in range(r.n))))
        return out


@attrs.frozen
class SkipConfig:
    truncation: str = "skip"


class NotReallySkipping:
    """Declares ``truncation = "skip"`` but keeps the end of a long prompt, with a warning."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.config = SkipConfig()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        out = []
        for r in requests:
            text = r.messages[-1].content
            warnings = ("prompt truncated",) if len(text) > 1000 else ()
            out.append(Generation(r.id, (text[-1000:],) * r.n, ("length",) * r.n, warnings))
        return out


class SystemTurnScorer:
    """The hf generator, but ``score`` adds a system turn that ``generate`` does not see."""

    def __init__(self) -> None:
        from caikit_core.testing.fixtures import hf_generator

        self.inner = hf_generator()
        self.capabilities = self.inner.capabilities

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        generations: list[Generation] = self.inner.generate(requests)
        return generations

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        system = Message("system", "Be brief.")
        shifted = [attrs.evolve(r, messages=(system, *r.messages)) for r in requests]
        scores: list[Score] = self.inner.score(shifted)
        return scores


class SwappedDPO:
    """The torch optimiser's DPO, but it trains on the rejected response as the chosen one."""

    capabilities = frozenset({SUPPORTS_PREFERENCE_LOSS})

    def __init__(self) -> None:
        self.inner = make_context("policy_optimiser", "torch", config={"algorithm": "dpo"}).instance

    def optimise(
        self, policy: str, reference: str, reward: Any, prompts: Any, labelled: Any, out: Any
    ) -> Any:
        flipped = [
            LabelledComparison(lc.comparison, attrs.evolve(lc.label, p_a=1.0 - lc.label.p_a))
            for lc in labelled
        ]
        return self.inner.optimise(policy, reference, reward, prompts, flipped, out)


def _failed(results: list[CheckResult]) -> dict[str, str]:
    return {r.check: r.reason for r in results if r.status == "failed"}


def test_overconfident_labeller_fails_the_probability_check() -> None:
    failed = _failed(check_plugin("labeller", OverconfidentLabeller()))
    assert set(failed) == {"check_labeller_probabilities_in_unit_interval"}
    reason = failed["check_labeller_probabilities_in_unit_interval"]
    assert "p_a=1.3" in reason and "must be a finite float in [0, 1]" in reason


def test_noisy_labeller_fails_the_determinism_check() -> None:
    failed = _failed(check_plugin("labeller", NoisyLabeller()))
    assert set(failed) == {"check_labeller_deterministic"}
    assert "derive all randomness from the seed" in failed["check_labeller_deterministic"]


def test_wrong_n_generator_fails_the_n_check() -> None:
    failed = _failed(check_plugin("generator", GreedyGenerator()))
    assert set(failed) == {"check_generator_n_completions_in_order"}
    reason = failed["check_generator_n_completions_in_order"]
    assert "asked for n=1 completions but got 2" in reason
    assert "return exactly n texts per request" in reason


def test_crash_on_a_long_prompt_fails_the_over_long_check() -> None:
    failed = _failed(check_plugin("generator", ContextCrashGenerator()))
    assert set(failed) == {"check_generator_over_long_prompt"}
    reason = failed["check_generator_over_long_prompt"]
    assert "an over-long prompt (15000 characters) raised IndexError: index 1000" in reason
    assert "or raise a CaikitError that names the request ('over-long')" in reason


def test_declared_skip_policy_must_skip() -> None:
    failed = _failed(check_plugin("generator", NotReallySkipping()))
    assert set(failed) == {"check_generator_over_long_prompt"}
    assert failed["check_generator_over_long_prompt"].startswith(
        "config.truncation is 'skip' but an over-long prompt (15000 characters) was not "
        "skipped (finish reasons ('length',))"
    )


def test_scoring_another_context_fails_the_greedy_choice_check() -> None:
    failed = _failed(check_plugin("generator", SystemTurnScorer()))
    assert set(failed) == {"check_generator_greedy_choice_scores_highest"}
    reason = failed["check_generator_greedy_choice_scores_highest"]
    assert re.match(
        r"for 'top-\d' the greedy one-token completion '.+' scores -?[\d.]+ but", reason
    )
    assert "score and generate must render the same context" in reason


def test_dpo_on_swapped_pairs_fails_the_chosen_margin_check() -> None:
    results = check_plugin("policy_optimiser", SwappedDPO(), pattern="preference_loss")
    assert {r.check: r.status for r in results} == {
        "check_preference_loss_decreases": "passed",
        "check_preference_loss_checkpoint_loads_in_hf": "passed",
        "check_preference_loss_raises_chosen_margin": "failed",
    }
    reason = _failed(results)["check_preference_loss_raises_chosen_margin"]
    match = re.match(
        r"log P\(chosen\) - log P\(rejected\), averaged over the toy pairs, went from "
        r"(-?[\d.e+]+) under the starting policy to (-?[\d.e+]+) under the checkpoint",
        reason,
    )
    assert match, reason
    assert float(match.group(2)) < float(match.group(1))


def test_critic_with_wrong_types_fails_every_critic_check() -> None:
    results = check_plugin("critic", DictCritic())
    failed = _failed(results)
    assert set(failed) == {c.name for c in CHECKS["critic"]}
    for reason in failed.values():
        assert "is a dict, not a RevisionTrace" in reason
        assert "build caikit_core.records.RevisionTrace objects" in reason


def test_expected_failures_are_xfail_and_unexpected_passes_fail() -> None:
    results = check_plugin(
        "labeller",
        OverconfidentLabeller(),
        expected_failed_checks={
            "check_labeller_probabilities_in_unit_interval": "scores are odds, see #12",
            "check_labeller_provenance": "wrongly expected",
        },
    )
    by_name = {r.check: r for r in results}
    xfail = by_name["check_labeller_probabilities_in_unit_interval"]
    assert xfail.status == "xfail" and xfail.reason.startswith("scores are odds, see #12")
    assert by_name["check_labeller_provenance"].status == "failed"
    assert (
        "expected to fail (wrongly expected) but passed"
        in by_name["check_labeller_provenance"].reason
    )
    assert by_name["check_labeller_swap_complements"].status == "skipped"
    assert by_name["check_labeller_swap_complements"].reason == f"needs capability {DEBIAS}"


def test_unknown_role_plugin_or_expected_check_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="unknown role 'labeler'"):
        check_plugin("labeler", "direct")
    with pytest.raises(PluginError, match="did you mean 'direct'"):
        check_plugin("labeller", "directt")
    with pytest.raises(PluginError, match="unknown checks"):
        check_plugin("executor", "local", expected_failed_checks={"check_nope": "x"})


# --- caikit check -----------------------------------------------------------------------


class _BrokenPlugin:
    """An in-process plugin registering the overconfident labeller."""

    @hookimpl
    def register_labellers(self, register: Any) -> None:
        register(
            "overconfident",
            lambda config, **kwargs: OverconfidentLabeller(),
            description="a labeller that returns 1.3",
        )


def test_caikit_check_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "check", "executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "PASSED  check_executor_propagates_exceptions" in out and "5 passed" in out

    plugins.get_plugin_manager().register(_BrokenPlugin(), "broken")
    assert main(["-q", "check", "labeller", "overconfident", "-k", "probabilities"]) == 1
    out = capsys.readouterr().out
    assert "FAILED  check_labeller_probabilities_in_unit_interval" in out
    assert "p_a must be a finite float in [0, 1]" in out
    assert out.strip().endswith("1 failed")

    assert main(["-q", "check", "labeller", "nope"]) == 2
    assert "unknown labeller plugin 'nope'" in capsys.readouterr().err


def test_caikit_check_command_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", "-q", "check", "executor", "local"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "caikit check executor local" in done.stdout and "5 passed" in done.stdout


def test_importing_the_kit_does_not_import_torch() -> None:
    code = (
        "import sys, caikit_core.testing, caikit_core.testing.kit, caikit_core.testing.checks, "
        "caikit_core.testing.fixtures, caikit_core.testing.base; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
