"""The ``hf`` generator on a tiny random Llama built in-process (no hub access)."""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_hf") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from caikit_core.errors import PluginError  # noqa: E402
from caikit_core.interfaces import Generator  # noqa: E402
from caikit_core.records import (  # noqa: E402
    GenerationRequest,
    SamplingParams,
    ScoreRequest,
    conversation,
)
from caikit_core.testing.tiny_models import build_tiny_llama  # noqa: E402
from caikit_hf.generator import HFGenerator  # noqa: E402
from caikit_hf.plugin import HFGeneratorConfig, build_generator, register_generators  # noqa: E402

SEA = conversation(("user", "Please write a short poem about the sea."))
SKY = conversation(
    ("system", "You are a careful assistant."),
    ("user", "Why is the sky blue?"),
)
UNICODE = conversation(("user", "Grüße aus Zürich! 你好, 世界 🙂 — naïve café ñ"))


def sampled(
    rid: str,
    messages: Any = SEA,
    *,
    seed: int = 0,
    n: int = 1,
    max_new_tokens: int = 12,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: tuple[str, ...] = (),
    response_prefix: str = "",
) -> GenerationRequest:
    """A generation request with the given settings."""
    return GenerationRequest(
        id=rid,
        messages=messages,
        sampling=SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop
        ),
        n=n,
        seed=seed,
        response_prefix=response_prefix,
    )


def greedy(rid: str, messages: Any = SEA, **kwargs: Any) -> GenerationRequest:
    """A greedy generation request."""
    return sampled(rid, messages, temperature=0.0, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: the tiny model gains nothing from more, and on a busy
    machine OpenMP workers waiting on each other make its many small ops crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a trained byte-level tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gen(tiny_path: Path) -> HFGenerator:
    """The generator over the tiny checkpoint, on CPU."""
    return build_generator(HFGeneratorConfig(device="cpu"), model=str(tiny_path))


def prompt_ids(g: HFGenerator, messages: Any, prefix: str = "") -> list[int]:
    """The prompt token ids as the generator builds them, computed independently."""
    text = g.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    return list(g.tokenizer(text + prefix, add_special_tokens=False)["input_ids"])


def reference_greedy(g: HFGenerator, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation token ids from transformers' own ``generate``."""
    with torch.inference_mode():
        out = g.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=g.pad_id,
            eos_token_id=sorted(g.eos_ids),
        )
    new = out[0, len(ids) :].tolist()
    return [t for t in new if t not in g.eos_ids]


@pytest.fixture
def count_forwards(gen: HFGenerator, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts calls of the model's forward (each entry: the call's sequence length)."""
    calls: list[int] = []
    original = gen.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(int(kwargs["input_ids"].shape[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(gen.model, "forward", counting)
    yield calls


# --- the builder and the plugin -------------------------------------------------------


def test_tiny_model_is_deterministic(tiny_path: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    other = build_tiny_llama(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_path / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (
        tiny_path / "model.safetensors"
    ).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_path / "tokenizer.json").read_bytes()


def test_registers_hf_with_capabilities() -> None:
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    register_generators(lambda *a, **k: calls.append((a, k)))
    [(args, kwargs)] = calls
    assert args == ("hf", build_generator)
    assert kwargs["config"] is HFGeneratorConfig
    assert set(kwargs["capabilities"]) == {"score", "seeded", "rollouts"}


def test_plugin_module_does_not_import_torch() -> None:
    code = (
        "import sys; import caikit_hf, caikit_hf.plugin; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    env_path = [str(ROOT), str(ROOT / "plugins"), *sys.path]
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}; {code}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float64"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"truncation": "right"}, "truncation"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_context": 1}, "max_context"),
        ({"chat_template": ""}, "chat_template"),
        ({"trust_remote_code": "yes"}, "trust_remote_code"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    from caikit_core.converter import InvalidValue, describe_error, structure

    with pytest.raises(InvalidValue) as err:
        HFGeneratorConfig(**kwargs)
    assert err.value.field == message
    with pytest.raises(Exception) as from_file:
        structure(kwargs, HFGeneratorConfig)
    (line,) = describe_error(from_file.value, prefix="generator")
    assert line.startswith(f"generator.{message}: expected ")


def test_config_defaults() -> None:
    config = HFGeneratorConfig()
    assert config.trust_remote_code is False
    assert config.truncation == "left"
    HFGeneratorConfig(device="cuda:1", dtype="bfloat16", truncation="skip", max_context=64)


def test_satisfies_generator_protocol(gen: HFGenerator) -> None:
    from caikit_core.interfaces import RolloutGenerator
    from caikit_core.plugins import get_registry

    assert isinstance(gen, Generator) and isinstance(gen, RolloutGenerator)
    assert gen.capabilities == frozenset({"score", "seeded", "rollouts"})
    assert get_registry().get("generator", "hf").capabilities == gen.capabilities
    assert gen.dtype == torch.float32


def test_trust_remote_code_passed_as_false(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    build_generator(HFGeneratorConfig(device="cpu"), model=str(tiny_path))
    assert len(seen) == 2
    assert all(kwargs["trust_remote_code"] is False for kwargs in seen)


def test_a_pickle_only_model_folder_is_refused_unless_allowed(
    tiny_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder whose weights are only ``pytorch_model.bin`` is refused naming the file;
    ``allow_pickle = true`` loads it (logged); the same weights as safetensors load
    without it; weights are asked for as safetensors (``use_safetensors=True``)."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_path, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(PluginError) as info:
        build_generator(HFGeneratorConfig(device="cpu"), model=str(folder))
    assert str(info.value) == (
        f"hf generator: {folder} holds its weights only as pickle (pytorch_model.bin), which "
        "can run code when loaded; convert it to safetensors, or set allow_pickle = true in "
        "the plugin's table of the run file for a checkpoint you trust"
    )
    with caplog.at_level("WARNING", logger="caikit"):
        gen = build_generator(HFGeneratorConfig(device="cpu", allow_pickle=True), model=str(folder))
    assert isinstance(gen, HFGenerator)
    assert f"loading pickle weights pytorch_model.bin from {folder} (allow_pickle = true)" in (
        caplog.text
    )


def test_weights_are_read_from_safetensors_only_and_trust_remote_code_is_logged(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[dict[str, Any]] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with caplog.at_level("WARNING", logger="caikit"):
        build_generator(HFGeneratorConfig(device="cpu"), model=str(tiny_path))
    assert seen[-1]["use_safetensors"] is True
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level("WARNING", logger="caikit"):
        trusting = HFGeneratorConfig(device="cpu", trust_remote_code=True)
        build_generator(trusting, model=str(tiny_path))
    assert seen[-1]["trust_remote_code"] is True
    assert (
        "hf generator: trust_remote_code = true: transformers may run code shipped with "
        f"{tiny_path}" in caplog.text
    )


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(PluginError, match="does not exist") as info:
        build_generator(HFGeneratorConfig(device="cpu"), model=str(missing))
    assert str(missing) in str(info.value)


def test_folder_without_tokenizer_names_the_path(tiny_path: Path, tmp_path: Path) -> None:
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_path / name, bare / name)
    with pytest.raises(PluginError, match="tokenizer") as info:
        build_generator(HFGeneratorConfig(device="cpu"), model=str(bare))
    assert str(bare) in str(info.value)


# --- generation -----------------------------------------------------------------------


def test_empty_batch_does_not_touch_the_model(gen: HFGenerator, count_forwards: list[int]) -> None:
    assert gen.generate([]) == []
    assert gen.score([]) == []
    assert count_forwards == []


def test_n_completions_per_request_in_order(gen: HFGenerator) -> None:
    requests = [sampled("a", n=3), sampled("b", SKY, n=1), sampled("c", n=0), sampled("d", n=2)]
    out = gen.generate(requests)
    assert [g.request_id for g in out] == ["a", "b", "c", "d"]
    assert [len(g.texts) for g in out] == [3, 1, 0, 2]
    assert [len(g.finish_reasons) for g in out] == [3, 1, 0, 2]
    assert all(r in {"eos", "length", "stop"} for g in out for r in g.finish_reasons)


def test_seeds(gen: HFGenerator) -> None:
    first = gen.generate([sampled("a", seed=7, n=3)])[0]
    again = gen.generate([sampled("a", seed=7, n=3)])[0]
    other = gen.generate([sampled("a", seed=8, n=3)])[0]
    assert first.texts == again.texts
    assert first.texts != other.texts
    assert len(set(first.texts)) == 3  # the n samples of one request differ


def test_sampling_independent_of_batch_composition(gen: HFGenerator, tiny_path: Path) -> None:
    requests = [
        sampled("a", seed=1, n=2),
        sampled("b", SKY, seed=2, temperature=0.7, top_p=0.9, max_new_tokens=9),
        greedy("c", UNICODE, max_new_tokens=7),
        sampled("d", SKY, seed=1, n=3, temperature=1.3, top_p=0.5, max_new_tokens=15),
        sampled("e", seed=5, max_new_tokens=4, response_prefix="Sure,"),
    ]
    together = gen.generate(requests)
    alone = [gen.generate([r])[0] for r in requests]
    assert together == alone
    reversed_ = gen.generate(list(reversed(requests)))
    assert list(reversed(reversed_)) == together
    small = build_generator(HFGeneratorConfig(device="cpu", max_batch_size=2), model=str(tiny_path))
    assert small.generate(requests) == together


def test_greedy_batch_equals_one_by_one_and_transformers(gen: HFGenerator) -> None:
    requests = [
        greedy("a", max_new_tokens=10),
        greedy("b", SKY, max_new_tokens=6),
        greedy("c", UNICODE, max_new_tokens=10),
        greedy("d", conversation(("user", "hi")), max_new_tokens=10),
    ]
    together = gen.generate(requests)
    assert together == [gen.generate([r])[0] for r in requests]
    for request, generation in zip(requests, together, strict=True):
        ids = prompt_ids(gen, request.messages)
        expected = reference_greedy(gen, ids, request.sampling.max_new_tokens)
        assert generation.texts[0] == gen.tokenizer.decode(expected, skip_special_tokens=True)


def test_max_new_tokens_respected(gen: HFGenerator, count_forwards: list[int]) -> None:
    for budget in (1, 5):
        count_forwards.clear()
        out = gen.generate(
            [greedy("a", max_new_tokens=budget), sampled("b", max_new_tokens=budget)]
        )
        assert [g.finish_reasons for g in out] == [("length",), ("length",)]
        # The prefill picks the first token, each further step one more: no extra pass.
        assert len(count_forwards) == budget
        assert all(length == 1 for length in count_forwards[1:])
        ids = prompt_ids(gen, SEA)
        expected = reference_greedy(gen, ids, budget)
        assert len(expected) == budget
        assert out[0].texts[0] == gen.tokenizer.decode(expected, skip_special_tokens=True)
    zero = gen.generate([greedy("z", max_new_tokens=0)])[0]
    assert zero.texts == ("",)
    assert zero.finish_reasons == ("length",)


def test_stop_strings(gen: HFGenerator, count_forwards: list[int]) -> None:
    base = gen.generate([sampled("a", seed=3, max_new_tokens=24)])[0].texts[0]
    stop = next(
        base[i : i + 2]
        for i in range(3, len(base) - 2)
        if "\ufffd" not in base[i : i + 2] and base.find(base[i : i + 2]) == i
    )
    count_forwards.clear()
    stopped = gen.generate([sampled("a", seed=3, max_new_tokens=24, stop=("zzzq", stop))])[0]
    assert stopped.texts[0] == base[: base.index(stop)]
    assert stopped.finish_reasons == ("stop",)
    assert len(count_forwards) < 24  # stopped early


def test_unicode_prompts_and_prefix(gen: HFGenerator) -> None:
    out = gen.generate([greedy("u", UNICODE, n=2, response_prefix="Ça va — 好")])[0]
    assert len(out.texts) == 2 and out.texts[0] == out.texts[1]
    assert all(isinstance(t, str) for t in out.texts)


def test_response_prefix_is_honoured(gen: HFGenerator) -> None:
    prefix = "The sea is"
    out = gen.generate([greedy("p", max_new_tokens=8, response_prefix=prefix)])[0]
    expected = reference_greedy(gen, prompt_ids(gen, SEA, prefix), 8)
    assert out.texts[0] == gen.tokenizer.decode(expected, skip_special_tokens=True)
    plain = gen.generate([greedy("p", max_new_tokens=8)])[0]
    assert out.texts != plain.texts


def test_over_long_prompt_left_truncated(tiny_path: Path) -> None:
    g = build_generator(HFGeneratorConfig(device="cpu", max_context=64), model=str(tiny_path))
    long = conversation(("user", "the sea is wide and deep " * 20))
    short = sampled("short", SKY, seed=4, max_new_tokens=6, n=2)
    out = g.generate([sampled("long", long, n=2, max_new_tokens=8), short])
    assert len(out[0].texts) == 2
    assert len(out[0].warnings) == 1 and "left-truncated" in out[0].warnings[0]
    assert out[1] == g.generate([short])[0]
    assert out[1].warnings == ()


def test_over_long_prompt_skipped(tiny_path: Path) -> None:
    config = HFGeneratorConfig(device="cpu", max_context=48, truncation="skip")
    g = build_generator(config, model=str(tiny_path))
    long = conversation(("user", "the sea is wide and deep " * 20))
    out = g.generate([sampled("long", long, n=2), sampled("ok", SKY, max_new_tokens=5)])
    assert out[0].texts == ("", "")
    assert out[0].finish_reasons == ("skipped", "skipped")
    assert len(out[0].warnings) == 1 and "exceeds the context" in out[0].warnings[0]
    assert len(out[1].texts) == 1 and out[1].warnings == ()


def test_invalid_sampling_settings_raise(gen: HFGenerator) -> None:
    with pytest.raises(PluginError, match="top_p"):
        gen.generate([sampled("bad", top_p=0.0)])
    with pytest.raises(PluginError, match="temperature"):
        gen.generate([sampled("bad", temperature=-1.0)])


# --- scoring --------------------------------------------------------------------------


def manual_logprob(g: HFGenerator, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context), one full forward pass per continuation token."""
    total = 0.0
    with torch.inference_mode():
        for j, token in enumerate(continuation):
            ids = torch.tensor([context + continuation[:j]])
            logits = g.model(input_ids=ids).logits[0, -1].float()
            total += float(torch.log_softmax(logits, dim=-1)[token])
    return total


def test_score_matches_step_by_step(gen: HFGenerator, count_forwards: list[int]) -> None:
    requests = [
        ScoreRequest("s1", SEA, ("The sea is wide.", " and", "", "海 🙂")),
        ScoreRequest("s2", SKY, ("Because of scattering.",), response_prefix="Answer:"),
        ScoreRequest("s3", UNICODE, ()),
    ]
    scores = gen.score(requests)
    assert len(count_forwards) == 1  # one forward pass for the whole (micro)batch
    assert [s.request_id for s in scores] == ["s1", "s2", "s3"]
    assert scores[2].logprobs == () and scores[2].token_counts == ()
    for request, score in zip(requests, scores, strict=True):
        context = prompt_ids(gen, request.messages, request.response_prefix)
        for text, logprob, count in zip(
            request.continuations, score.logprobs, score.token_counts, strict=True
        ):
            continuation = list(gen.tokenizer(text, add_special_tokens=False)["input_ids"])
            assert count == len(continuation)
            assert math.isfinite(logprob) and logprob <= 0.0
            assert logprob == pytest.approx(manual_logprob(gen, context, continuation), abs=1e-4)
    assert scores[0].logprobs[2] == 0.0 and scores[0].token_counts[2] == 0


def test_score_independent_of_batching(gen: HFGenerator, tiny_path: Path) -> None:
    requests = [
        ScoreRequest("a", SEA, ("one", "two three four five", "six")),
        ScoreRequest("b", SKY, ("seven eight",), response_prefix="Hm,"),
    ]
    together = gen.score(requests)
    small = build_generator(HFGeneratorConfig(device="cpu", max_batch_size=1), model=str(tiny_path))
    for whole, split in zip(together, small.score(requests), strict=True):
        assert whole.token_counts == split.token_counts
        assert whole.logprobs == pytest.approx(split.logprobs, abs=1e-4)


def test_greedy_token_scores_highest(gen: HFGenerator) -> None:
    text = gen.generate([greedy("g", max_new_tokens=1)])[0].texts[0]
    assert len(gen.tokenizer(text, add_special_tokens=False)["input_ids"]) == 1
    singles = [
        word
        for word in (gen.tokenizer.decode([t]) for t in range(300, 360))
        if word != text and len(gen.tokenizer(word, add_special_tokens=False)["input_ids"]) == 1
    ]
    assert len(singles) > 20
    [score] = gen.score([ScoreRequest("g", SEA, (text, *singles))])
    assert set(score.token_counts) == {1}
    assert score.logprobs[0] >= max(score.logprobs[1:])


# --- rollouts (the ``rollouts`` capability) -------------------------------------------


def test_rollout_greedy_matches_generate_and_keeps_the_stop_token(gen: HFGenerator) -> None:
    from caikit_core.records import RolloutRequest

    ids = prompt_ids(gen, SEA)
    expected = reference_greedy(gen, ids, 12)
    [out] = gen.rollout([RolloutRequest("r", tuple(ids), max_new_tokens=12, temperature=0.0)])
    assert out.request_id == "r" and list(out.token_ids[0]) == expected
    stop = expected[3]
    cut = expected[: expected.index(stop) + 1]
    [out] = gen.rollout(
        [
            RolloutRequest(
                "s", tuple(ids), max_new_tokens=12, temperature=0.0, n=2, stop_token_ids=(stop,)
            )
        ]
    )
    assert [list(t) for t in out.token_ids] == [cut, cut]  # the stop token is kept


def test_rollout_samples_are_seeded_per_request_not_per_batch(gen: HFGenerator) -> None:
    from caikit_core.records import RolloutRequest

    ids = tuple(prompt_ids(gen, SEA))
    other = tuple(prompt_ids(gen, SKY))

    def req(rid: str, prompt: tuple[int, ...], seed: int) -> RolloutRequest:
        return RolloutRequest(rid, prompt, max_new_tokens=10, temperature=1.0, n=3, seed=seed)

    [alone] = gen.rollout([req("a", ids, 7)])
    batch = gen.rollout([req("b", other, 1), req("a", ids, 7), req("c", other, 2)])
    assert batch[1].token_ids == alone.token_ids
    assert len(set(alone.token_ids)) == 3  # three samples, three sequences
    assert gen.rollout([req("a", ids, 8)])[0].token_ids != alone.token_ids
    with pytest.raises(PluginError, match="rollout 'x': needs a prompt"):
        gen.rollout([RolloutRequest("x", (), max_new_tokens=4)])
    with pytest.raises(PluginError, match="exceeds the context"):
        gen.rollout([RolloutRequest("y", ids, max_new_tokens=10**6)])


def test_load_weights_makes_the_generator_follow_new_weights(
    tiny_path: Path, tmp_path: Path
) -> None:
    from caikit_core.records import RolloutRequest

    g = build_generator(HFGeneratorConfig(device="cpu"), model=str(tiny_path))
    ids = prompt_ids(g, SEA)
    request = RolloutRequest("r", tuple(ids), max_new_tokens=12, temperature=0.0)
    before = g.rollout([request])[0].token_ids[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "updated")
    g.load_weights(tmp_path / "updated")
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=g.pad_id
        )
    expected = tuple(out[0, len(ids) :].tolist())
    after = g.rollout([request])[0].token_ids[0]
    assert after == expected[: len(after)] and after != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(PluginError, match=r"no \*\.safetensors weights in .*empty"):
        g.load_weights(tmp_path / "empty")
    other = build_tiny_llama(tmp_path / "wider", hidden_size=64)
    with pytest.raises(PluginError, match=r"cannot load the weights in .*wider"):
        g.load_weights(other)


# --- through a run ---------------------------------------------------------------------


def test_skipped_prompts_are_counted_in_the_responses_summary(
    tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prompt that leaves no room for max_new_tokens is skipped by the generator with
    the reason in its warnings; the run's summary and the stage's manifest say so."""
    import json

    from caikit_core.cli import main

    short = [f"Why is the sky blue, question {i}?" for i in range(3)]
    long = [f"question {i}: " + "the sea is wide and deep " * 12 for i in (1, 2)]
    (tmp_path / "prompts.txt").write_text("\n".join(short + long) + "\n", encoding="utf-8")
    run = tmp_path / "run.toml"
    run.write_text(
        f"""output_dir = "out"
phases = ["sl"]
[models]
policy = "{tiny_path}"
[data]
prompts = "prompts.txt"
[generator]
plugin = "hf"
device = "cpu"
max_context = 64
truncation = "skip"
[critic]
plugin = "constitutional"
revisions = 1
max_new_tokens = 4
[sl]
sft = false
[sl.sampling]
max_new_tokens = 8
""",
        encoding="utf-8",
    )
    assert main(["run", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    (folder,) = (tmp_path / "out" / "stages" / "responses").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["rows"] == 5 and sum(n for _, n in manifest["warnings"]) == 2
    (message, count), *_ = manifest["warnings"]
    assert message.startswith("skipped: prompt of ")
    assert message.endswith(" tokens plus max_new_tokens=8 exceeds the context of 64 tokens")
    (line,) = [ln for ln in out.splitlines() if ln.startswith("responses: ")]
    assert line.startswith(
        f"responses: 5 record(s), 2 generator warning(s): {message!r} (x{count})"
    )
    assert line.endswith(f"(all in {folder / 'manifest.json'})")
    # the critic drives the same generator: its skipped requests are counted in revisions
    (line,) = [ln for ln in out.splitlines() if ln.startswith("revisions: ")]
    assert " generator warning(s): 'skipped: prompt of " in line
