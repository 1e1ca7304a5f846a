"""The ``openai`` generator against a loopback server backed by the ``hf`` generator."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest
from caikit_core.converter import unstructure
from caikit_core.errors import PluginError
from caikit_core.records import Generation, GenerationRequest, SamplingParams, conversation
from conftest import FakeOpenAI

from caikit_openai.generator import OpenAIGenerator
from caikit_openai.plugin import OpenAIConfig, build_generator

KEY_ENV = "CAIKIT_OPENAI_TEST_KEY"
SECRET = "sk-test-0123456789abcdef-SECRET"

PROMPTS = [
    conversation(("user", "Please explain why the sky is blue.")),
    conversation(("system", "You are careful."), ("user", "Write a poem about the sea.")),
    conversation(("user", "What is the capital of France?")),
    conversation(("user", "hello there!")),
]


def make(server: FakeOpenAI, **options: Any) -> OpenAIGenerator:
    """The plugin's generator pointed at ``server``."""
    options.setdefault("api_key_env", KEY_ENV)
    return build_generator(OpenAIConfig(base_url=server.base_url, **options), model="tiny")


def one_by_one(hf: Any, requests: list[GenerationRequest]) -> list[Generation]:
    """What the server computes: the ``hf`` generator on one request at a time."""
    return [hf.generate([r])[0] for r in requests]


def requests_for(sampling: SamplingParams, *, n: int = 1, seed: int = 0) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"r{i}", messages, sampling, n=n, seed=seed + i)
        for i, messages in enumerate(PROMPTS)
    ]


def same(got: list[Generation], expected: list[Generation]) -> None:
    assert [g.texts for g in got] == [e.texts for e in expected]
    assert [g.finish_reasons for g in got] == [e.finish_reasons for e in expected]
    assert [g.request_id for g in got] == [e.request_id for e in expected]


def test_greedy_matches_hf(server: FakeOpenAI, hf: Any) -> None:
    requests = requests_for(SamplingParams(max_new_tokens=12, temperature=0.0))
    got = make(server, concurrency=1).generate(requests)
    same(got, one_by_one(hf, requests))
    assert all(g.finish_reasons for g in got)


def test_seeded_sampling_matches_hf_with_n_in_order(server: FakeOpenAI, hf: Any) -> None:
    server.reverse_choices = True  # the client must restore the choices' order
    requests = requests_for(SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9), n=3)
    generator = make(server, concurrency=3)
    got = generator.generate(requests)
    same(got, one_by_one(hf, requests))
    assert all(len(g.texts) == 3 for g in got)
    assert generator.generate(requests) == got  # seeded: the same again
    sent = [body for _, body in server.received[: len(requests)]]
    assert sorted(b["seed"] for b in sent) == [r.seed for r in requests]
    assert {(b["n"], b["max_tokens"], b["temperature"], b["top_p"]) for b in sent} == {
        (3, 10, 0.9, 0.9)
    }


def test_many_requests_in_parallel_keep_their_order(server: FakeOpenAI, hf: Any) -> None:
    sampling = SamplingParams(max_new_tokens=4, temperature=0.7)
    requests = [
        GenerationRequest(f"p{i}", PROMPTS[i % len(PROMPTS)], sampling, seed=i) for i in range(10)
    ]
    same(make(server, concurrency=4).generate(requests), one_by_one(hf, requests))
    assert make(server).generate([]) == []


def test_stop_strings(server: FakeOpenAI, hf: Any) -> None:
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    base = GenerationRequest("s", PROMPTS[0], greedy)
    text = hf.generate([base])[0].texts[0]
    assert len(text) >= 6, text
    stop = text[3:5]
    request = GenerationRequest("s", PROMPTS[0], SamplingParams(16, 0.0, 1.0, (stop, "zzzq")))
    got = make(server).generate([request])
    same(got, one_by_one(hf, [request]))
    assert got[0].finish_reasons == ("stop",)
    assert got[0].texts[0] == text[: text.index(stop)]
    assert server.received[-1][1]["stop"] == [stop, "zzzq"]


def test_no_stop_field_without_stop_strings(server: FakeOpenAI) -> None:
    make(server).generate([GenerationRequest("x", PROMPTS[1], SamplingParams(2, 0.0))])
    assert "stop" not in server.received[-1][1]


def test_response_prefix_prefill_matches_hf(server: FakeOpenAI, hf: Any) -> None:
    request = GenerationRequest(
        "p", PROMPTS[2], SamplingParams(8, 0.0), response_prefix="The capital"
    )
    got = make(server).generate([request])
    same(got, one_by_one(hf, [request]))
    body = server.received[-1][1]
    assert body["messages"][-1] == {"role": "assistant", "content": "The capital"}
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False


def test_response_prefix_instruct_mode(server: FakeOpenAI) -> None:
    generator = make(server, prefix_mode="instruct")
    request = GenerationRequest("i", PROMPTS[2], SamplingParams(4, 0.0), response_prefix="Paris")
    body = generator.payload(request)
    assert body["messages"][-1]["content"].endswith("Begin your answer with exactly: Paris")
    assert "continue_final_message" not in body
    got = generator.generate([request])[0]
    # The tiny random model does not follow the instruction: the text is kept, with a warning.
    assert got.warnings == ("completion 0 does not start with the response prefix",)


def test_authorization_header_carries_key_from_env(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.expected_key = SECRET
    make(server).generate([GenerationRequest("a", PROMPTS[3], SamplingParams(2, 0.0))])
    assert server.received[-1][0]["authorization"] == f"Bearer {SECRET}"


def test_no_authorization_header_without_key(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    make(server).generate([GenerationRequest("a", PROMPTS[3], SamplingParams(2, 0.0))])
    make(server, api_key_env="").generate([GenerationRequest("b", PROMPTS[3], SamplingParams(2))])
    assert all("authorization" not in headers for headers, _ in server.received)


def test_http_error_names_url_and_status_not_key(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.expected_key = "sk-some-other-key"
    generator = make(server)
    with pytest.raises(PluginError) as info:
        generator.generate([GenerationRequest("e", PROMPTS[0])])
    message = str(info.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "HTTP 401" in message and "Incorrect API key provided" in message
    assert SECRET not in message
    assert len(server.received) == 1  # 401 is not retried
    assert SECRET not in caplog.text


def test_server_echoing_the_key_is_scrubbed(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.failures.append((400, {"error": {"message": f"bad request from key {SECRET}"}}))
    with pytest.raises(PluginError, match="HTTP 400") as info:
        make(server).generate([GenerationRequest("e", PROMPTS[0], SamplingParams(2))])
    assert SECRET not in str(info.value)


def test_transient_errors_are_retried(
    server: FakeOpenAI,
    hf: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.failures += [(503, {"error": "overloaded"}), (429, {"error": {"message": "slow"}})]
    request = GenerationRequest("t", PROMPTS[1], SamplingParams(4, 0.0))
    got = make(server, max_retries=2, retry_backoff=0.0).generate([request])
    same(got, one_by_one(hf, [request]))
    assert len(server.received) == 3
    assert "HTTP 503: overloaded" in caplog.text and "HTTP 429: slow" in caplog.text
    assert SECRET not in caplog.text


def test_retries_exhausted(server: FakeOpenAI) -> None:
    server.failures += [(500, {"error": {"message": "boom"}})] * 2
    with pytest.raises(PluginError, match=r"HTTP 500: boom"):
        make(server, max_retries=1, retry_backoff=0.0).generate(
            [GenerationRequest("x", PROMPTS[0], SamplingParams(2))]
        )
    assert len(server.received) == 2


def test_connection_refused_names_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    generator = build_generator(OpenAIConfig(base_url=url, max_retries=0), model="m")
    with pytest.raises(PluginError, match="connection failed") as info:
        generator.generate([GenerationRequest("x", PROMPTS[0])])
    assert f"{url}/chat/completions" in str(info.value)


def test_wrong_number_of_choices(server: FakeOpenAI) -> None:
    server.failures.append((200, {"choices": []}))
    with pytest.raises(PluginError, match=r"returned 0 choices .* expected n=2"):
        make(server).generate([GenerationRequest("x", PROMPTS[0], SamplingParams(2), n=2)])


def test_finish_reason_mapping(server: FakeOpenAI) -> None:
    choices = [
        {"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
        {"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
        {"index": 2, "message": {"content": "c"}, "finish_reason": "stop", "stop_reason": "."},
        {"index": 3, "message": {"content": None}, "finish_reason": "content_filter"},
    ]
    server.failures.append((200, {"choices": choices}))
    got = make(server).generate([GenerationRequest("f", PROMPTS[0], SamplingParams(2), n=4)])[0]
    assert got.texts == ("a", "b", "c", "")
    assert got.finish_reasons == ("eos", "length", "stop", "stop")
    assert got.warnings == ("completion 3: the server's finish reason was 'content_filter'",)


def test_key_is_never_in_repr_config_or_logs(
    server: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, SECRET)
    generator = make(server)
    generator.generate([GenerationRequest("k", PROMPTS[0], SamplingParams(2, 0.0))])
    assert server.received[-1][0]["authorization"] == f"Bearer {SECRET}"
    for text in (
        repr(generator),
        str(vars(generator)),
        repr(generator.config),
        str(unstructure(generator.config)),
        caplog.text,
    ):
        assert SECRET not in text
    assert unstructure(generator.config)["api_key_env"] == KEY_ENV
    assert "POST http://127.0.0.1:" in caplog.text


def test_score_is_not_offered(server: FakeOpenAI) -> None:
    generator = make(server)
    assert generator.capabilities == frozenset({"seeded"})
    with pytest.raises(PluginError, match="not supported"):
        generator.score([])


def test_conformance_kit(server: FakeOpenAI) -> None:
    """caikit's conformance checks for generators, when this caikit has the kit."""
    kit = pytest.importorskip("caikit_core.testing.kit")
    if not hasattr(kit, "check_plugin"):
        pytest.skip("this caikit's conformance kit has no check_plugin")
    results = kit.check_plugin("generator", make(server, concurrency=2))
    failed = [r for r in results if r.status == "failed"]
    assert not failed, failed
    assert any(r.status == "passed" for r in results)
