"""The ``torch`` preference model and the ``torch`` optimiser's RL-CAI algorithms.

Everything runs on tiny random Llamas (no hub access) on one CPU thread.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

import caikit_torch.plugin as torch_plugin  # noqa: E402
from caikit_core import plugins  # noqa: E402
from caikit_core.converter import converter, describe_error  # noqa: E402
from caikit_core.errors import CaikitError, TrainingStopped  # noqa: E402
from caikit_core.interfaces import PolicyOptimiser, PreferenceModel  # noqa: E402
from caikit_core.records import (  # noqa: E402
    Comparison,
    Conversation,
    LabelledComparison,
    PreferenceLabel,
    Prompt,
    Sample,
    conversation,
    stable_id,
)
from caikit_core.testing.tiny_models import build_tiny_llama  # noqa: E402
from caikit_core.training.data import dpo_pairs  # noqa: E402
from caikit_torch.common import RL_RECORD, KLGuard  # noqa: E402
from caikit_torch.dpo import derived_label_smoothing  # noqa: E402
from caikit_torch.group import preference_reward_function  # noqa: E402
from caikit_torch.optimiser import TorchOptimiser  # noqa: E402
from caikit_torch.plugin import TorchOptimiserConfig, TorchPreferenceConfig  # noqa: E402
from caikit_torch.reward import (  # noqa: E402
    PM_RECORD,
    TorchPreferenceModel,
    preference_metrics,
    soft_label_loss,
)

#: The marker word a preferred response contains (labelled P = 0.9 in its favour).
MARKER = "please"
WORDS = ("the", "sky", "is", "blue", "water", "boils", "good", "morning", "bread", "sea", "waves")
QUESTIONS = ("Say something.", "Tell me about the sea.", "What is bread?", "Hello there!")

FRANCE = conversation(("user", "What is the capital of France?"))
GOOD = "The capital of France is Paris."
BAD = "I would rather not help with that."

#: DPO does not use the preference model.
NO_REWARD: Any = None

PM_FAST: dict[str, Any] = {"learning_rate": 3e-3, "epochs": 4.0, "batch_size": 8, "device": "cpu"}
#: Quick settings of every algorithm's table.
RL_FAST: dict[str, Any] = {"learning_rate": 1e-2, "max_length": 256}


def rl_config(algorithm: str, table: dict[str, Any], **options: Any) -> TorchOptimiserConfig:
    """CPU settings running ``algorithm`` with its table = ``RL_FAST`` + ``table``."""
    data = {"algorithm": algorithm, algorithm: {**RL_FAST, **table}, **options}
    config: TorchOptimiserConfig = converter.structure(
        {"device": "cpu", "lora_dropout": 0.0, **data}, TorchOptimiserConfig
    )
    return config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def labelled(cid: str, messages: Conversation, a: str, b: str, p_a: float) -> LabelledComparison:
    comparison = Comparison(cid, f"p-{cid}", messages, a, b)
    return LabelledComparison(comparison, PreferenceLabel(f"l-{cid}", cid, p_a, "test"))


def marker_set(n: int, seed: int, tag: str) -> list[LabelledComparison]:
    """Pairs of random-word responses; the one with the marker word is preferred at 0.9."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = conversation(("user", rng.choice(QUESTIONS)))
        a = " ".join(rng.choice(WORDS) for _ in range(6))
        b = " ".join(rng.choice(WORDS) for _ in range(6))
        a_wins = rng.random() < 0.5
        a, b = (f"{a} {MARKER}", b) if a_wins else (a, f"{b} {MARKER}")
        out.append(labelled(f"{tag}{i}", messages, a, b, 0.9 if a_wins else 0.1))
    return out


@pytest.fixture(scope="module")
def fitted(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TorchPreferenceModel, Any, Path]:
    """A preference model fitted on 48 marker pairs: (model, report, saved folder)."""
    out = tmp_path_factory.mktemp("pm") / "artifact"
    pm = TorchPreferenceModel(TorchPreferenceConfig(max_length=128, **PM_FAST), str(base))
    report = pm.fit(marker_set(48, seed=0, tag="t"), out)
    return pm, report, out


def samples_of(items: Sequence[LabelledComparison]) -> list[Sample]:
    return [
        Sample(f"s{k}-{i}", lc.comparison.prompt_id, lc.comparison.messages, text)
        for i, lc in enumerate(items)
        for k, text in enumerate((lc.comparison.response_a, lc.comparison.response_b))
    ]


def logprob(folder: Path, messages: Conversation, text: str) -> float:
    """log P(text | messages) under the causal LM in ``folder``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    turns = [{"role": m.role, "content": m.content} for m in messages]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*turns, {"role": "assistant", "content": text}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
    picked = logprobs.gather(1, ids[0, 1:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1 :].sum())


# --- the soft-label loss and metrics --------------------------------------------------


def test_soft_label_loss_hand_numbers() -> None:
    margin = torch.tensor([0.0, 0.0, math.log(4.0), 30.0, -2.0], requires_grad=True)
    p_a = torch.tensor([0.8, 1.0, 0.8, 1.0, 0.0])
    loss = soft_label_loss(margin, p_a)
    entropy_08 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))  # sigmoid(ln 4) = 0.8
    expected = [math.log(2.0), math.log(2.0), entropy_08, 0.0, math.log1p(math.exp(-2.0))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(loss[0], margin)
    assert float(grad[0]) == pytest.approx(0.5 - 0.8)  # sigmoid(m) - p_a


def test_preference_metrics_hand_numbers() -> None:
    margins = [math.log(9.0), -1.0, 2.0, 0.5]
    p_a = [0.9, 0.2, 0.5, 0.3]
    m = preference_metrics(margins, p_a)
    assert m["examples"] == 4
    assert m["accuracy"] == pytest.approx(2 / 3)  # the tie (p_a = 0.5) is left out
    q = [1 / (1 + math.exp(-x)) for x in margins]
    assert m["brier"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(q, p_a, strict=True)) / 4)
    # bins of width 0.2: q = 0.9 -> 4, 0.269 -> 1, 0.881 -> 4, 0.622 -> 3
    ece = (2 / 4) * abs((q[0] + q[2]) / 2 - (0.9 + 0.5) / 2)
    ece += (1 / 4) * abs(q[1] - 0.2) + (1 / 4) * abs(q[3] - 0.3)
    assert m["calibration"] == pytest.approx(ece)
    loss = float(soft_label_loss(torch.tensor(margins), torch.tensor(p_a)).mean())
    assert m["loss"] == pytest.approx(loss)
    assert "accuracy" not in preference_metrics([1.0], [0.5])
    assert preference_metrics([], []) == {"examples": 0.0}


# --- config and registration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options", "line"),
    [
        (TorchPreferenceConfig, {"learning_rate": 0}, "pm.learning_rate: expected a number > 0"),
        (TorchPreferenceConfig, {"eval_fraction": 0.9}, "pm.eval_fraction: expected a number in"),
        (TorchPreferenceConfig, {"dtype": "half"}, "pm.dtype: expected one of 'auto'"),
        (
            TorchOptimiserConfig,
            {"ppo": {"kl_coef": 0}},
            "pm.ppo.kl_coef: expected a number > 0, found 0",
        ),
        (TorchOptimiserConfig, {"dpo": {"beta": 0}}, "pm.dpo.beta: expected a number > 0, found 0"),
        (
            TorchOptimiserConfig,
            {"grpo": {"num_generations": 1}},
            "pm.grpo.num_generations: expected an integer >= 2, found 1",
        ),
        (TorchOptimiserConfig, {"ppo": {"lam": 2.0}}, "pm.ppo.lam: expected a number in [0, 1]"),
        (
            TorchOptimiserConfig,
            {"rloo": {"kl_bound": -1.0}},
            "pm.rloo.kl_bound: expected a number > 0",
        ),
        (TorchOptimiserConfig, {"dpo": {"loss": "kto"}}, "pm.dpo.loss: expected one of 'sigmoid'"),
        (TorchOptimiserConfig, {"algorithm": "a2c"}, "pm.algorithm: expected one of 'ppo', 'dpo'"),
        (
            TorchOptimiserConfig,
            {"dpo": {"label_smoothing": 0.1}},
            "pm.dpo.label_smoothing: applies only with loss = 'robust' or 'exo_pair'",
        ),
        (
            TorchOptimiserConfig,
            {"dpo": {"label_smoothing": 0.5, "loss": "robust"}},
            "pm.dpo.label_smoothing: expected a number in [0, 0.5)",
        ),
        (
            TorchOptimiserConfig,
            {"ppo_steps": 2},
            "pm.ppo_steps: moved to policy_optimiser.ppo.steps, policy_optimiser.rloo.steps, "
            "policy_optimiser.grpo.steps",
        ),
        (
            TorchOptimiserConfig,
            {"kl_coef": 0.1},
            "pm.kl_coef: moved to policy_optimiser.ppo.kl_coef, policy_optimiser.dpo.beta, "
            "policy_optimiser.rloo.beta, policy_optimiser.grpo.beta",
        ),
        (
            TorchOptimiserConfig,
            {"dpo_loss": "ipo"},
            "pm.dpo_loss: moved to policy_optimiser.dpo.loss",
        ),
    ],
)
def test_config_errors_name_the_key(cls: type, options: dict[str, Any], line: str) -> None:
    with pytest.raises(Exception) as info:
        converter.structure(options, cls)
    problems = describe_error(info.value, prefix="pm")
    assert len(problems) == 1 and problems[0].startswith(line), problems


def test_rl_config_defaults() -> None:
    config = converter.structure(
        {"algorithm": "grpo", "grpo": {"kl_bound": 8}}, TorchOptimiserConfig
    )
    assert config.grpo.kl_bound == 8.0 and config.grpo.beta == 0.05
    assert config.grpo.num_generations == 4 and config.rl_settings() is config.grpo
    assert config.dpo.loss == "sigmoid" and config.dpo.label_smoothing is None
    robust = converter.structure(
        {"dpo": {"loss": "robust", "label_smoothing": 0.1}}, TorchOptimiserConfig
    )
    assert robust.dpo.label_smoothing == 0.1


def test_two_phases_take_their_own_learning_rates() -> None:
    config = converter.structure(
        {"sft": {"learning_rate": 1e-4}, "ppo": {"learning_rate": 3e-6}}, TorchOptimiserConfig
    )
    assert (config.sft.learning_rate, config.ppo.learning_rate) == (1e-4, 3e-6)
    assert config.dpo.learning_rate == 2e-5 and config.dpo.beta == 0.05  # untouched defaults


def test_registers_both_roles() -> None:
    manager = plugins.PluginManager()
    manager.register(torch_plugin, "torch")
    optimiser = manager.registry.get("policy_optimiser", "torch")
    assert optimiser.capabilities == frozenset(
        {"sft", "ppo", "preference-loss", "generator-rollouts", "resumable"}
    )
    assert isinstance(optimiser.build(TorchOptimiserConfig()), PolicyOptimiser)
    pm_spec = manager.registry.get("preference_model", "torch")
    assert pm_spec.config_cls is TorchPreferenceConfig and pm_spec.capabilities == {"resumable"}
    pm = pm_spec.build(TorchPreferenceConfig(), model="trunk")
    assert isinstance(pm, TorchPreferenceModel) and isinstance(pm, PreferenceModel)


# --- the preference model -------------------------------------------------------------


def test_pm_fits_soft_labels(fitted: tuple[TorchPreferenceModel, Any, Path]) -> None:
    pm, report, out = fitted
    metrics = report.metrics
    assert report.path == str(out)
    assert metrics["examples"] == 48 and metrics["ties"] == 0 and metrics["truncated"] == 0
    assert metrics["accuracy"] > 0.9
    assert metrics["loss"] < metrics["loss_first"]
    # the labels' own entropy (p = 0.9) is the least loss a calibrated model can reach
    floor = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert floor - 1e-6 <= metrics["loss"] < math.log(2.0)
    assert 0.0 <= metrics["calibration"] < 0.2 and 0.0 <= metrics["brier"] < 0.1
    held_out = pm.evaluate(marker_set(32, seed=1, tag="h"))
    assert held_out["examples"] == 32 and held_out["accuracy"] > 0.9
    print("pm train", metrics, "held out", held_out)


def test_pm_saves_a_plain_checkpoint(fitted: tuple[TorchPreferenceModel, Any, Path]) -> None:
    _, report, out = fitted
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1
    record = json.loads((out / PM_RECORD).read_text())
    assert record["metrics"] == report.metrics and record["config"]["epochs"] == 4.0


def test_pm_scores_are_deterministic_and_survive_reload(
    fitted: tuple[TorchPreferenceModel, Any, Path],
) -> None:
    pm, _, out = fitted
    samples = samples_of(marker_set(12, seed=2, tag="d"))
    first = pm.score(samples)
    assert len(first) == len(samples) and all(isinstance(x, float) for x in first)
    assert pm.score(samples) == first
    assert pm.score([]) == []
    loaded = TorchPreferenceModel(TorchPreferenceConfig(device="cpu", batch_size=8), "unused")
    loaded.load(out)
    assert loaded.score(samples) == first
    assert loaded.metrics["accuracy"] > 0.9  # read back from the record
    # the marker decides: every response with it outscores its partner
    for i in range(0, len(samples), 2):
        a, b = samples[i], samples[i + 1]
        assert (first[i] > first[i + 1]) == (MARKER in a.response), (a.response, b.response)


def test_pm_eval_fraction_holds_out_by_id(base: Path, tmp_path: Path) -> None:
    config = TorchPreferenceConfig(max_steps=1, eval_fraction=0.25, **PM_FAST)
    report = TorchPreferenceModel(config, str(base)).fit(marker_set(16, 3, "e"), tmp_path / "o")
    held = report.metrics["eval_examples"]
    assert 0 < held < 16 and report.metrics["examples"] == 16 - held
    assert {"eval_loss", "eval_calibration", "eval_brier"} <= set(report.metrics)


def test_pm_reports_its_loss_per_step_as_history(base: Path, tmp_path: Path) -> None:
    pm = TorchPreferenceModel(TorchPreferenceConfig(max_steps=2, **PM_FAST), str(base))
    report = pm.fit(marker_set(8, 5, "h"), tmp_path / "o")
    assert [row["step"] for row in report.history] == [1.0, 2.0]
    assert [(int(r["step"]), r["loss"]) for r in report.history] == pm.losses
    assert all(math.isfinite(r["loss"]) for r in report.history)


def test_pm_report_to_tensorboard_writes_event_files_into_the_checkpoint(
    base: Path, tmp_path: Path
) -> None:
    if not any(importlib.util.find_spec(n) for n in ("tensorboard", "tensorboardX")):
        pytest.skip("neither tensorboard nor tensorboardX is installed")
    config = TorchPreferenceConfig(max_steps=2, report_to=("tensorboard",), **PM_FAST)
    TorchPreferenceModel(config, str(base)).fit(marker_set(8, 6, "t"), tmp_path / "o")
    events = list((tmp_path / "o" / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert b"loss" in events[0].read_bytes()  # the logged training loss


def test_pm_non_finite_loss_stops_naming_the_batch(base: Path, tmp_path: Path) -> None:
    items = marker_set(4, seed=4, tag="n")
    items[2] = labelled("bad-one", items[2].comparison.messages, "x", "y", float("nan"))
    config = TorchPreferenceConfig(max_steps=2, **{**PM_FAST, "batch_size": 4})
    with pytest.raises(TrainingStopped, match=r"non-finite loss \(nan\) at step 1") as info:
        TorchPreferenceModel(config, str(base)).fit(items, tmp_path / "o")
    assert "bad-one" in str(info.value) and "n0" in str(info.value)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_pm_refuses_bad_input(base: Path, tmp_path: Path) -> None:
    pm = TorchPreferenceModel(TorchPreferenceConfig(device="cpu"), str(base))
    with pytest.raises(CaikitError, match="no labelled comparisons"):
        pm.fit([], tmp_path / "o")
    with pytest.raises(CaikitError, match=r"in \[0, 1\]; found c9 \(p_a=1\.5\)"):
        pm.fit([labelled("c9", FRANCE, GOOD, BAD, 1.5)], tmp_path / "o")
    with pytest.raises(CaikitError, match="neither fitted nor loaded"):
        pm.score([Sample("s", "p", FRANCE, GOOD)])
    missing = TorchPreferenceModel(TorchPreferenceConfig(device="cpu"), str(tmp_path / "none"))
    with pytest.raises(CaikitError, match=r"trunk folder .* does not exist"):
        missing.fit([labelled("c1", FRANCE, GOOD, BAD, 0.9)], tmp_path / "o")


# --- DPO ------------------------------------------------------------------------------


def test_dpo_pairs_follow_the_soft_labels() -> None:
    items = [
        labelled("a", FRANCE, GOOD, BAD, 0.8),
        labelled("b", FRANCE, BAD, GOOD, 0.3),
        labelled("c", FRANCE, GOOD, BAD, 0.5),
        labelled("d", FRANCE, GOOD, GOOD, 0.9),
    ]
    pairs = dpo_pairs(items)
    assert (pairs.ties, pairs.identical, len(pairs.examples)) == (1, 1, 2)
    assert pairs.examples[0] == {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    }
    assert pairs.examples[1]["chosen"][0]["content"] == GOOD  # B preferred at p_a = 0.3
    assert pairs.label_noise == pytest.approx(0.25)
    assert derived_label_smoothing(pairs) == pytest.approx(0.25)
    assert derived_label_smoothing(dpo_pairs([labelled("e", FRANCE, GOOD, BAD, 1.0)])) == 1e-3
    with pytest.raises(CaikitError, match="comparison x has label p_a = nan"):
        dpo_pairs([labelled("x", FRANCE, GOOD, BAD, float("nan"))])


def test_dpo_moves_the_policy_toward_chosen(base: Path, tmp_path: Path) -> None:
    items = [labelled(f"g{i}", FRANCE, GOOD, BAD, 0.9) for i in range(3)]
    items += [labelled(f"r{i}", FRANCE, BAD, GOOD, 0.2) for i in range(3)]
    items += [labelled("tie", FRANCE, GOOD, BAD, 0.5)]
    config = rl_config("dpo", {"beta": 0.5, "max_steps": 4, "batch_size": 3})
    out = tmp_path / "dpo"
    report = TorchOptimiser(config).optimise(str(base), str(base), NO_REWARD, [], items, out)
    m = report.metrics
    assert (m["pairs"], m["ties"], m["identical"], m["too_long"]) == (6, 1, 0, 0)
    assert m["steps"] == 4 and m["beta"] == 0.5 and m["label_smoothing"] == 0.0
    before = logprob(base, FRANCE, GOOD) - logprob(base, FRANCE, BAD)
    after = logprob(out, FRANCE, GOOD) - logprob(out, FRANCE, BAD)
    print("dpo margin", before, "->", after, m)
    assert after > before + 1.0
    assert m["loss_last"] < m["loss_first"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    record = json.loads((out / RL_RECORD).read_text())
    assert record["algorithm"] == "dpo" and record["metrics"] == m
    assert any("loss" in h for h in record["history"])


def test_dpo_robust_loss_derives_label_smoothing(base: Path, tmp_path: Path) -> None:
    items = [labelled("a", FRANCE, GOOD, BAD, 0.9), labelled("b", FRANCE, BAD, GOOD, 0.3)]
    config = rl_config("dpo", {"loss": "robust", "max_steps": 1, "batch_size": 2})
    report = TorchOptimiser(config).optimise(str(base), str(base), NO_REWARD, [], items, tmp_path)
    assert report.metrics["label_smoothing"] == pytest.approx(0.2)  # mean of 0.1 and 0.3
    assert math.isfinite(report.metrics["loss_last"])


def test_dpo_with_lora_saves_a_merged_checkpoint(base: Path, tmp_path: Path) -> None:
    items = [labelled("a", FRANCE, GOOD, BAD, 0.9), labelled("b", FRANCE, BAD, GOOD, 0.1)]
    config = rl_config("dpo", {"max_steps": 2, "batch_size": 2}, lora=True, lora_r=4, lora_alpha=8)
    out = tmp_path / "lora"
    report = TorchOptimiser(config).optimise(str(base), str(base), NO_REWARD, [], items, out)
    assert report.metrics["steps"] == 2
    assert not (out / "adapter_config.json").exists()
    before = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"],
        after["model.layers.0.self_attn.q_proj.weight"],
    )


def test_dpo_without_a_preference_is_refused(base: Path, tmp_path: Path) -> None:
    optimiser = TorchOptimiser(TorchOptimiserConfig(algorithm="dpo", device="cpu"))
    with pytest.raises(CaikitError, match=r"\(1 ties at p_a = 0\.5, 1 with identical"):
        optimiser.optimise(
            str(base),
            str(base),
            NO_REWARD,
            [],
            [labelled("t", FRANCE, GOOD, BAD, 0.5), labelled("i", FRANCE, GOOD, GOOD, 1.0)],
            tmp_path,
        )


# --- RLOO, GRPO and PPO with the preference model as the reward --------------------------


class SpyPM:
    """Wraps a preference model and records what it was asked to score."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, inner: TorchPreferenceModel) -> None:
        self.inner = inner
        self.seen: list[Sample] = []

    def fit(self, labelled: Any, out: Path) -> Any:
        raise AssertionError("not used")

    def load(self, path: Path) -> None:
        raise AssertionError("not used")

    def score(self, samples: Sequence[Sample]) -> list[float]:
        self.seen.extend(samples)
        return self.inner.score(samples)


PROMPTS = [Prompt(f"q{i}", conversation(("user", q))) for i, q in enumerate(QUESTIONS)]


def test_reward_function_wraps_samples(fitted: tuple[TorchPreferenceModel, Any, Path]) -> None:
    spy = SpyPM(fitted[0])
    fn = preference_reward_function(spy)
    prompts = [[{"role": "user", "content": "Say something."}]] * 2
    completions = [[{"role": "assistant", "content": t}] for t in ("sea please", "sea")]
    scores = fn(prompts=prompts, completions=completions, prompt_id=["q0", "q0"], trainer_state=1)
    assert scores == fitted[0].score(spy.seen)
    assert [s.prompt_id for s in spy.seen] == ["q0", "q0"]
    assert spy.seen[0].messages == conversation(("user", "Say something."))
    assert spy.seen[0].response == "sea please" and spy.seen[0].id == stable_id(
        "rl-sample", "q0", "sea please"
    )


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_online_rl_with_the_pm_reward(
    algorithm: Any,
    base: Path,
    fitted: tuple[TorchPreferenceModel, Any, Path],
    tmp_path: Path,
) -> None:
    spy = SpyPM(fitted[0])
    steps = 2 if algorithm == "rloo" else 1
    config = rl_config(
        algorithm,
        {
            "steps": steps,
            "iterations": 1,
            "rollout_batch_size": 2,
            "num_generations": 2,
            "mini_batch_size": 2,
            "max_new_tokens": 8,
            "beta": 0.1,
        },
    )
    out = tmp_path / algorithm
    report = TorchOptimiser(config).optimise(str(base), str(base), spy, PROMPTS, [], out)
    m = report.metrics
    print(algorithm, m)
    assert m["steps"] == steps and m["rollouts"] == steps and m["prompts"] == len(PROMPTS)
    assert math.isfinite(m["reward_first"]) and math.isfinite(m["reward_last"])
    assert m["kl_last"] == pytest.approx(
        m["kl_token_last"]
        * json.loads((out / RL_RECORD).read_text())["history"][steps - 1]["completions/mean_length"]
    )
    assert len(spy.seen) == steps * 2 * 2  # rollouts x prompts x generations
    assert {s.prompt_id for s in spy.seen} <= {p.id for p in PROMPTS}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    before = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    record = json.loads((out / RL_RECORD).read_text())
    assert record["algorithm"] == algorithm and record["stopped"] is None


def test_online_rl_uses_the_given_reference(
    base: Path,
    fitted: tuple[TorchPreferenceModel, Any, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trl.trainer.rloo_trainer as rloo_module

    reference = build_tiny_llama(tmp_path / "reference", seed=1)
    loaded: list[str] = []
    original = rloo_module.__dict__["create_model_from_path"]

    def spy(path: str, **kwargs: Any) -> Any:
        loaded.append(str(path))
        return original(path, **kwargs)

    monkeypatch.setattr(rloo_module, "create_model_from_path", spy)
    config = rl_config(
        "rloo",
        {
            "steps": 1,
            "iterations": 1,
            "rollout_batch_size": 2,
            "num_generations": 2,
            "mini_batch_size": 4,
            "max_new_tokens": 4,
        },
    )
    out = tmp_path / "out"
    report = TorchOptimiser(config).optimise(str(base), str(reference), fitted[0], PROMPTS, [], out)
    assert loaded == [str(reference)]
    assert report.metrics["kl_token_last"] != 0.0  # the policy is not its own reference
    assert json.loads((out / RL_RECORD).read_text())["reference"] == str(reference)


def test_online_rl_refuses_too_few_prompts(base: Path, tmp_path: Path) -> None:
    config = rl_config("rloo", {"rollout_batch_size": 8})
    with pytest.raises(CaikitError, match="rollout_batch_size = 8 prompts per rollout but has"):
        TorchOptimiser(config).optimise(str(base), str(base), NO_REWARD, PROMPTS, [], tmp_path)
    config = rl_config(
        "rloo", {"rollout_batch_size": 3, "num_generations": 2, "mini_batch_size": 4}
    )
    with pytest.raises(CaikitError, match=r"\(= 6\) to be a multiple of mini_batch_size"):
        TorchOptimiser(config).optimise(str(base), str(base), NO_REWARD, PROMPTS, [], tmp_path)


def test_kl_guard_trips_on_the_per_response_kl() -> None:
    guard = KLGuard(5.0)
    control = transformers.TrainerControl()
    state = transformers.TrainerState()
    state.global_step = 3
    guard.on_log(None, state, control, logs={"kl": 0.1, "completions/mean_length": 40.0})
    assert guard.tripped is None and not control.should_training_stop
    guard.on_log(None, state, control, logs={"kl": 0.2, "completions/mean_length": 40.0})
    assert guard.tripped == (3, pytest.approx(8.0)) and control.should_training_stop
    unbounded = KLGuard(None)
    unbounded.on_log(None, state, control, logs={"kl": 9.0, "completions/mean_length": 9.0})
    assert unbounded.tripped is None


class LengthPM:
    """Rewards longer responses: moves a tiny policy (and its KL) fast."""

    capabilities: frozenset[str] = frozenset()

    def fit(self, labelled: Any, out: Path) -> Any:
        raise AssertionError("not used")

    def load(self, path: Path) -> None:
        raise AssertionError("not used")

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [float(len(s.response)) for s in samples]


def test_kl_bound_stops_online_rl_with_a_checkpoint(base: Path, tmp_path: Path) -> None:
    config = rl_config(
        "grpo",
        {
            "steps": 4,
            "iterations": 1,
            "rollout_batch_size": 2,
            "num_generations": 2,
            "mini_batch_size": 4,
            "max_new_tokens": 6,
            "kl_bound": 0.01,
        },
    )
    out = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match=r"grpo: stopped at step \d: KL .* exceeds") as info:
        TorchOptimiser(config).optimise(str(base), str(base), LengthPM(), PROMPTS, [], out)
    assert info.value.checkpoint == str(out)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == (
        "LlamaForCausalLM"
    )
    record = json.loads((out / RL_RECORD).read_text())
    assert record["stopped"] == str(info.value) and record["history"]


def test_ppo_with_the_pm_reward(
    base: Path, fitted: tuple[TorchPreferenceModel, Any, Path], tmp_path: Path
) -> None:
    if importlib.util.find_spec("caikit_torch.ppo") is None:
        pytest.skip("caikit_torch/ppo.py (train_ppo) is not there yet")
    spy = SpyPM(fitted[0])
    config = rl_config(
        "ppo",
        {
            "steps": 2,
            "epochs": 1,
            "rollout_batch_size": 2,
            "mini_batch_size": 2,
            "max_new_tokens": 8,
        },
    )
    out = tmp_path / "ppo"
    report = TorchOptimiser(config).optimise(str(base), str(base), spy, PROMPTS, [], out)
    m = report.metrics
    print("ppo", m)
    assert m["steps"] == 2 and m["prompts"] == len(PROMPTS)
    assert m["kl_last"] >= 0.0 and math.isfinite(m["reward_last"])
    assert len(spy.seen) == 4 and {s.prompt_id for s in spy.seen} <= {p.id for p in PROMPTS}
    assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == (
        "LlamaForCausalLM"
    )
    record = json.loads((out / RL_RECORD).read_text())
    assert len(record["history"]) == 2 and record["metrics"] == m


# --- in a run -------------------------------------------------------------------------

RL_RUN = """\
output_dir = "out"
phases = ["rl"]
seed = 3
batch_size = 4
shard_size = 4

[models]
policy = "{policy}"

[data]
prompts = "prompts.txt"
limit = 4

[rl.sampling]
max_new_tokens = 8
temperature = 1.0

[generator]
plugin = "hf"
device = "cpu"

[labeller]
plugin = "direct"

[preference_model]
plugin = "torch"
learning_rate = 0.003
epochs = 2
batch_size = 4
max_length = 128
device = "cpu"

[policy_optimiser]
plugin = "torch"
algorithm = "rloo"
device = "cpu"

[policy_optimiser.rloo]
learning_rate = 0.01
steps = 1
iterations = 1
rollout_batch_size = 2
num_generations = 2
mini_batch_size = 4
max_new_tokens = 8
max_length = 256

[policy_optimiser.ppo]
learning_rate = 0.01
steps = 1
epochs = 1
rollout_batch_size = 2
mini_batch_size = 2
max_new_tokens = 8
max_length = 256

[policy_optimiser.dpo]
learning_rate = 0.01
max_length = 256
"""


@pytest.fixture
def with_rl_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[plugins.PluginManager]:
    """The bundled hf, feedback, local and torch plugins, registered in-process if need be."""
    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "hf,feedback,local,torch")
    plugins.reset()
    manager = plugins.get_plugin_manager()
    if "torch" not in manager.plugin_origins():
        manager.register(torch_plugin, "torch")
    yield manager
    plugins.reset()


def test_rl_phase_of_a_run(
    tmp_path: Path, base: Path, with_rl_plugins: plugins.PluginManager
) -> None:
    from caikit_core.config import load_run
    from caikit_core.runner import Runner

    registry = plugins.get_registry()
    if "direct" not in registry.names("labeller") or "hf" not in registry.names("generator"):
        pytest.skip("the bundled 'direct' labeller or 'hf' generator is not installed")
    (tmp_path / "prompts.txt").write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    path = tmp_path / "run.toml"
    path.write_text(RL_RUN.format(policy=base), encoding="utf-8")
    summary = Runner(load_run(path, registry)).execute()
    pm, policy = summary.stage("preference_model"), summary.stage("policy")
    assert pm.status == "ran" and pm.artifact is not None
    assert pm.metrics["examples"] == 4 and "calibration" in pm.metrics
    assert (pm.artifact / PM_RECORD).is_file()
    assert policy.status == "ran" and policy.artifact is not None
    assert policy.metrics["steps"] == 1 and math.isfinite(policy.metrics["reward_last"])
    model = transformers.AutoModelForCausalLM.from_pretrained(policy.artifact)
    assert type(model).__name__ == "LlamaForCausalLM"
    record = json.loads((policy.artifact / RL_RECORD).read_text())
    assert record["algorithm"] == "rloo" and record["base"] == str(base)


def test_swapping_the_algorithm_is_one_line_and_reruns_only_the_policy(
    tmp_path: Path, base: Path, with_rl_plugins: plugins.PluginManager
) -> None:
    from caikit_core.config import load_run
    from caikit_core.runner import Runner

    registry = plugins.get_registry()
    if "direct" not in registry.names("labeller") or "hf" not in registry.names("generator"):
        pytest.skip("the bundled 'direct' labeller or 'hf' generator is not installed")
    (tmp_path / "prompts.txt").write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    path = tmp_path / "run.toml"
    text = RL_RUN.format(policy=base)
    for algorithm in ("rloo", "ppo", "dpo"):
        path.write_text(
            text.replace('algorithm = "rloo"', f'algorithm = "{algorithm}"'), encoding="utf-8"
        )
        summary = Runner(load_run(path, registry)).execute()
        status = {s.name: s.status for s in summary.stages}
        expected_before = "ran" if algorithm == "rloo" else "skipped"
        assert status == {
            "prompts": expected_before,
            "pairs": expected_before,
            "labels": expected_before,
            "preference_model": expected_before,
            "policy": "ran",
        }, algorithm
        policy = summary.stage("policy")
        assert policy.artifact is not None
        record = json.loads((policy.artifact / RL_RECORD).read_text())
        assert record["algorithm"] == algorithm
        # the per-step metrics reach the manifest through FitReport.history, as numbers
        manifest = json.loads((policy.path / "manifest.json").read_text())
        assert manifest["history"] == policy.history and policy.history
        if algorithm == "ppo":
            scores = [row["objective/scores"] for row in policy.history]
            assert scores == [row["objective/scores"] for row in record["history"]]
            assert "objective/kl" in policy.history[0]
        transformers.AutoModelForCausalLM.from_pretrained(policy.artifact)


def test_ppo_mini_batch_larger_than_rollout_is_a_config_error() -> None:
    from caikit_core.converter import describe_error, structure

    with pytest.raises(Exception) as err:
        structure(
            {"algorithm": "ppo", "ppo": {"rollout_batch_size": 2, "mini_batch_size": 4}},
            TorchOptimiserConfig,
        )
    assert describe_error(err.value, prefix="policy_optimiser") == [
        "policy_optimiser.ppo.mini_batch_size: expected at most rollout_batch_size = 2, found 4"
    ]
