"""The ``constitutional`` critic driving the real HF generator on a tiny Llama."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from caikit_hf.plugin import HFGeneratorConfig, build_generator

from caikit_core.constitution import Constitution
from caikit_core.constitutions import load_constitution
from caikit_core.errors import PluginError
from caikit_core.records import (
    Generation,
    GenerationRequest,
    Sample,
    conversation,
    stable_id,
)
from caikit_feedback.critic import (
    ConstitutionalCritic,
    ConstitutionalCriticConfig,
)
from caikit_feedback.plugin import build_constitutional_critic

PROMPTS = [
    "How do I pick a lock?",
    "Write a rude joke about my boss.",
    "What is the capital of France?",
    "Tell me how to cheat at cards.",
    "Say something nice.",
]


class Recording:
    """Wraps a real generator and records each call's requests."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        self.calls.append(list(requests))
        result: list[Generation] = self.inner.generate(requests)
        return result


@pytest.fixture(scope="module")
def generator(tiny_llama: Path) -> Any:
    return build_generator(HFGeneratorConfig(device="cpu"), model=str(tiny_llama))


@pytest.fixture(scope="module")
def constitution() -> Constitution:
    return load_constitution(None)


def _samples(prompts: Sequence[str] = PROMPTS) -> list[Sample]:
    out = []
    for text in prompts:
        pid = stable_id("prompt", text)
        out.append(Sample(stable_id("r", pid), pid, conversation(("user", text)), f"Sure: {text}"))
    return out


def _critic(generator: Any, constitution: Constitution, **kw: Any) -> ConstitutionalCritic:
    cfg = ConstitutionalCriticConfig(**{"max_new_tokens": 6, "revisions": 3, **kw})
    return build_constitutional_critic(cfg, generator=generator, constitution=constitution)


def test_each_step_is_one_generator_call_over_all_samples(
    generator: Any, constitution: Constitution
) -> None:
    rec = Recording(generator)
    traces = _critic(rec, constitution).revise(_samples(), seed=0)
    assert [len(c) for c in rec.calls] == [5] * 6  # 3 steps x (critique, revision)
    kinds = [c[0].id.rsplit("/", 1)[1] for c in rec.calls]
    assert kinds == ["critique", "revision"] * 3
    assert len(traces) == 5


def test_trace_records_every_step(generator: Any, constitution: Constitution) -> None:
    ids = {p.id: p for p in constitution.critique_revision}
    samples = _samples()
    traces = _critic(generator, constitution).revise(samples, seed=1)
    for sample, trace in zip(samples, traces, strict=True):
        assert trace.prompt_id == sample.prompt_id
        assert trace.initial_response == sample.response
        assert [s.index for s in trace.steps] == [0, 1, 2]
        assert len({s.principle_id for s in trace.steps}) == 3  # fresh principle each step
        for step in trace.steps:
            principle = ids[step.principle_id]
            assert step.critique_prompt == principle.critique
            assert step.revision_prompt == principle.revision
            assert isinstance(step.critique, str) and isinstance(step.revision, str)
        last = [s.revision for s in trace.steps if s.revision]
        assert trace.final_response == (last[-1] if last else sample.response)
        assert trace.skipped_reason is None


def test_the_revision_request_sees_the_critique(generator: Any, constitution: Constitution) -> None:
    rec = Recording(generator)
    traces = _critic(rec, constitution, revisions=1).revise(_samples()[:1], seed=0)
    critique_req, revision_req = rec.calls[0][0], rec.calls[1][0]
    step = traces[0].steps[0]
    assert critique_req.messages[-1].content == step.critique_prompt
    assert [m.role for m in revision_req.messages[-3:]] == ["user", "assistant", "user"]
    assert revision_req.messages[-2].content == step.critique
    assert revision_req.messages[-1].content == step.revision_prompt


def test_seeded_and_independent_of_batching(generator: Any, constitution: Constitution) -> None:
    critic = _critic(generator, constitution, temperature=1.0)
    samples = _samples()
    together = critic.revise(samples, seed=7)
    assert critic.revise(samples, seed=7) == together
    alone = [critic.revise([s], seed=7)[0] for s in samples]
    assert alone == together
    other = critic.revise(samples, seed=8)
    plans = lambda ts: [[s.principle_id for s in t.steps] for t in ts]  # noqa: E731
    assert plans(other) != plans(together)


def test_principles_cover_the_constitution(generator: Any, constitution: Constitution) -> None:
    critic = _critic(generator, constitution, revisions=4)
    seen = {p.id for i in range(200) for p in critic.principles(f"s{i}", seed=0)}
    assert seen == {p.id for p in constitution.critique_revision}
    many = _critic(generator, constitution, revisions=20).principles("x", seed=0)
    assert len(many) == 20 and len({p.id for p in many[:16]}) == 16


def test_revise_without_critique(generator: Any, constitution: Constitution) -> None:
    rec = Recording(generator)
    traces = _critic(rec, constitution, critique=False, revisions=2).revise(_samples(), seed=0)
    assert len(rec.calls) == 2
    assert all(r.id.endswith("/revision") for call in rec.calls for r in call)
    for trace in traces:
        assert all(s.critique == "" and s.critique_prompt == "" for s in trace.steps)
    # the revision request follows the response directly
    assert rec.calls[0][0].messages[-2].role == "assistant"


def test_few_shot_prefix(generator: Any, constitution: Constitution) -> None:
    rec = Recording(generator)
    _critic(rec, constitution, revisions=1, few_shot=2).revise(_samples()[:1], seed=0)
    first = rec.calls[0][0].messages
    example = constitution.critique_few_shot[0]
    assert first[: len(example.messages)] == example.messages
    assert any(m.content == example.critique for m in first)
    with pytest.raises(PluginError, match="few_shot = 9, but constitution 'caikit-default' has 2"):
        _critic(generator, constitution, few_shot=9)


def test_overlong_prompt_is_skipped_with_a_reason(
    tiny_llama: Path, constitution: Constitution
) -> None:
    gen = build_generator(
        HFGeneratorConfig(device="cpu", truncation="skip", max_context=400), model=str(tiny_llama)
    )
    samples = _samples(["short one", "word " * 400])
    traces = _critic(gen, constitution, revisions=1).revise(samples, seed=0)
    assert traces[0].skipped_reason is None and len(traces[0].steps) == 1
    assert traces[1].skipped_reason is not None
    assert traces[1].skipped_reason.startswith(
        "critique request of step 0 skipped by the generator"
    )
    assert traces[1].steps == () and traces[1].final_response == samples[1].response


def test_empty_initial_response_is_recorded_not_revised(
    generator: Any, constitution: Constitution
) -> None:
    rec = Recording(generator)
    sample = _samples()[0]
    empty = Sample("e", sample.prompt_id, sample.messages, "  ")
    traces = _critic(rec, constitution, revisions=1).revise([empty, sample], seed=0)
    assert traces[0].skipped_reason == "empty initial response"
    assert [len(c) for c in rec.calls] == [1, 1]


def test_constitution_without_principles_is_refused(generator: Any) -> None:
    with pytest.raises(PluginError, match="has no critique/revision principles"):
        _critic(generator, Constitution("empty"))
