"""The ``torch`` backend reads weights from safetensors unless ``allow_pickle = true``:
a pickle-only policy, reference, trunk or preference-model folder is refused naming
the file and the run-file key; with the key set it loads, logged."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from caikit_core import plugins  # noqa: E402
from caikit_core.config import RoleRef, load_run  # noqa: E402
from caikit_core.errors import PluginError  # noqa: E402
from caikit_core.records import Sample  # noqa: E402
from caikit_core.security import risky_settings  # noqa: E402
from caikit_core.testing.tiny_models import build_tiny_llama  # noqa: E402
from caikit_torch.optimiser import TorchOptimiser  # noqa: E402
from caikit_torch.plugin import TorchOptimiserConfig, TorchPreferenceConfig  # noqa: E402
from caikit_torch.reward import TorchPreferenceModel  # noqa: E402
from caikit_torch.tests.test_rl import PM_FAST, marker_set  # noqa: E402
from caikit_torch.tests.test_sft import TOY, fast  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def refusal(who: str, folder: Path, key: str) -> str:
    return (
        f"{who}: {folder} holds its weights only as pickle (pytorch_model.bin), which can "
        f"run code when loaded; convert it to safetensors, or set {key} = true in the run "
        "file for a checkpoint you trust"
    )


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose weights are only ``pytorch_model.bin`` (no safetensors)."""
    from safetensors.torch import load_file

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny") / "pickled", seed=0)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_a_pickle_only_policy_is_refused_unless_allowed(
    pickled: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(PluginError) as info:
        TorchOptimiser(fast({"max_steps": 1})).sft(str(pickled), TOY, tmp_path / "out")
    assert str(info.value) == refusal(
        "torch policy optimiser (policy)", pickled, "policy_optimiser.allow_pickle"
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written

    dpo = TorchOptimiser(TorchOptimiserConfig(algorithm="dpo", device="cpu"))
    with pytest.raises(PluginError) as info:
        dpo.optimise(str(pickled), str(pickled), None, [], [], tmp_path / "dpo")  # type: ignore[arg-type]
    assert str(info.value) == refusal(
        "torch policy optimiser (policy)", pickled, "policy_optimiser.allow_pickle"
    )

    with caplog.at_level("WARNING", logger="caikit"):
        report = TorchOptimiser(fast({"max_steps": 1}, allow_pickle=True)).sft(
            str(pickled), TOY, tmp_path / "allowed"
        )
    assert report.metrics["steps"] == 1
    assert (tmp_path / "allowed" / "model.safetensors").is_file()  # saved as safetensors
    assert (
        f"torch policy optimiser (policy): loading pickle weights pytorch_model.bin from {pickled} "
        "(allow_pickle = true)" in caplog.text
    )


def test_a_pickle_only_trunk_or_preference_model_is_refused_unless_allowed(
    pickled: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = marker_set(8, seed=0, tag="p")
    with pytest.raises(PluginError) as info:
        TorchPreferenceModel(TorchPreferenceConfig(**PM_FAST), str(pickled)).fit(
            pairs, tmp_path / "pm"
        )
    assert str(info.value) == refusal(
        "torch preference model (trunk)", pickled, "preference_model.allow_pickle"
    )

    allowed = TorchPreferenceConfig(**{**PM_FAST, "epochs": 1.0}, allow_pickle=True)
    with caplog.at_level("WARNING", logger="caikit"):
        TorchPreferenceModel(allowed, str(pickled)).fit(pairs, tmp_path / "pm")
    assert f"loading pickle weights pytorch_model.bin from {pickled}" in caplog.text

    # the fitted model as pickle: load() refuses it, and loads it when allowed
    from safetensors.torch import load_file

    saved = tmp_path / "pm-pickled"
    shutil.copytree(tmp_path / "pm", saved)
    state = load_file(saved / "model.safetensors")
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")
    with pytest.raises(PluginError) as info:
        TorchPreferenceModel(TorchPreferenceConfig(device="cpu"), "unused").load(saved)
    assert str(info.value) == refusal(
        "torch preference model (preference model)", saved, "preference_model.allow_pickle"
    )
    loaded = TorchPreferenceModel(TorchPreferenceConfig(device="cpu", allow_pickle=True), "unused")
    loaded.load(saved)
    reference = TorchPreferenceModel(TorchPreferenceConfig(device="cpu"), "unused")
    reference.load(tmp_path / "pm")
    comparisons = [lc.comparison for lc in pairs[:2]]
    samples = [Sample(c.id, c.prompt_id, c.messages, c.response_a, "m") for c in comparisons]
    assert loaded.score(samples) == reference.score(samples)


def test_allow_pickle_is_listed_as_risky_and_changes_no_fingerprint(
    tmp_path: Path, with_echo: Path
) -> None:
    on = TorchOptimiserConfig(allow_pickle=True)
    assert RoleRef("policy_optimiser", "torch", on).fingerprint_options() == (
        RoleRef("policy_optimiser", "torch", TorchOptimiserConfig()).fingerprint_options()
    )
    pm = TorchPreferenceConfig(allow_pickle=True)
    assert RoleRef("preference_model", "torch", pm).fingerprint_options() == (
        RoleRef("preference_model", "torch", TorchPreferenceConfig()).fingerprint_options()
    )
    (tmp_path / "prompts.txt").write_text("hello\n", encoding="utf-8")
    run = tmp_path / "run.toml"
    run.write_text(
        'output_dir = "out"\nphases = ["sl", "rl"]\n[models]\npolicy = "echo-policy"\n'
        '[data]\nprompts = "prompts.txt"\n[generator]\nplugin = "echo"\n'
        '[critic]\nplugin = "shout"\n[labeller]\nplugin = "length"\n'
        '[preference_model]\nplugin = "torch"\nallow_pickle = true\n'
        '[policy_optimiser]\nplugin = "torch"\nallow_pickle = true\n',
        encoding="utf-8",
    )
    notes = risky_settings(load_run(run, plugins.get_registry()))
    assert notes == [
        "policy_optimiser.allow_pickle = true (loads pickle weights, which can run code when read)",
        "preference_model.allow_pickle = true (loads pickle weights, which can run code when read)",
    ]
