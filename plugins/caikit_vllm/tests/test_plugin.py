"""The ``vllm`` plugin without vLLM: registration, settings, and the error where
vLLM is not installed. These run in the main environment (and in .venv-vllm)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from caikit_core import plugins
from caikit_core.converter import describe_error, structure
from caikit_core.errors import PluginError
from caikit_vllm.config import VLLMGeneratorConfig
from caikit_vllm.plugin import MISSING_VLLM, build_generator

ROOT = Path(__file__).resolve().parents[3]


def test_vllm_is_a_bundled_generator_with_score_seeded_and_rollouts() -> None:
    spec = plugins.get_registry().get("generator", "vllm")
    assert spec.bundled
    assert spec.config_cls is VLLMGeneratorConfig
    assert spec.capabilities == frozenset({"score", "seeded", "rollouts"})
    assert spec.check_settings == {
        "dtype": "float32",
        "enforce_eager": True,
        "gpu_memory_utilization": 0.3,
    }


def test_importing_the_plugin_imports_neither_vllm_nor_torch() -> None:
    code = (
        "import sys, caikit_vllm, caikit_vllm.plugin, caikit_vllm.config\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    path = f"{ROOT}{':'}{ROOT / 'plugins'}"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment"
)
def test_without_vllm_the_factory_names_make_setup_vllm(tmp_path: Path) -> None:
    spec = plugins.get_registry().get("generator", "vllm")
    with pytest.raises(PluginError) as info:
        spec.build(VLLMGeneratorConfig(), model=str(tmp_path))
    assert "`make setup-vllm`" in str(info.value)
    assert "vLLM is not installed in this Python environment" in str(info.value)
    assert MISSING_VLLM in str(info.value)
    with pytest.raises(PluginError, match=r"make setup-vllm"):
        build_generator(VLLMGeneratorConfig(), model=str(tmp_path))


def test_check_settings_are_valid_settings() -> None:
    spec = plugins.get_registry().get("generator", "vllm")
    config = structure(dict(spec.check_settings or {}), VLLMGeneratorConfig)
    assert config == VLLMGeneratorConfig(
        dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dtype": "float64"}, "dtype: expected one of 'auto', 'float32', 'bfloat16', 'float16'"),
        ({"truncation": "right"}, "truncation: expected one of 'left', 'skip', found 'right'"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size: expected a positive integer"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization: expected a number in (0, 1]"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization: expected a number in (0, 1]"),
        ({"max_model_len": 1}, "max_model_len: expected an integer >= 2"),
        (
            {"max_model_len": 128, "max_context": 256},
            "max_context: expected at most max_model_len (128), found 256",
        ),
        ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
        ({"seed": -1}, "seed: expected an integer >= 0"),
        ({"chat_template": " "}, "chat_template: expected a non-empty string"),
        ({"max_num_seqs": 0}, "max_num_seqs: expected a positive integer"),
        ({"block_size": 16}, "block_size"),
    ],
)
def test_bad_settings_name_the_key(settings: dict[str, object], message: str) -> None:
    with pytest.raises(Exception) as info:  # cattrs' error, described below
        structure(settings, VLLMGeneratorConfig)
    lines = describe_error(info.value, prefix="generator")
    assert len(lines) == 1, lines
    assert lines[0].startswith("generator."), lines
    assert message in lines[0], lines


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment"
)
def test_caikit_run_with_plugin_vllm_without_vllm_exits_2_naming_the_command(
    tmp_path: Path,
) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "prompts.txt").write_text("Why is the sky blue?\n")
    run = tmp_path / "run.toml"
    run.write_text(
        'output_dir = "out"\nphases = ["sl"]\n[models]\npolicy = "model"\n'
        '[data]\nprompts = "prompts.txt"\n[generator]\nplugin = "vllm"\n'
        '[critic]\nplugin = "constitutional"\n[policy_optimiser]\nplugin = "torch"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", "run", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # refused when the run file loads (the registration's preflight), before any stage
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {run}: 1 config problem:"), done.stderr
    assert (
        "generator.plugin: 'vllm' cannot run here: " + MISSING_VLLM.removeprefix("vllm generator: ")
    ) in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here")
def test_caikit_check_generator_vllm_passes_on_the_kits_own_model() -> None:
    """The kit's generator model has heads of size 32, which vLLM's CPU kernels run."""
    done = subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", "check", "generator", "vllm"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    passed = [line.split()[1] for line in done.stdout.splitlines() if "PASSED" in line]
    assert "check_generator_rollouts_follow_loaded_weights" in passed
    assert "check_generator_score_chain_rule" in passed
    assert f"{len(passed)} passed" in done.stdout.splitlines()  # vLLM logs to stdout too
