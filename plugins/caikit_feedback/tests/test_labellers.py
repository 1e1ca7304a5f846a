"""The ``direct`` and ``cot`` labellers and the ``hf`` generator's prefix reuse, on a tiny Llama."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

torch = pytest.importorskip("torch")

from caikit_hf.generator import HFGenerator, plan_shared_prefixes  # noqa: E402
from caikit_hf.plugin import HFGeneratorConfig, build_generator  # noqa: E402

from caikit_core.constitution import (  # noqa: E402
    Constitution,
    FeedbackFewShot,
    FeedbackPrinciple,
    validate_constitution,
)
from caikit_core.converter import InvalidValue, describe_error, structure  # noqa: E402
from caikit_core.errors import PluginError  # noqa: E402
from caikit_core.interfaces import Labeller  # noqa: E402
from caikit_core.records import (  # noqa: E402
    Comparison,
    Generation,
    GenerationRequest,
    PreferenceLabel,
    Score,
    ScoreRequest,
    conversation,
    stable_id,
)
from caikit_feedback.labeller import (  # noqa: E402
    ANSWER_PREFIX,
    COT_ANSWER,
    COT_CUE,
    LEAD,
    CotLabeller,
    CotLabellerConfig,
    DirectLabeller,
    DirectLabellerConfig,
    combine_options,
    option_probability,
)
from caikit_feedback.plugin import (  # noqa: E402
    build_cot_labeller,
    build_direct_labeller,
    register_labellers,
)

#: Short principles and examples, so that questions fit the tiny model's context.
CONSTITUTION = validate_constitution(
    Constitution(
        name="tiny",
        feedback=(
            FeedbackPrinciple("kind", "Which is kinder?"),
            FeedbackPrinciple("honest", "Which is more honest?"),
            FeedbackPrinciple("safe", "Which is safer?"),
            FeedbackPrinciple("helpful", "Which is more helpful?"),
        ),
        feedback_few_shot=(
            FeedbackFewShot("Human: Help me.", "No.", "Sure, how?", "Which is more helpful?", "B"),
            FeedbackFewShot("Is the sky blue?", "Yes, it is.", "No.", "", "A"),
            FeedbackFewShot(
                "Human: Hi", "Hello!", "Go away.", "", "A", rationale="(A) is polite; (B) is rude."
            ),
        ),
    )
)

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "It is Rome."),
    ("How do I bake bread?", "You need flour, water, salt and yeast.", "I would rather not."),
    ("Say something nice.", "You are welcome here.", "No."),
    ("Why is the sky blue?", "Air scatters blue light more.", "Because it is."),
    ("Write a poem about the sea.", "The sea is wide and deep.", "Waves. Gulls. Sand."),
    ("hello there!", "hello, how can I help you today?", ""),
]


def comparisons(pairs: Sequence[tuple[str, str, str]] = PAIRS) -> list[Comparison]:
    """One comparison per (prompt, response A, response B)."""
    out = []
    for prompt, a, b in pairs:
        pid = stable_id("prompt", prompt)
        out.append(
            Comparison(stable_id("pair", pid, a, b), pid, conversation(("user", prompt)), a, b)
        )
    return out


def swapped(comparison: Comparison) -> Comparison:
    """The same comparison (same id, so the same principles) with the responses swapped."""
    return attrs.evolve(
        comparison, response_a=comparison.response_b, response_b=comparison.response_a
    )


class Recording:
    """Wraps a real generator and records each call: ``(method, requests)``."""

    def __init__(self, inner: Any, capabilities: frozenset[str] | None = None) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities if capabilities is None else capabilities
        self.model_name = "tiny-llama"
        self.calls: list[tuple[str, list[Any]]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.calls.append(("generate", list(requests)))
        result: list[Generation] = self.inner.generate(requests)
        return result

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        self.calls.append(("score", list(requests)))
        result: list[Score] = self.inner.score(requests)
        return result


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the tiny model gains nothing from more on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator(tiny_llama: Path) -> HFGenerator:
    """The tiny model; RoPE lets it read past its nominal 256 positions, so few-shot fits."""
    return build_generator(HFGeneratorConfig(device="cpu", max_context=1024), model=str(tiny_llama))


@pytest.fixture(scope="module")
def plain(tiny_llama: Path) -> HFGenerator:
    """The same model scoring without prefix reuse."""
    return build_generator(
        HFGeneratorConfig(device="cpu", max_context=1024, prefix_reuse=False),
        model=str(tiny_llama),
    )


def direct(generator: Any, **settings: Any) -> DirectLabeller:
    return build_direct_labeller(
        DirectLabellerConfig(**settings), generator=generator, constitution=CONSTITUTION
    )


def cot(generator: Any, **settings: Any) -> CotLabeller:
    config = CotLabellerConfig(**{"max_new_tokens": 6, **settings})
    return build_cot_labeller(config, generator=generator, constitution=CONSTITUTION)


# --- the arithmetic -------------------------------------------------------------------


def test_paper_walkthrough_normalisation() -> None:
    # log P(A) = -0.3, log P(B) = -1.6: P(A) = e^-0.3 / (e^-0.3 + e^-1.6) = 0.79
    assert round(option_probability(-0.3, -1.6), 2) == 0.79
    assert option_probability(-0.3, -1.6) == pytest.approx(
        math.exp(-0.3) / (math.exp(-0.3) + math.exp(-1.6)), abs=1e-15
    )
    assert option_probability(-1.6, -0.3) == pytest.approx(1 - option_probability(-0.3, -1.6))


def test_normalisation_edge_cases() -> None:
    assert option_probability(-2.0, -2.0) == 0.5
    assert option_probability(-math.inf, -math.inf) == 0.5
    assert option_probability(0.0, -math.inf) == 1.0
    assert option_probability(-math.inf, -5.0) == 0.0
    for a, b in [(-1000.0, 0.0), (0.0, -1000.0), (-1e-12, -800.0)]:
        p = option_probability(a, b)
        assert math.isfinite(p) and 0.0 <= p <= 1.0
    with pytest.raises(ValueError, match="log-probability"):
        option_probability(math.nan, -1.0)


def test_combination_is_exactly_antisymmetric() -> None:
    import random

    rng = random.Random(0)
    for _ in range(500):
        ab = (-rng.expovariate(0.5), -rng.expovariate(0.5))
        ba = (-rng.expovariate(0.5), -rng.expovariate(0.5))
        p, consistency = combine_options([(ab, ba)])
        q, _ = combine_options([(ba, ab)])
        assert q == 1.0 - p  # exactly
        assert consistency is not None and 0.0 <= consistency <= 1.0
        assert combine_options([(ab, ab)])[0] == 0.5  # identical responses
        clamped, _ = combine_options([(ab, ba)], (0.4, 0.6))
        assert 0.4 <= clamped <= 0.6
        assert combine_options([(ba, ab)], (0.4, 0.6))[0] == 1.0 - clamped
    # P(A) averaged over both orders: (P_AB(A) + 1 - P_BA(letter A)) / 2
    p, consistency = combine_options([((-0.3, -1.6), (-1.2, -0.4))])
    p_ab, p_ba = option_probability(-0.3, -1.6), option_probability(-1.2, -0.4)
    assert p == pytest.approx((p_ab + 1 - p_ba) / 2, abs=1e-15)
    assert consistency == pytest.approx(1 - abs(p_ab - (1 - p_ba)))
    # pure position bias: the model says "A" whatever it is shown
    assert combine_options([((0.0, -50.0), (0.0, -50.0))])[1] == pytest.approx(0.0, abs=1e-12)
    assert combine_options([((-0.3, -1.6), None)]) == (pytest.approx(p_ab), None)


# --- settings and registration --------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "settings", "field"),
    [
        (DirectLabellerConfig, {"few_shot": -1}, "few_shot"),
        (DirectLabellerConfig, {"ensemble": 0}, "ensemble"),
        (DirectLabellerConfig, {"debias": 1}, "debias"),
        (DirectLabellerConfig, {"clamp": (0.6, 0.4)}, "clamp"),
        (DirectLabellerConfig, {"clamp": (-0.1, 0.5)}, "clamp"),
        (CotLabellerConfig, {"clamp": (0.5, 0.5)}, "clamp"),
        (CotLabellerConfig, {"clamp": (0.2, 1.5)}, "clamp"),
        (CotLabellerConfig, {"max_new_tokens": 0}, "max_new_tokens"),
        (CotLabellerConfig, {"temperature": -1.0}, "temperature"),
        (CotLabellerConfig, {"top_p": 0.0}, "top_p"),
    ],
)
def test_config_validation(cls: type, settings: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidValue) as err:
        cls(**settings)
    assert err.value.field == field
    assert str(err.value).startswith("expected ") and ", found " in str(err.value)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    with pytest.raises(Exception) as from_file:
        structure(data, cls)
    (line,) = describe_error(from_file.value, prefix="labeller")
    assert line.startswith(f"labeller.{field}: expected ")


def test_config_defaults_and_clamp_from_a_list() -> None:
    assert CotLabellerConfig().clamp == (0.4, 0.6)
    assert DirectLabellerConfig().clamp is None
    assert DirectLabellerConfig().debias and CotLabellerConfig().debias
    assert structure({"clamp": [0.3, 0.7]}, DirectLabellerConfig).clamp == (0.3, 0.7)


def test_registers_direct_and_cot() -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    register_labellers(lambda *a, **k: calls.append((a, k)))
    registered = {args[0]: (args[1], kwargs) for args, kwargs in calls}
    assert registered["direct"][0] is build_direct_labeller
    assert registered["direct"][1]["config"] is DirectLabellerConfig
    assert set(registered["direct"][1]["capabilities"]) == {"debias", "clamp"}
    assert registered["cot"][1]["config"] is CotLabellerConfig
    assert set(registered["cot"][1]["capabilities"]) == {"chain-of-thought", "clamp", "debias"}


def test_instance_capabilities_follow_settings(generator: HFGenerator) -> None:
    assert direct(generator).capabilities == {"debias"}
    assert direct(generator, clamp=(0.1, 0.9)).capabilities == {"debias", "clamp"}
    assert direct(generator, debias=False).capabilities == frozenset()
    assert cot(generator).capabilities == {"chain-of-thought", "clamp", "debias"}
    assert isinstance(direct(generator), Labeller) and isinstance(cot(generator), Labeller)


def test_generator_without_score_is_refused(generator: HFGenerator) -> None:
    blind = Recording(generator, capabilities=frozenset({"seeded"}))
    for build in (direct, cot):
        with pytest.raises(PluginError, match="'score' capability") as err:
            build(blind)
        assert "cannot score" in str(err.value)
    assert blind.calls == []


def test_impossible_settings_are_refused(generator: HFGenerator) -> None:
    with pytest.raises(PluginError, match="ensemble = 5, but constitution 'tiny' has 4"):
        direct(generator, ensemble=5)
    with pytest.raises(PluginError, match="few_shot = 4, but constitution 'tiny' has 3"):
        direct(generator, few_shot=4)
    with pytest.raises(PluginError, match="has 1 chain-of-thought"):
        cot(generator, few_shot=2)
    with pytest.raises(PluginError, match="no feedback principles"):
        build_direct_labeller(
            DirectLabellerConfig(), generator=generator, constitution=Constitution("empty")
        )


# --- labelling ------------------------------------------------------------------------


def check_labels(labels: list[PreferenceLabel], batch: list[Comparison], name: str) -> None:
    assert [x.comparison_id for x in labels] == [c.id for c in batch]
    for label, comparison in zip(labels, batch, strict=True):
        assert label.id == stable_id("label", comparison.id)
        assert label.labeller == name
        assert isinstance(label.p_a, float) and math.isfinite(label.p_a)
        assert 0.0 <= label.p_a <= 1.0


def test_direct_labels_are_probabilities_with_evidence(generator: HFGenerator) -> None:
    batch = comparisons()
    labels = direct(generator).label(batch, seed=0)
    check_labels(labels, batch, "direct")
    for label in labels:
        assert [e.order for e in label.evidence] == ["AB", "BA"]
        assert len({e.principle_id for e in label.evidence}) == 1
        for e in label.evidence:
            assert e.logprob_a <= 0.0 and e.logprob_b <= 0.0 and e.rationale is None
        ab, ba = label.evidence
        p_ab = option_probability(ab.logprob_a, ab.logprob_b)
        p_ba = option_probability(ba.logprob_b, ba.logprob_a)  # P(response A) in order BA
        assert label.p_a == pytest.approx((p_ab + p_ba) / 2, abs=1e-12)
        assert label.swap_consistency == pytest.approx(1 - abs(p_ab - p_ba), abs=1e-12)
    assert len({x.p_a for x in labels}) > 1


def test_without_debias_one_order(generator: HFGenerator) -> None:
    labels = direct(generator, debias=False).label(comparisons(), seed=0)
    for label in labels:
        [only] = label.evidence
        assert only.order == "AB" and label.swap_consistency is None
        assert label.p_a == pytest.approx(option_probability(only.logprob_a, only.logprob_b))


@pytest.mark.parametrize("build", [direct, cot])
def test_swapping_the_responses_gives_the_complement_exactly(
    generator: HFGenerator, build: Any
) -> None:
    labeller = build(generator, ensemble=2)
    for comparison in comparisons()[:3]:
        [forward] = labeller.label([comparison], seed=5)
        [backward] = labeller.label([swapped(comparison)], seed=5)
        assert backward.p_a == 1.0 - forward.p_a
        assert backward.swap_consistency == pytest.approx(forward.swap_consistency, abs=1e-12)


@pytest.mark.parametrize("build", [direct, cot])
def test_identical_and_empty_responses(generator: HFGenerator, build: Any) -> None:
    batch = comparisons(
        [
            ("Say something nice.", "You are welcome here.", "You are welcome here."),
            ("hello there!", "", ""),
            ("hello there!", "", "hello, how can I help you today?"),
        ]
    )
    rec = Recording(generator)
    labels = build(rec, ensemble=3).label(batch, seed=0)
    check_labels(labels, batch, build.__name__)
    assert labels[0].p_a == 0.5 and labels[1].p_a == 0.5
    # The two orders of an identical pair are one question, asked once.
    [scored] = [requests for method, requests in rec.calls if method == "score"]
    assert len(scored) == 3 * 2 * 1 + 3 * 2  # 3 principles x (1 + 1 + 2 orders)


def test_cot_is_clamped_and_keeps_its_reasoning(generator: HFGenerator) -> None:
    rec = Recording(generator)
    batch = comparisons()
    labels = cot(rec, temperature=1.0, max_new_tokens=8).label(batch, seed=0)
    check_labels(labels, batch, "cot")
    assert all(0.4 <= x.p_a <= 0.6 for x in labels)
    (_, generations), (_, scores) = rec.calls
    assert all(r.response_prefix == COT_CUE for r in generations)
    texts = {r.id: g for r, g in zip(generations, generator.generate(generations), strict=True)}
    assert len(texts) == len(generations)
    rationales = {e.rationale for x in labels for e in x.evidence}
    assert rationales == {g.texts[0].strip() for g in texts.values()}
    for request in scores:
        assert request.response_prefix.startswith(COT_CUE)
        assert request.response_prefix.endswith(COT_ANSWER)
        assert request.continuations == ("A", "B")
    unclamped = cot(generator, temperature=1.0, max_new_tokens=8, clamp=(0.0, 1.0))
    raw = unclamped.label(batch, seed=0)
    assert [min(max(x.p_a, 0.4), 0.6) for x in raw] == [x.p_a for x in labels]
    assert [x.evidence for x in raw] == [x.evidence for x in labels]


def test_ensemble_uses_distinct_principles(generator: HFGenerator) -> None:
    labeller = direct(generator, ensemble=3)
    batch = comparisons()
    labels = labeller.label(batch, seed=7)
    for label, comparison in zip(labels, batch, strict=True):
        expected = [p.id for p in labeller.principles(comparison.id, 7)]
        assert len(set(expected)) == 3
        assert [e.principle_id for e in label.evidence] == [p for p in expected for _ in "AB"]
        assert [e.order for e in label.evidence] == ["AB", "BA"] * 3
    assert len({tuple(e.principle_id for e in x.evidence) for x in labels}) > 1


@pytest.mark.parametrize("build", [direct, cot])
def test_deterministic_under_a_seed_and_independent_of_batching(
    generator: HFGenerator, build: Any
) -> None:
    labeller = build(generator, ensemble=2)
    batch = comparisons()
    first = labeller.label(batch, seed=3)
    assert labeller.label(batch, seed=3) == first
    alone = [labeller.label([c], seed=3)[0] for c in batch[:3]]
    for one, together in zip(alone, first[:3], strict=True):
        assert [e.principle_id for e in one.evidence] == [e.principle_id for e in together.evidence]
        assert [e.rationale for e in one.evidence] == [e.rationale for e in together.evidence]
        assert one.p_a == pytest.approx(together.p_a, abs=1e-5)
    other = labeller.label(batch, seed=4)
    assert [x.evidence for x in other] != [x.evidence for x in first]


#: How far a label's P(A) and its log-probabilities may move when the same
#: comparisons are labelled in batches of 1 or of 8 (the run's ``batch_size``):
#: batched scoring pads rows to their micro-batch's width, which changes the
#: floating-point sums (docs/reliability.md#batch-size-and-labels). Measured on the
#: tiny model on CPU: max |dP(A)| 2.9e-7, max |dlog p| 7.6e-6.
BATCH_P_TOLERANCE = 1e-6
BATCH_LOGPROB_TOLERANCE = 2e-5


def test_labels_in_batches_of_1_and_8_agree_within_the_stated_tolerance(
    generator: HFGenerator,
) -> None:
    """12 comparisons of varied lengths (so micro-batches pad), with few-shot examples
    and an ensemble of 2 (so prefixes are shared): labelled one per call and 8 per
    call, every P(A) and log-probability agrees within the stated tolerance."""
    pairs = [
        (PAIRS[i % len(PAIRS)][0], "Yes. " * (1 + i), "No thanks. " * (1 + (5 * i) % 7))
        for i in range(12)
    ]
    batch = comparisons(pairs)
    labeller = direct(generator, few_shot=2, ensemble=2)
    alone = [labeller.label([c], seed=0)[0] for c in batch]
    eights = labeller.label(batch[:8], seed=0) + labeller.label(batch[8:], seed=0)
    dp = [abs(a.p_a - b.p_a) for a, b in zip(alone, eights, strict=True)]
    dlog = [
        max(abs(x.logprob_a - y.logprob_a), abs(x.logprob_b - y.logprob_b))
        for a, b in zip(alone, eights, strict=True)
        for x, y in zip(a.evidence, b.evidence, strict=True)
    ]
    print(f"batch 1 vs 8: max |dP(A)| {max(dp):.3g}, max |dlog p| {max(dlog):.3g}")
    assert max(dp) <= BATCH_P_TOLERANCE
    assert max(dlog) <= BATCH_LOGPROB_TOLERANCE
    assert [[e.principle_id for e in a.evidence] for a in alone] == [
        [e.principle_id for e in b.evidence] for b in eights
    ]


def test_a_batch_is_one_score_call(generator: HFGenerator) -> None:
    rec = Recording(generator)
    direct(rec, ensemble=2, few_shot=1).label(comparisons(), seed=0)
    assert [method for method, _ in rec.calls] == ["score"]
    assert len(rec.calls[0][1]) == 6 * 2 * 2  # comparisons x principles x orders
    assert all(r.response_prefix == ANSWER_PREFIX for r in rec.calls[0][1])
    assert all(r.continuations == ("A", "B") for r in rec.calls[0][1])


def test_a_cot_batch_is_one_generate_and_one_score_call(generator: HFGenerator) -> None:
    rec = Recording(generator)
    cot(rec, ensemble=2, few_shot=1).label(comparisons(), seed=0)
    assert [method for method, _ in rec.calls] == ["generate", "score"]
    assert len(rec.calls[0][1]) == len(rec.calls[1][1]) == 6 * 2 * 2
    seeds = [r.seed for r in rec.calls[0][1]]
    assert len(set(seeds)) == len(seeds)


def test_empty_batch_calls_nothing(generator: HFGenerator) -> None:
    rec = Recording(generator)
    assert direct(rec).label([], seed=0) == [] and cot(rec).label([], seed=0) == []
    assert rec.calls == []


def test_few_shot_examples_come_first_and_are_shared(generator: HFGenerator) -> None:
    rec = Recording(generator)
    labels = direct(rec, few_shot=2, ensemble=2).label(comparisons(), seed=0)
    [(_, requests)] = rec.calls
    principles = {p.id: p.text for p in CONSTITUTION.feedback}
    for request in requests:
        roles = [m.role for m in request.messages]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        first, answer_1, second, answer_2, ask = request.messages
        assert first.content.startswith(LEAD) and "Human: Help me." in first.content
        assert "Which is more helpful?\nOptions:\n(A) No.\n(B) Sure, how?" in first.content
        assert answer_1.content == "The answer is: (B)"
        assert (
            "Human: Is the sky blue?" in second.content and answer_2.content == "The answer is: (A)"
        )
        assert ask.content.startswith(LEAD)
        # An example without a principle is asked under the request's principle.
        asked = ask.content.split("\n\n")[-1].split("\nOptions:")[0]
        assert asked in principles.values()
        assert f"{asked}\nOptions:\n(A) Yes, it is." in second.content
    # Requests under one principle share everything up to their own question.
    by_principle: dict[str, list[ScoreRequest]] = {}
    for request in requests:
        asked = request.messages[-1].content.split("\n\n")[-1].split("\nOptions:")[0]
        by_principle.setdefault(asked, []).append(request)
    for group in by_principle.values():
        assert len({r.messages[:-1] for r in group}) == 1
    assert len(labels) == 6


def test_cot_few_shot_shows_the_reasoning(generator: HFGenerator) -> None:
    rec = Recording(generator)
    cot(rec, few_shot=1).label(comparisons()[:2], seed=0)
    for _, requests in rec.calls:
        example, answer = requests[0].messages[:2]
        assert "Human: Hi" in example.content
        assert answer.content == f"{COT_CUE} (A) is polite; (B) is rude.{COT_ANSWER}A)"


def test_prefix_reuse_does_not_change_labels(generator: HFGenerator, plain: HFGenerator) -> None:
    batch = comparisons()
    fast = direct(generator, few_shot=2, ensemble=2).label(batch, seed=0)
    slow = direct(plain, few_shot=2, ensemble=2).label(batch, seed=0)
    for a, b in zip(fast, slow, strict=True):
        assert a.p_a == pytest.approx(b.p_a, abs=1e-4)
        for x, y in zip(a.evidence, b.evidence, strict=True):
            assert x.logprob_a == pytest.approx(y.logprob_a, abs=1e-4)
            assert x.logprob_b == pytest.approx(y.logprob_b, abs=1e-4)


# --- the hf generator's prefix reuse --------------------------------------------------

SYSTEM = (
    "You are a careful and friendly assistant. You answer questions honestly and "
    "harmlessly, and you explain why the sky looks blue in simple words. "
) * 2
QUESTIONS = [
    "Why is the sky blue?",
    "Can you help me write a short poem about the sea?",
    "What is the capital of France?",
    "hello there!",
    "To bake bread you need what?",
]


def shared_requests() -> list[ScoreRequest]:
    """Requests with a long shared system turn, mixing every kind of continuation."""
    out = []
    for i, text in enumerate(QUESTIONS):
        messages = conversation(("system", SYSTEM), ("user", text))
        out.append(ScoreRequest(f"multi{i}", messages, ("A", "The sea is wide.", "", " and")))
        out.append(ScoreRequest(f"single{i}", messages, ("A", "B", ""), response_prefix="(" * i))
    out.append(ScoreRequest("alone", conversation(("user", "Good morning")), ("thank you", "B")))
    out.append(ScoreRequest("none", conversation(("user", "Good evening")), ()))
    return out


@pytest.fixture
def forwards(generator: HFGenerator, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Records ``(batch, width, has cache)`` of each forward pass of ``generator``."""
    calls: list[Any] = []
    original = generator.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        batch, width = kwargs["input_ids"].shape
        cached = kwargs.get("cache", kwargs.get("past_key_values")) is not None
        calls.append((int(batch), int(width), cached))
        return original(*args, **kwargs)

    monkeypatch.setattr(generator.model, "forward", counting)
    yield calls


def assert_same_scores(a: list[Score], b: list[Score]) -> None:
    assert [s.request_id for s in a] == [s.request_id for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.token_counts == y.token_counts
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)
        assert all(math.isfinite(v) and v <= 0.0 for v in x.logprobs)


def test_prefix_reuse_equals_plain_scoring(generator: HFGenerator, plain: HFGenerator) -> None:
    requests = shared_requests()
    assert_same_scores(generator.score(requests), plain.score(requests))


def test_prefix_reuse_across_micro_batches(tiny_llama: Path, plain: HFGenerator) -> None:
    small = build_generator(
        HFGeneratorConfig(device="cpu", max_context=1024, max_batch_size=3), model=str(tiny_llama)
    )
    requests = shared_requests()
    assert_same_scores(small.score(requests), plain.score(requests))


def test_single_token_continuations_read_from_one_row(
    generator: HFGenerator, plain: HFGenerator, forwards: list[Any]
) -> None:
    vocab = [generator.tokenizer.decode([t]) for t in range(300, 340)]
    singles = tuple(
        w for w in vocab if len(generator.tokenizer(w, add_special_tokens=False)["input_ids"]) == 1
    )
    assert len(singles) > 20
    requests = [
        ScoreRequest("letters", conversation(("user", "Which?")), ("A", "B"), "The answer is: ("),
        ScoreRequest("words", conversation(("user", "Say a word.")), singles),
    ]
    scores = generator.score(requests)
    assert forwards == [(2, forwards[0][1], False)]  # one row per request, one pass
    assert_same_scores(scores, plain.score(requests))
    assert all(count == 1 for s in scores for count in s.token_counts)


def test_shared_prefix_is_encoded_once(
    generator: HFGenerator, plain: HFGenerator, forwards: list[Any]
) -> None:
    requests = [
        ScoreRequest(f"q{i}", conversation(("system", SYSTEM), ("user", q)), ("A", "B"))
        for i, q in enumerate(QUESTIONS)
    ]
    contexts = generator._encode(
        generator._context_texts([(r.messages, r.response_prefix) for r in requests])
    )
    common = 0
    while len({tuple(c[: common + 1]) for c in contexts}) == 1:
        common += 1
    assert common > 60
    scores = generator.score(requests)
    (prefix_batch, prefix_width, prefix_cached), (rows, width, cached) = forwards
    assert (prefix_batch, prefix_width, prefix_cached) == (1, common, False)  # encoded once
    assert (rows, cached) == (5, True)
    assert width == max(len(c) for c in contexts) - common
    assert prefix_width + rows * width < 0.5 * rows * max(len(c) for c in contexts)
    forwards.clear()
    assert_same_scores(scores, plain.score(requests))


def test_several_prefixes_of_different_lengths(
    generator: HFGenerator, plain: HFGenerator, forwards: list[Any]
) -> None:
    long_system, short_system = SYSTEM, SYSTEM[: len(SYSTEM) // 2]
    requests = [
        ScoreRequest(f"{name}{i}", conversation(("system", system), ("user", q)), ("A", "B"))
        for name, system in (("long", long_system), ("short", short_system))
        for i, q in enumerate(QUESTIONS)
    ]
    scores = generator.score(requests)
    prefix_batch, _, _ = forwards[0]
    assert prefix_batch == 2  # both prefixes in one left-padded pass
    assert all(cached for _, _, cached in forwards[1:])
    forwards.clear()
    assert_same_scores(scores, plain.score(requests))


def test_without_prefix_reuse_one_pass_over_everything(plain: HFGenerator) -> None:
    calls: list[tuple[int, int]] = []
    original = plain.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(kwargs["input_ids"].shape))
        return original(*args, **kwargs)

    plain.model.forward = counting
    try:
        plain.score(shared_requests())
    finally:
        del plain.model.forward
    assert len(calls) == 1 and calls[0][0] == 5 * 3 + 5 * 2 + 2  # one row per continuation


def test_plan_shared_prefixes() -> None:
    base = list(range(100, 300))
    assert plan_shared_prefixes([[*base, 1, 2], [*base, 3], [*base, 4, 5, 6]]) == [([0, 1, 2], 200)]
    # two families: each shares 150 tokens within, 10 across
    left = [base[:10] + [1] * 150 + [i] for i in range(3)]
    right = [base[:10] + [2] * 150 + [i, i] for i in range(3)]
    groups = plan_shared_prefixes(left + right)
    assert sorted((sorted(m), n) for m, n in groups) == [([0, 1, 2], 160), ([3, 4, 5], 160)]
    # a prefix never covers a whole context: each row keeps its last context token
    assert plan_shared_prefixes([base, base, base]) == [([0, 1, 2], 199)]
    # short prefixes or too little saved: no group
    assert plan_shared_prefixes([[*base[:10], 1], [*base[:10], 2]]) == []
    assert plan_shared_prefixes([[*base[:60], 1], [*base[:60], 2]]) == []
    assert plan_shared_prefixes([base]) == [] and plan_shared_prefixes([]) == []


def test_prefix_reuse_setting() -> None:
    assert HFGeneratorConfig().prefix_reuse is True
    with pytest.raises(InvalidValue) as err:
        HFGeneratorConfig(prefix_reuse="yes")  # type: ignore[arg-type]
    assert err.value.field == "prefix_reuse"
    with pytest.raises(Exception) as from_file:
        structure({"prefix_reuse": 1}, HFGeneratorConfig)
    (line,) = describe_error(from_file.value, prefix="generator")
    assert line.startswith("generator.prefix_reuse: expected true or false")
