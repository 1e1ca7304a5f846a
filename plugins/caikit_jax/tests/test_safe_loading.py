"""The ``jax`` backend reads weights from safetensors only: a pickle-only policy or
trunk folder is refused naming the file (Tunix's loader never unpickles, so there is
no ``allow_pickle`` to set)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tunix")

from caikit_core.errors import PluginError
from caikit_core.testing.checks import marker_set, toy_traces
from caikit_core.testing.tiny_models import build_tiny_llama
from caikit_core.training.settings import SFTSettings
from caikit_jax.optimiser import JaxOptimiser
from caikit_jax.plugin import JaxOptimiserConfig, JaxPreferenceConfig
from caikit_jax.reward import JaxPreferenceModel


def test_a_pickle_only_policy_or_trunk_is_refused_naming_the_file(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = build_tiny_llama(tmp_path / "pickled", seed=0)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    message = (
        f"{folder}: holds its weights only as pickle (pytorch_model.bin), and the jax backend "
        "reads *.safetensors only (it never unpickles, so allow_pickle does not apply); "
        "convert the folder to safetensors"
    )
    small = {"max_steps": 1, "batch_size": 4, "max_length": 128}
    optimiser = JaxOptimiser(JaxOptimiserConfig(sft=SFTSettings(**small)))
    with pytest.raises(PluginError) as info:
        optimiser.sft(str(folder), toy_traces(4), tmp_path / "sft")
    assert str(info.value) == message
    pm = JaxPreferenceModel(JaxPreferenceConfig(max_steps=1, batch_size=4), str(folder))
    with pytest.raises(PluginError) as info:
        pm.fit(marker_set(4), tmp_path / "pm")
    assert str(info.value) == message
