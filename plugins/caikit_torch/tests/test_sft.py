"""The ``torch`` policy optimiser: SFT with TRL on a tiny random Llama (no hub access)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402
from trl.trainer.sft_trainer import SFTTrainer  # noqa: E402

import caikit_torch.plugin as torch_plugin  # noqa: E402
from caikit_core import plugins  # noqa: E402
from caikit_core.config import check_run_data, load_run  # noqa: E402
from caikit_core.converter import InvalidValue, converter, describe_error  # noqa: E402
from caikit_core.errors import CaikitError, ConfigError, PluginError  # noqa: E402
from caikit_core.interfaces import PolicyOptimiser  # noqa: E402
from caikit_core.records import (  # noqa: E402
    Conversation,
    RevisionStep,
    RevisionTrace,
    conversation,
)
from caikit_core.runner import Runner  # noqa: E402
from caikit_core.testing.tiny_models import CHAT_TEMPLATE, build_tiny_llama  # noqa: E402
from caikit_core.training.data import sft_examples  # noqa: E402
from caikit_core.training.settings import SFTSettings  # noqa: E402
from caikit_torch.optimiser import TorchOptimiser  # noqa: E402
from caikit_torch.plugin import TorchOptimiserConfig  # noqa: E402
from caikit_torch.sft import SFT_RECORD  # noqa: E402
from tests.shared import PROMPTS  # noqa: E402

SKY = conversation(("user", "Please explain why the sky is blue in simple words."))
SKY_ANSWER = "The sky looks blue because air scatters blue light more than red light."
FRANCE = conversation(
    ("system", "you are a careful and friendly assistant."),
    ("user", "What is the capital of France?"),
)
FRANCE_ANSWER = "The capital of France is Paris."


def trace(
    tid: str,
    messages: Conversation,
    final: str,
    *,
    steps: int = 1,
    skipped: str | None = None,
) -> RevisionTrace:
    """A revision trace whose last step's revision is ``final``."""
    revisions = [f"draft {k} of the answer." for k in range(steps - 1)] + [final]
    return RevisionTrace(
        id=tid,
        prompt_id=f"p-{tid}",
        messages=messages,
        initial_response="I would rather not help with that.",
        steps=tuple(
            RevisionStep(
                k, "harmful0", "Critique: was it rude?", "It was rude.", "Revise it.", text
            )
            for k, text in enumerate(revisions[-steps:] if steps else [])
        ),
        final_response=final,
        skipped_reason=skipped,
    )


#: Two prompts, each repeated eight times: a toy set the tiny model can memorise.
TOY = [trace(f"sky{i}", SKY, SKY_ANSWER) for i in range(8)] + [
    trace(f"fr{i}", FRANCE, FRANCE_ANSWER) for i in range(8)
]

FAST_SFT = {"learning_rate": 1e-2, "batch_size": 4}


def fast(sft: dict[str, Any], **options: Any) -> TorchOptimiserConfig:
    """Quick CPU settings: ``[policy_optimiser.sft]`` = ``FAST_SFT`` + ``sft``."""
    return TorchOptimiserConfig(
        sft=SFTSettings(**FAST_SFT, **sft), device="cpu", lora_dropout=0.0, **options
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint with a trained byte-level tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[Any]]:
    """Full fine-tuning on the toy set for 12 steps: (report, folder, loss curve)."""
    out = tmp_path_factory.mktemp("sft") / "checkpoint"
    optimiser = TorchOptimiser(fast({"max_steps": 12}))
    report = optimiser.sft(str(base), TOY, out)
    return report, out, list(optimiser.losses)


def weights(folder: Path) -> dict[str, Any]:
    return load_file(str(folder / "model.safetensors"))


def revision_logprob(folder: Path, messages: Conversation, text: str) -> float:
    """log P(text | messages) under the checkpoint in ``folder``, through its chat template."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    turns = [{"role": m.role, "content": m.content} for m in messages]
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*turns, {"role": "assistant", "content": text}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logprobs = model(tensor).logits[0, :-1].float().log_softmax(-1)
    picked = logprobs.gather(1, tensor[0, 1:, None])[:, 0]
    return float(picked[len(prompt_ids) - 1 :].sum())


# --- config and registration ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (
            {"sft": {"learning_rate": -1.0}},
            "policy_optimiser.sft.learning_rate: expected a number > 0, found -1.0",
        ),
        ({"sft": {"epochs": 0}}, "policy_optimiser.sft.epochs: expected a number > 0, found 0.0"),
        (
            {"sft": {"max_steps": 0}},
            "policy_optimiser.sft.max_steps: expected a positive integer or nothing, found 0",
        ),
        (
            {"sft": {"batch_size": 0}},
            "policy_optimiser.sft.batch_size: expected a positive integer, found 0",
        ),
        ({"lora_dropout": 1.0}, "policy_optimiser.lora_dropout: expected a number in [0, 1)"),
        ({"lora_target_modules": []}, "policy_optimiser.lora_target_modules: expected a non-empty"),
        (
            {"sft": {"target": "best"}},
            "policy_optimiser.sft.target: expected one of 'final', 'all'",
        ),
        ({"algorithm": "ppo2"}, "policy_optimiser.algorithm: expected one of 'ppo', 'dpo', 'rloo'"),
        ({"dtype": "float16"}, "policy_optimiser.dtype: expected one of 'auto'"),
        (
            {"sft": {"learning_rate": "big"}},
            "policy_optimiser.sft.learning_rate: expected a number, found",
        ),
        ({"lora_rank": 8}, "policy_optimiser.lora_rank: unknown key; did you mean 'lora_r'?"),
        (
            {"sft_target": "all"},
            "policy_optimiser.sft_target: moved to policy_optimiser.sft.target",
        ),
        (
            {"learning_rate": 1e-5},
            "policy_optimiser.learning_rate: moved to policy_optimiser.sft.learning_rate, "
            "policy_optimiser.dpo.learning_rate, policy_optimiser.ppo.learning_rate, "
            "policy_optimiser.rloo.learning_rate, policy_optimiser.grpo.learning_rate",
        ),
    ],
)
def test_config_errors_name_the_key(options: dict[str, Any], line: str) -> None:
    with pytest.raises(Exception) as info:
        converter.structure(options, TorchOptimiserConfig)
    problems = describe_error(info.value, prefix="policy_optimiser")
    assert len(problems) == 1 and problems[0].startswith(line), problems


def test_config_validators_run_on_direct_construction() -> None:
    with pytest.raises(InvalidValue, match="expected a number > 0, found 0") as info:
        SFTSettings(learning_rate=0)
    assert info.value.field == "learning_rate"
    with pytest.raises(InvalidValue, match="expected one of 'final', 'all'"):
        SFTSettings(target="every")  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="expected one of 'auto', 'cpu', 'cuda'"):
        TorchOptimiserConfig(device="tpu")  # type: ignore[arg-type]


def test_config_defaults_and_round_trip() -> None:
    config = converter.structure(
        {"lora": True, "lora_target_modules": ["q_proj", "v_proj"], "sft": {"epochs": 2}},
        TorchOptimiserConfig,
    )
    assert config.lora_target_modules == ("q_proj", "v_proj")
    assert config.sft.epochs == 2.0 and config.sft.target == "final" and config.algorithm == "ppo"
    assert config.dpo.epochs == 1.0  # each algorithm has its own table
    assert converter.structure(converter.unstructure(config), TorchOptimiserConfig) == config


def test_registers_torch_with_sft_and_rl_capabilities() -> None:
    manager = plugins.PluginManager()
    manager.register(torch_plugin, "torch")
    spec = manager.registry.get("policy_optimiser", "torch")
    assert spec.capabilities == frozenset(
        {"sft", "ppo", "preference-loss", "generator-rollouts", "resumable"}
    )
    assert spec.config_cls is TorchOptimiserConfig
    optimiser = spec.build(TorchOptimiserConfig())
    assert isinstance(optimiser, TorchOptimiser)
    assert isinstance(optimiser, PolicyOptimiser)


def test_run_file_errors_are_reported_at_their_key(tmp_path: Path) -> None:
    manager = plugins.PluginManager()
    manager.register(torch_plugin, "torch")
    data = {
        "output_dir": "out",
        "models": {"policy": "model"},
        "data": {"prompts": "prompts.txt"},
        "policy_optimiser": {"plugin": "torch", "sft": {"learning_rate": -1.0}},
    }
    with pytest.raises(ConfigError) as info:
        check_run_data(data, "run.toml", manager.registry, tmp_path)
    assert "policy_optimiser.sft.learning_rate: expected a number > 0, found -1.0" in (
        info.value.problems
    )


def test_plugin_module_does_not_import_torch() -> None:
    code = (
        "import sys, caikit_torch, caikit_torch.plugin\n"
        "heavy = {'torch', 'transformers', 'trl', 'datasets', 'peft'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env_path = str(ROOT / "plugins")
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        env={"PYTHONPATH": env_path, "PATH": ""},
        cwd=ROOT,
    )


# --- examples -------------------------------------------------------------------------


def test_examples_final_vs_all() -> None:
    traces = [
        trace("a", SKY, SKY_ANSWER, steps=3),
        trace("b", FRANCE, FRANCE_ANSWER, steps=1),
        trace("c", SKY, SKY_ANSWER, steps=0),
        trace("d", SKY, "   "),
        trace("e", SKY, SKY_ANSWER, skipped="prompt too long"),
    ]
    final = sft_examples(traces, "final")
    every = sft_examples(traces, "all")
    assert len(final.examples) == 3 and len(every.examples) == 3 + 1 + 1
    assert (final.traces, final.empty, final.marked_skipped) == (3, 1, 1)
    assert final.examples[1] == {
        "prompt": [
            {"role": "system", "content": "you are a careful and friendly assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "completion": [{"role": "assistant", "content": FRANCE_ANSWER}],
    }
    assert [e["completion"][0]["content"] for e in every.examples[:3]] == [
        "draft 0 of the answer.",
        "draft 1 of the answer.",
        SKY_ANSWER,
    ]


# --- training -------------------------------------------------------------------------


def test_loss_decreases(trained: tuple[Any, Path, list[Any]]) -> None:
    report, _, losses = trained
    assert [step for step, _ in losses] == list(range(1, 13))
    values = [loss for _, loss in losses]
    assert values[0] > 5.0  # a random model
    assert values[-1] < values[0] / 4
    assert sum(values[-3:]) < sum(values[:3]) / 3
    assert report.metrics["loss_first"] == values[0]
    assert report.metrics["loss_last"] == values[-1]


def test_report_metrics_and_record(trained: tuple[Any, Path, list[Any]], base: Path) -> None:
    report, out, losses = trained
    assert report.path == str(out)
    metrics = report.metrics
    assert metrics["examples"] == 16 and metrics["traces"] == 16
    assert metrics["steps"] == 12 and metrics["epochs"] == 3.0
    assert metrics["skipped_empty"] == 0 and metrics["skipped_marked"] == 0
    assert metrics["too_long"] == 0
    assert metrics["seconds"] > 0 and 0 < metrics["train_loss"] < metrics["loss_first"]
    record = json.loads((out / SFT_RECORD).read_text())
    assert record["base"] == str(base)
    assert record["config"]["sft"]["max_steps"] == 12
    assert [tuple(x) for x in record["losses"]] == losses


def test_checkpoint_is_a_plain_hf_folder(trained: tuple[Any, Path, list[Any]]) -> None:
    _, out, _ = trained
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.use_cache is True
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.pad_token == "<|pad|>"


def test_weights_differ_from_base(trained: tuple[Any, Path, list[Any]], base: Path) -> None:
    _, out, _ = trained
    before, after = weights(base), weights(out)
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # full fine-tuning moves every tensor


def test_training_revision_is_more_likely(trained: tuple[Any, Path, list[Any]], base: Path) -> None:
    _, out, _ = trained
    for messages, answer in ((SKY, SKY_ANSWER), (FRANCE, FRANCE_ANSWER)):
        before = revision_logprob(base, messages, answer)
        after = revision_logprob(out, messages, answer)
        assert after > before + 20, (before, after)


def test_loss_is_on_the_revision_only(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import caikit_torch.sft as sft_module

    seen: list[dict[str, Any]] = []

    class Spy(SFTTrainer):
        def train(self, *args: Any, **kwargs: Any) -> Any:
            dataset: Any = self.train_dataset
            seen.append(dataset[0])
            return super().train(*args, **kwargs)

    monkeypatch.setattr(sft_module, "SFTTrainer", Spy)
    config = fast({"max_steps": 1})
    TorchOptimiser(config).sft(str(base), [trace("fr", FRANCE, FRANCE_ANSWER)], tmp_path / "o")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    row = seen[0]
    trained_on = [
        i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100
    ]
    assert tokenizer.decode(row["input_ids"]).startswith("<|bos|><|system|>\n")
    assert tokenizer.decode(trained_on) == FRANCE_ANSWER + "<|eos|>\n"


def test_sft_target_all_counts_every_step_and_is_deterministic(base: Path, tmp_path: Path) -> None:
    traces = [trace("a", SKY, SKY_ANSWER, steps=3), trace("b", FRANCE, FRANCE_ANSWER, steps=2)]
    config = fast({"max_steps": 2, "target": "all"}, seed=7)
    first = TorchOptimiser(config).sft(str(base), traces, tmp_path / "one")
    second = TorchOptimiser(config).sft(str(base), traces, tmp_path / "two")
    assert first.metrics["examples"] == 5 and first.metrics["traces"] == 2
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert first.metrics["loss_last"] == second.metrics["loss_last"]


def test_lora_is_merged_into_a_plain_checkpoint(base: Path, tmp_path: Path) -> None:
    config = fast({"max_steps": 4}, lora=True, lora_r=4, lora_alpha=8)
    out = tmp_path / "lora"
    report = TorchOptimiser(config).sft(str(base), TOY, out)
    assert report.metrics["steps"] == 4
    assert not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    before, after = weights(base), weights(out)
    assert before.keys() == after.keys()  # no lora_A / lora_B tensors left
    assert not any("lora" in k for k in after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    assert "model.layers.1.mlp.down_proj.weight" in changed
    # "all-linear" adapts the linear layers only: embeddings, norms and the head stay
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    assert not any("norm" in k for k in changed)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"


# --- bad input ------------------------------------------------------------------------


def test_no_traces_is_a_clear_error(base: Path, tmp_path: Path) -> None:
    with pytest.raises(CaikitError, match="no revision traces"):
        TorchOptimiser(TorchOptimiserConfig()).sft(str(base), [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_empty_or_skipped_traces_is_a_clear_error(base: Path, tmp_path: Path) -> None:
    traces = [trace("a", SKY, ""), trace("b", SKY, SKY_ANSWER, skipped="too long")]
    with pytest.raises(CaikitError, match=r"none of the 2 .* \(1 empty, 1 skipped\)"):
        TorchOptimiser(TorchOptimiserConfig()).sft(str(base), traces, tmp_path / "out")


def test_missing_policy_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(PluginError, match="does not exist") as info:
        TorchOptimiser(TorchOptimiserConfig()).sft(str(missing), TOY, tmp_path / "out")
    assert str(missing) in str(info.value)


def test_folder_without_config_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"no config\.json") as info:
        TorchOptimiser(TorchOptimiserConfig()).sft(str(tmp_path), TOY, tmp_path / "out")
    assert str(tmp_path) in str(info.value)


def test_optimise_on_a_missing_policy_is_refused_clearly(tmp_path: Path) -> None:
    optimiser = TorchOptimiser(TorchOptimiserConfig(algorithm="dpo"))
    with pytest.raises(CaikitError, match=r"policy folder .*does not exist"):
        optimiser.optimise(str(tmp_path / "p"), "p", None, [], [], tmp_path)  # type: ignore[arg-type]


# --- in a run -------------------------------------------------------------------------

RUN = """\
output_dir = "out"
phases = ["sl"]
seed = 1
batch_size = 4
shard_size = 4

[models]
policy = "{policy}"

[data]
prompts = "prompts.txt"

[generator]
plugin = "echo"

[critic]
plugin = "shout"
revisions = 2

[policy_optimiser]
plugin = "torch"
device = "cpu"

[policy_optimiser.sft]
learning_rate = 0.01
max_steps = 3
batch_size = 4
max_length = 256
"""


@pytest.fixture
def with_torch(with_echo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only the echo fixture plugins, the local executor and this plugin (in-process)."""
    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "echo,local,torch")
    plugins.reset()
    manager = plugins.get_plugin_manager()
    if "torch" not in manager.plugin_origins():  # not installed through its entry point
        manager.register(torch_plugin, "torch")
    yield
    plugins.reset()


def test_sft_stage_of_a_run(tmp_path: Path, base: Path, with_torch: None) -> None:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    path = tmp_path / "run.toml"
    path.write_text(RUN.format(policy=base), encoding="utf-8")
    summary = Runner(load_run(path, plugins.get_registry())).execute()
    sft = summary.stage("sft")
    assert sft.status == "ran" and sft.artifact is not None
    assert sft.metrics["examples"] == len(PROMPTS) and sft.metrics["steps"] == 3
    assert (sft.artifact / "model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(sft.artifact)
    assert type(model).__name__ == "LlamaForCausalLM"
