"""The conformance kit: every bundled plugin passes it, broken plugins fail exactly the
checks that name their bug, and ``caikit check`` reports both."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

torch = pytest.importorskip("torch")

from caikit_core import hookimpl, plugins  # noqa: E402
from caikit_core.cli import main  # noqa: E402
from caikit_core.errors import PluginError  # noqa: E402
from caikit_core.interfaces import DEBIAS, ROLLOUTS, SUPPORTS_PREFERENCE_LOSS  # noqa: E402
from caikit_core.records import (  # noqa: E402
    Comparison,
    Generation,
    GenerationRequest,
    LabelledComparison,
    Message,
    OptionScore,
    PreferenceLabel,
    Rollout,
    RolloutRequest,
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


def test_hf_scores_are_far_inside_the_score_checks_margins() -> None:
    """The tolerances leave room: hf's chain-rule gaps are float32 round-off, far under
    1e-3, and its scores move with the question far more than 1e-6."""
    from caikit_core.testing import checks
    from caikit_core.testing.fixtures import hf_generator

    generator = hf_generator()
    requests = []
    for question, prefix, a, b in checks._CHAIN:
        messages = (Message("user", question),)
        requests.append(ScoreRequest("whole", messages, (a + b, a), prefix))
        requests.append(ScoreRequest("rest", messages, (b,), prefix + a))
    scores = generator.score(requests)
    for whole, rest in zip(scores[::2], scores[1::2], strict=True):
        assert whole.token_counts[0] == whole.token_counts[1] + rest.token_counts[0]
        assert abs(whole.logprobs[0] - whole.logprobs[1] - rest.logprobs[0]) < 1e-4
    options = generator.score(
        [
            ScoreRequest(f"o-{i}", (Message("user", q),), checks._OPTIONS, checks._OPTION_PREFIX)
            for i, q in enumerate(checks._PROMPT_QUESTIONS)
        ]
    )
    gaps = [
        max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        for i, a in enumerate(options)
        for b in options[i + 1 :]
    ]
    assert len(gaps) == 6 and min(gaps) > 0.1


def test_generator_hf_in_bfloat16_passes_the_score_checks() -> None:
    """bfloat16 round-off breaks the chain rule by more than 1e-3 on the tiny model; a
    generator that declares a 16-bit dtype is held to 0.1 instead."""
    results = check_plugin("generator", "hf", config={"dtype": "bfloat16"}, pattern="score")
    assert {r.check: r.status for r in results} == {
        "check_generator_scores_are_logprobs": "passed",
        "check_generator_greedy_choice_scores_highest": "passed",
        "check_generator_score_chain_rule": "passed",
        "check_generator_scores_depend_on_prompt": "passed",
        "check_generator_greedy_text_scores_highest": "passed",
    }


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
        self.capabilities = self.inner.capabilities - {ROLLOUTS}

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        generations: list[Generation] = self.inner.generate(requests)
        return generations

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        system = Message("system", "Be brief.")
        shifted = [attrs.evolve(r, messages=(system, *r.messages)) for r in requests]
        scores: list[Score] = self.inner.score(shifted)
        return scores


class _WrappedHF:
    """The hf generator on the tiny model; subclasses break one thing about it."""

    def __init__(self) -> None:
        from caikit_core.testing.fixtures import hf_generator

        self.inner = hf_generator()
        self.capabilities = self.inner.capabilities

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        generations: list[Generation] = self.inner.generate(requests)
        return generations

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        scores: list[Score] = self.inner.score(requests)
        return scores

    def rollout(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        rollouts: list[Rollout] = self.inner.rollout(requests)
        return rollouts

    def load_weights(self, checkpoint: Path) -> None:
        self.inner.load_weights(checkpoint)


class BatchSeededRollouts(_WrappedHF):
    """The hf generator, but a rollout's seed is its place in the batch, not its own."""

    def rollout(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        return super().rollout([attrs.evolve(r, seed=i) for i, r in enumerate(requests)])


class StaleWeights(_WrappedHF):
    """The hf generator, but ``load_weights`` loads nothing."""

    def load_weights(self, checkpoint: Path) -> None:
        pass


class PrefixBlindScorer(_WrappedHF):
    """The hf generator, but ``score`` drops ``response_prefix``."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        return super().score([attrs.evolve(r, response_prefix="") for r in requests])


class MeanScorer(_WrappedHF):
    """The hf generator, but ``score`` averages the token log-probabilities."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        return [
            attrs.evolve(
                s,
                logprobs=tuple(
                    lp / max(n, 1) for lp, n in zip(s.logprobs, s.token_counts, strict=True)
                ),
            )
            for s in super().score(requests)
        ]


#: The one conversation :class:`QuestionBlindGenerator` answers, whatever it is asked.
_FIXED = (Message("user", "Why is the sky blue?"),)


class QuestionBlindGenerator(_WrappedHF):
    """The hf generator, but ``generate`` and ``score`` both drop the messages for a
    fixed question: consistent with itself, and blind to what it is asked."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        return super().generate([attrs.evolve(r, messages=_FIXED) for r in requests])

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        return super().score([attrs.evolve(r, messages=_FIXED) for r in requests])


class GreedyFirstTokenOnly(_WrappedHF):
    """The hf generator, but greedy decoding is greedy for the first token only: the
    rest is sampled (seeded, so still deterministic)."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        out = []
        for r in requests:
            sampling = r.sampling
            if sampling.temperature != 0.0 or sampling.max_new_tokens <= 1:
                out.extend(super().generate([r]))
                continue
            one = attrs.evolve(sampling, max_new_tokens=1)
            (first,) = super().generate([attrs.evolve(r, sampling=one)])
            if first.finish_reasons != ("length",) * r.n:
                out.append(first)
                continue
            more = attrs.evolve(
                sampling, max_new_tokens=sampling.max_new_tokens - 1, temperature=1.0
            )
            prefix = r.response_prefix + first.texts[0]
            (rest,) = super().generate([attrs.evolve(r, sampling=more, response_prefix=prefix)])
            texts = tuple(first.texts[0] + t for t in rest.texts)
            out.append(Generation(r.id, texts, rest.finish_reasons, first.warnings + rest.warnings))
        return out


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


def test_scoring_another_context_fails_the_greedy_checks() -> None:
    failed = _failed(check_plugin("generator", SystemTurnScorer()))
    # The context differs for every token, so the whole greedy texts do not win either.
    assert set(failed) == {
        "check_generator_greedy_choice_scores_highest",
        "check_generator_greedy_text_scores_highest",
    }
    assert (
        "and score must score the same tokens given the same context"
        in (failed["check_generator_greedy_text_scores_highest"])
    )
    reason = failed["check_generator_greedy_choice_scores_highest"]
    assert re.match(
        r"for 'top-\d' the greedy one-token completion '.+' scores -?[\d.]+ but", reason
    )
    assert "score and generate must render the same context" in reason


def test_batch_seeded_rollouts_fail_the_rollout_seed_check() -> None:
    failed = _failed(check_plugin("generator", BatchSeededRollouts()))
    assert set(failed) == {"check_generator_rollouts_seeded_and_stop_at_stop_tokens"}
    reason = failed["check_generator_rollouts_seeded_and_stop_at_stop_tokens"]
    assert reason.startswith("seeded rollout 'r1' gave ((") and "in a batch" in reason


def test_a_generator_ignoring_new_weights_fails_the_weights_check() -> None:
    failed = _failed(check_plugin("generator", StaleWeights()))
    assert set(failed) == {"check_generator_rollouts_follow_loaded_weights"}
    assert failed["check_generator_rollouts_follow_loaded_weights"].startswith(
        "greedy rollouts are the same after load_weights of a checkpoint with other weights"
    )


def test_scorer_blind_to_the_prefix_fails_the_chain_rule_check() -> None:
    results = check_plugin("generator", PrefixBlindScorer())
    failed = _failed(results)
    assert set(failed) == {"check_generator_score_chain_rule"}
    match = re.match(
        r"for 'chain-0' log P\('The capital of France is Paris.'\) is (-[\d.]+), but "
        r"log P\('The capital'\) \+ log P\(' of France is Paris.' \| response_prefix "
        r"'The capital'\) is (-[\d.]+) \+ (-[\d.]+) = (-[\d.]+) \(tolerance 0.001\)",
        failed["check_generator_score_chain_rule"],
    )
    assert match, failed["check_generator_score_chain_rule"]
    joint, split = float(match.group(1)), float(match.group(4))
    assert abs(joint - split) > 0.1
    assert "with response_prefix in the context" in failed["check_generator_score_chain_rule"]
    # With the prefix ignored no alternative scores as generated, so nothing is compared.
    statuses = {r.check: r.status for r in results}
    assert statuses["check_generator_greedy_text_scores_highest"] == "skipped"


def test_averaging_scorer_fails_the_chain_rule_check() -> None:
    failed = _failed(check_plugin("generator", MeanScorer()))
    # A one-token greedy completion also loses to a longer text's higher average.
    assert set(failed) == {
        "check_generator_score_chain_rule",
        "check_generator_greedy_choice_scores_highest",
    }
    reason = failed["check_generator_score_chain_rule"]
    assert reason.startswith("for 'chain-0' log P('The capital of France is Paris.') is -")
    assert "score must sum the log-softmax of each continuation token" in reason


def test_generator_blind_to_the_question_fails_the_prompt_check() -> None:
    results = check_plugin("generator", QuestionBlindGenerator())
    failed = _failed(results)
    assert set(failed) == {"check_generator_scores_depend_on_prompt"}
    reason = failed["check_generator_scores_depend_on_prompt"]
    match = re.match(
        r"options \('A', 'B'\) score (\(.+?\)) under 'What is the capital of France\?' and "
        r"(\(.+?\)) under 'Say something nice.'; scores must depend on the messages",
        reason,
    )
    assert match and match.group(1) == match.group(2), reason
    assert "do not cache scores by continuation alone" in reason
    # Consistent with itself, it passes the other score checks.
    statuses = {r.check: r.status for r in results}
    assert statuses["check_generator_score_chain_rule"] == "passed"
    assert statuses["check_generator_greedy_text_scores_highest"] == "passed"


def test_greedy_for_one_token_only_fails_the_greedy_text_check() -> None:
    results = check_plugin("generator", GreedyFirstTokenOnly())
    failed = _failed(results)
    assert set(failed) == {"check_generator_greedy_text_scores_highest"}
    reason = failed["check_generator_greedy_text_scores_highest"]
    match = re.match(
        r"for 'greedy-\d-([234])' generate's greedy \1-token text '.+' scores (-[\d.]+) but "
        r"'.+', which shares its first \d tokens, scores (-[\d.]+) \(tolerance 0.001\)",
        reason,
    )
    assert match, reason
    assert float(match.group(3)) > float(match.group(2)) + 1e-3
    assert "every step of generate must take the most likely token" in reason
    statuses = {r.check: r.status for r in results}
    assert statuses["check_generator_greedy_choice_scores_highest"] == "passed"


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
