"""PPO, GRPO and RLOO taking their rollouts from a generator plugin (``rl.rollouts =
"generator"``): the bundled ``hf`` generator, built through the registry, wrapped in
:class:`Recording`, which records what the optimiser asks of it and checks, after
every weight push, that its greedy output is the pushed policy's own."""

from __future__ import annotations

import importlib.util
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from caikit_core.converter import converter  # noqa: E402
from caikit_core.plugins import get_registry  # noqa: E402
from caikit_core.records import Prompt, Rollout, RolloutRequest, Sample, conversation  # noqa: E402
from caikit_core.testing.tiny_models import TINY_CORPUS, build_tiny_llama  # noqa: E402
from caikit_core.training.settings import PPOSettings  # noqa: E402
from caikit_torch.optimiser import TorchOptimiser  # noqa: E402
from caikit_torch.plugin import TorchOptimiserConfig  # noqa: E402
from caikit_torch.ppo import PPOOptions, train_ppo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [conversation(("user", text)) for text in TINY_CORPUS]
#: prompt token ids the pushed weights are probed with
PROBES = ((5, 9, 12, 7, 3), (11, 4, 8, 30))


def greedy(model: Any, prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return tuple(out[0, len(prompt) :].tolist())


class Recording:
    """The ``hf`` generator on ``model``, recording rollout requests and answers, and
    checking each pushed checkpoint: afterwards the generator's greedy rollouts equal
    transformers' greedy ``generate`` of the model in that checkpoint."""

    def __init__(self, model: Path) -> None:
        spec = get_registry().get("generator", "hf")
        assert spec.config_cls is not None
        self.inner = spec.build(spec.config_cls(device="cpu"), model=str(model))
        self.capabilities = self.inner.capabilities
        self.requests: list[list[RolloutRequest]] = []
        self.answers: list[list[Rollout]] = []
        #: per push: (generator greedy == pushed policy greedy, probes changed since start)
        self.pushes: list[tuple[bool, bool]] = []
        self.start = self._probe()

    def _probe(self) -> list[tuple[int, ...]]:
        requests = [
            RolloutRequest(f"p{i}", p, max_new_tokens=6, temperature=0.0)
            for i, p in enumerate(PROBES)
        ]
        return [r.token_ids[0] for r in self.inner.rollout(requests)]

    def rollout(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        answers: list[Rollout] = self.inner.rollout(requests)
        self.requests.append(list(requests))
        self.answers.append(answers)
        return answers

    def load_weights(self, checkpoint: Path) -> None:
        self.inner.load_weights(checkpoint)
        pushed = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        probes = self._probe()
        expected = [greedy(pushed, p, 6)[: len(got)] for p, got in zip(PROBES, probes, strict=True)]
        self.pushes.append((probes == expected, probes != self.start))


def lowercase_reward(convs: Sequence[Any], texts: Sequence[str]) -> list[float]:
    return [sum(ch in string.ascii_lowercase for ch in text) / 10 for text in texts]


def test_ppo_samples_from_the_generator_and_pushes_weights_after_each_step(
    tiny_llama: Path, tmp_path: Path
) -> None:
    gen = Recording(tiny_llama)
    settings = PPOSettings(
        steps=3,
        rollout_batch_size=4,
        mini_batch_size=4,
        epochs=2,
        learning_rate=2e-2,
        max_new_tokens=8,
        temperature=0.9,
    )
    history = train_ppo(
        str(tiny_llama),
        str(tiny_llama),
        lowercase_reward,
        PROMPTS,
        settings,
        tmp_path / "out",
        options=PPOOptions(seed=3),
        rollouts=gen,
    )
    # one rollout call per step, one request per prompt, the PPO sampling settings
    assert [len(r) for r in gen.requests] == [4, 4, 4]
    for step, requests in enumerate(gen.requests):
        assert {r.id for r in requests} == {f"{step}:{i}" for i in range(4)}
        assert all(r.max_new_tokens == 8 and r.temperature == 0.9 for r in requests)
        assert all(r.stop_token_ids == tuple(gen.inner.eos_ids) for r in requests)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    rendered = {
        tuple(
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in p],
                    tokenize=False,
                    add_generation_prompt=True,
                ),
                add_special_tokens=False,
            )["input_ids"]
        )
        for p in PROMPTS
    }
    assert all(r.prompt_ids in rendered for requests in gen.requests for r in requests)
    # PPO trained on the generator's tokens: its mean response length is theirs
    for metrics, answers in zip(history, gen.answers, strict=True):
        lengths = [len(a.token_ids[0]) for a in answers]
        assert metrics["val/response_length"] == pytest.approx(sum(lengths) / len(lengths))
    # a push after every step but the last, each making the generator the new policy
    assert [m["time/push"] > 0 for m in history] == [True, True, False]
    assert gen.pushes == [(True, True), (True, True)]
    # before the first update the policy is the reference: zero KL, as in-process
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)


class LowercasePM:
    """A stand-in preference model (the reward is not what is tested here): 0.1 per
    lowercase letter of the response."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.seen: list[Sample] = []

    def fit(self, labelled: Any, out: Path) -> Any:
        raise AssertionError("not used")

    def load(self, path: Path) -> None:
        raise AssertionError("not used")

    def score(self, samples: Sequence[Sample]) -> list[float]:
        self.seen.extend(samples)
        return lowercase_reward([s.messages for s in samples], [s.response for s in samples])


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_algorithms_sample_from_the_generator(algorithm: str, tmp_path: Path) -> None:
    base = build_tiny_llama(tmp_path / "base", seed=0)
    gen = Recording(base)
    pm = LowercasePM()
    table = {
        "steps": 2,
        "iterations": 1,
        "rollout_batch_size": 2,
        "num_generations": 2,
        "mini_batch_size": 4,
        "max_new_tokens": 6,
        "learning_rate": 5e-2,
        "max_length": 256,
    }
    config = converter.structure(
        {"device": "cpu", "algorithm": algorithm, algorithm: table}, TorchOptimiserConfig
    )
    prompts = [Prompt(f"q{i}", p) for i, p in enumerate(PROMPTS[:4])]
    TorchOptimiser(config).optimise(
        str(base), str(base), pm, prompts, [], tmp_path / "out", rollouts=gen
    )
    # two rollouts of 2 prompts x 2 generations, rewarded on the generator's texts
    assert [len(r) for r in gen.requests] == [4, 4]
    tokenizer = gen.inner.tokenizer
    texts = [
        tokenizer.decode(a.token_ids[0], skip_special_tokens=True)
        for answers in gen.answers
        for a in answers
    ]
    assert [s.response for s in pm.seen] == texts
    # the repeated prompts of a group get different seeds, so they can differ
    assert len({r.seed for r in gen.requests[0]}) == 4
    # the weights changed after the first optimiser step, once, before the 2nd rollout
    assert gen.pushes == [(True, True)]
