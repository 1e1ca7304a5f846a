"""The ``jax`` backend: parity with PyTorch, Tunix shims, export, sharding, bad input,
the conformance kit, and the same run file with ``plugin = "jax"``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("tunix")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from caikit_core import plugins
from caikit_core.errors import PluginError
from caikit_core.testing.checks import _pair_samples, marker_set, toy_traces
from caikit_core.testing.kit import parametrize_with_checks
from caikit_core.testing.tiny_models import build_tiny_llama
from caikit_core.training.settings import DPOSettings, SFTSettings
from caikit_jax import model as jax_model
from caikit_jax import shims
from caikit_jax.optimiser import JaxOptimiser
from caikit_jax.plugin import JaxOptimiserConfig, JaxPreferenceConfig
from caikit_jax.reward import JaxPreferenceModel

ROOT = Path(__file__).resolve().parents[3]


def sft_config(**sft: Any) -> JaxOptimiserConfig:
    """The jax optimiser with ``[policy_optimiser.sft]`` set to ``sft``."""
    return JaxOptimiserConfig(sft=SFTSettings(**sft))


#: An RL-phase run file (the torch plugin's tests run the same), switched to jax below.
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


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("jax") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """The tiny model with tied input and output embeddings (as SmolLM2 has)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    config = model.config
    config.tie_word_embeddings = True
    tied_model = transformers.LlamaForCausalLM(config)
    tied_model.load_state_dict(model.state_dict(), strict=False)
    tied_model.tie_weights()
    out = tmp_path_factory.mktemp("jax") / "tied"
    tied_model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


def _batch() -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([[0, 0, 1, 5, 9, 20, 33, 40, 7, 100], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    mask = (np.arange(10)[None] >= np.array([[2], [0]])).astype(np.int32)
    return ids.astype(np.int32), mask


def _torch_logits(folder: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
    return np.asarray(out.logits.numpy())


def _max_diff(folder: Path, model: Any) -> float:
    ids, mask = _batch()
    theirs = _torch_logits(folder, ids, mask)
    ours = np.asarray(jax_model.logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    return float(np.abs(ours - theirs)[mask.astype(bool)].max())


# --- parity ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "tied"])
def test_logits_match_pytorch_with_left_padding(which: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    assert _max_diff(folder, jax_model.load_model(folder)) < 1e-3


def test_greedy_generation_matches_pytorch(tiny: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        expected = torch_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    model = jax_model.load_model(tiny)
    # one fixed-width buffer, so XLA compiles once: with causal attention the tokens
    # after position t do not change its logits
    width = len(prompt) + 12
    forward = jax.jit(lambda ids: jax_model.logits(model, ids, jnp.ones_like(ids)))
    ids = np.zeros((1, width), dtype=np.int32)
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt), width):
        ids[0, t] = int(jnp.argmax(forward(jnp.asarray(ids))[0, t - 1]))
    assert ids[0, len(prompt) :].tolist() == expected


def test_export_round_trip_is_exact_and_loads_in_the_hf_generator(
    tiny: Path, tmp_path: Path
) -> None:
    model = jax_model.load_model(tiny)
    out = jax_model.save_checkpoint(model, tmp_path / "export", source=tiny)
    ids, mask = _batch()
    assert np.array_equal(_torch_logits(out, ids, mask), _torch_logits(tiny, ids, mask))
    from caikit_core.records import GenerationRequest, Message, SamplingParams
    from caikit_core.testing.fixtures import hf_generator

    request = GenerationRequest(
        "r",
        (Message("user", "hello there!"),),
        SamplingParams(max_new_tokens=5, temperature=0.0),
        1,
    )
    assert hf_generator(out).generate([request])[0].texts == (
        hf_generator(tiny).generate([request])[0].texts
    )


def test_pm_scores_agree_across_backends_both_ways(tiny: Path, tmp_path: Path) -> None:
    from caikit_torch.plugin import TorchPreferenceConfig
    from caikit_torch.reward import TorchPreferenceModel

    items = marker_set(8)
    samples = _pair_samples(items)
    # a torch PM (one step: its head is fresh) scored by the jax backend ...
    torch_pm = TorchPreferenceModel(
        TorchPreferenceConfig(max_steps=1, batch_size=4, max_length=128, device="cpu"), str(tiny)
    )
    torch_pm.fit(items, tmp_path / "torch-pm")
    jax_pm = JaxPreferenceModel(JaxPreferenceConfig(batch_size=4, max_length=128), str(tiny))
    jax_pm.load(tmp_path / "torch-pm")
    diff = np.abs(np.array(torch_pm.score(samples)) - np.array(jax_pm.score(samples)))
    assert diff.max() < 1e-3
    # ... and a jax PM scored by the torch backend
    trained = JaxPreferenceModel(
        JaxPreferenceConfig(max_steps=2, batch_size=4, max_length=128), str(tiny)
    )
    report = trained.fit(items, tmp_path / "jax-pm")
    assert report.history == [{"step": float(s), "loss": x} for s, x in trained.losses]
    assert [r["step"] for r in report.history] == [1.0, 2.0]  # its loss curve, per step
    assert json.loads((tmp_path / "jax-pm" / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"
    ]
    reader = TorchPreferenceModel(TorchPreferenceConfig(device="cpu", max_length=128), str(tiny))
    reader.load(Path(report.path))
    diff = np.abs(np.array(trained.score(samples)) - np.array(reader.score(samples)))
    assert diff.max() < 1e-3


# --- the shims: each test shows the defect without the shim --------------------------------


def _tunix_load(folder: Path, model_class: Any) -> Any:
    """``folder`` loaded by Tunix's safetensors loader alone, as ``model_class``."""
    from tunix.models import safetensors_loader
    from tunix.models.llama3 import params as llama3_params

    return safetensors_loader.load_and_create_model(
        file_dir=str(folder),
        model_class=model_class,
        config=jax_model.model_config(folder),
        key_mapping=llama3_params._get_key_and_transform_mapping,
        mesh=jax_model.make_mesh(),
        dtype=jnp.float32,
    )


def test_rope_theta_shim(tiny: Path) -> None:
    from tunix.models.llama3 import model as llama3

    upstream = _tunix_load(tiny, llama3.Llama3)
    assert _max_diff(tiny, upstream) > 0.1  # theta 1e6 instead of the model's 1e4
    assert _max_diff(tiny, jax_model.load_model(tiny)) < 1e-3
    assert jax_model.model_config(tiny).rope_theta == 10000.0


def test_auto_mesh_shim(tiny: Path) -> None:
    ids, mask = _batch()
    explicit = jax.make_mesh((1, 1), ("fsdp", "tp"))  # JAX's default axis types
    model = jax_model.load_model(tiny, mesh=explicit)
    with pytest.raises(Exception, match=r"out sharding|unambiguous"):
        jax_model.logits(model, jnp.asarray(ids), jnp.asarray(mask))
    model = jax_model.load_model(tiny, mesh=shims.auto_mesh((1, 1), ("fsdp", "tp")))
    assert np.isfinite(
        np.asarray(jax_model.logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    ).all()


def test_float_rewards_shim() -> None:
    ids = jnp.asarray([[5, 6, 7]], dtype=jnp.int32)
    upstream = jnp.zeros_like(ids).at[0, 2].add(0.75)
    assert float(upstream[0, 2]) == 0.0  # the PPO reward truncated to an integer
    fixed = shims.float_zeros_like(ids).at[0, 2].add(0.75)
    assert float(fixed[0, 2]) == 0.75
    shims.patch_ppo_rewards()
    from tunix.rl.ppo import ppo_learner

    assert ppo_learner.jnp.zeros_like(ids).dtype == jnp.float32
    assert ppo_learner.jnp.arange is jnp.arange  # everything else is jax.numpy's


def test_tracer_sharding_shim_spares_the_loader_a_walk_over_the_trace(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jax._src.interpreters import partial_eval

    walks: list[int] = []
    original = partial_eval.JaxprStackFrame.find_progenitors

    def counted(frame: Any, tracer: Any) -> Any:
        walks.append(len(frame.tracing_eqns))
        return original(frame, tracer)

    monkeypatch.setattr(partial_eval.JaxprStackFrame, "find_progenitors", counted)
    _tunix_load(tiny, shims.CaikitLlama3)
    # the defect: a walk over the trace so far per parameter drawn, each longer
    assert len(walks) >= 20 and walks[-1] > walks[0]
    walks.clear()
    model = jax_model.load_model(tiny)
    assert walks == []
    assert _max_diff(tiny, model) < 1e-3

    # the error the caller sees is the same with and without the shim; only the walk,
    # whose message JAX throws away, is gone
    messages: list[str] = []

    def sharding_of(x: jax.Array) -> jax.Array:
        with shims.tracer_sharding_without_origin(), shims.tracer_sharding_without_origin():
            assert getattr(x, "sharding", None) is None
            with pytest.raises(AttributeError) as quiet:
                _ = x.sharding
        with pytest.raises(AttributeError) as plain:
            _ = x.sharding
        messages.extend([str(quiet.value), str(plain.value)])
        return x

    jax.jit(sharding_of)(jnp.ones(2))
    assert messages[0] == messages[1]
    assert "'sharding' attribute is not available on traced array" in messages[0]
    assert len(walks) == 1  # the plain access, after the shim was closed


def test_critic_shim_gives_one_value_per_token_on_the_actors_own_trunk(tied: Path) -> None:
    from tunix.rl import utils as rl_utils
    from tunix.sft import utils as sft_utils

    actor = jax_model.load_model(tied)
    assert actor.config.weight_tying
    with pytest.raises(AttributeError):
        rl_utils.create_critic_model(actor)  # upstream: looks for lm_head
    critic = shims.SharedTrunkCritic(actor)
    ids, mask = _batch()
    values = jax_model.logits(critic, jnp.asarray(ids), jnp.asarray(mask))
    assert values.shape == (2, 10, 1)
    assert float(jnp.abs(values).max()) == 0.0  # the head starts at zero
    # no weights of its own but the head: the trunk's arrays are the actor's, not copies
    actor_arrays = {id(a) for a in jax.tree.leaves(nnx.state(actor, nnx.Param))}
    critic_params = jax.tree.leaves(nnx.state(critic, nnx.Param))
    assert len(critic_params) == len(actor_arrays) + 1
    assert sum(id(a) not in actor_arrays for a in critic_params) == 1
    # what Tunix's trainer trains: the head alone (LoRA-style), and the actor as a whole
    assert sft_utils.is_lora_enabled(critic) and not sft_utils.is_lora_enabled(actor)
    (head,) = jax.tree.leaves(nnx.state(critic, nnx.LoRAParam))
    assert head.shape == (actor.config.embed_dim, 1)
    # the actor is untouched
    assert _max_diff(tied, actor) < 1e-3


# --- bad input ---------------------------------------------------------------------------


def _config_copy(src: Path, dst: Path, **changes: Any) -> Path:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_architecture_is_refused_before_training(tiny: Path, tmp_path: Path) -> None:
    folder = _config_copy(tiny, tmp_path / "qwen", architectures=["Qwen2ForCausalLM"])
    optimiser = JaxOptimiser(sft_config(max_steps=1, batch_size=2, max_length=128))
    with pytest.raises(PluginError) as err:
        optimiser.sft(str(folder), toy_traces(2), tmp_path / "out")
    assert str(err.value) == (
        f"{folder / 'config.json'}: architecture Qwen2ForCausalLM is not supported by the jax "
        "backend (supported: LlamaForCausalLM); use the torch backend for this checkpoint"
    )
    assert not (tmp_path / "out").exists()


def test_unimplemented_rope_scaling_is_refused(tiny: Path, tmp_path: Path) -> None:
    folder = _config_copy(
        tiny,
        tmp_path / "yarn",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0},
    )
    with pytest.raises(PluginError, match=r"RoPE scaling type 'yarn' is not implemented"):
        jax_model.load_model(folder)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora": True}, "lora: the jax optimiser trains all weights; LoRA is not implemented"),
        ({"algorithm": "rloo"}, "algorithm: the jax optimiser implements 'ppo', 'dpo', found"),
        ({"dpo": {"loss": "ipo"}}, "dpo.loss: the jax optimiser implements 'sigmoid'"),
        ({"ppo": {"vf_coef": 0.5}}, "ppo.vf_coef: has no effect on the jax optimiser"),
        ({"lora_r": 8}, "lora_r: unknown key"),
        ({"ppo_steps": 2}, "ppo_steps: moved to policy_optimiser.ppo.steps"),
    ],
)
def test_unimplemented_settings_are_config_errors(settings: dict[str, Any], message: str) -> None:
    from caikit_core.converter import describe_error, structure

    with pytest.raises(Exception) as err:
        structure(settings, JaxOptimiserConfig)
    assert describe_error(err.value, prefix="policy_optimiser")[0].startswith(
        f"policy_optimiser.{message}"
    )


# --- training ------------------------------------------------------------------------------


def test_sft_lowers_the_loss_and_saves_a_checkpoint_torch_loads(tiny: Path, tmp_path: Path) -> None:
    optimiser = JaxOptimiser(
        sft_config(learning_rate=1e-2, max_steps=3, batch_size=4, max_length=256)
    )
    report = optimiser.sft(str(tiny), toy_traces(), tmp_path / "sft")
    assert report.metrics["loss_last"] < report.metrics["loss_first"]
    assert report.metrics["steps"] == 3 and report.metrics["examples"] == 8
    trained = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny)
    assert not torch.equal(
        trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    )
    record = json.loads((tmp_path / "sft" / "caikit_sft.json").read_text())
    assert record["backend"] == "jax" and record["versions"]["tunix"] == shims.TUNIX_VERSION


def test_batch_widths_are_bucketed_four_per_octave() -> None:
    from caikit_jax.common import bucket

    widths = {n: bucket(n, 1024) for n in range(1, 600)}
    assert [widths[n] for n in (1, 16, 17, 20, 21, 64, 65, 78, 81, 97, 99, 128, 129)] == [
        16, 16, 20, 20, 24, 64, 80, 80, 96, 112, 112, 128, 160,
    ]  # fmt: skip
    assert all(n <= w < 1.25 * n for n, w in widths.items() if n > 16)  # under 25% padding
    assert {widths[n] for n in range(1, 17)} == {16}
    assert len({widths[n] for n in range(129, 257)}) == 4  # one octave, four shapes
    assert bucket(161, 170) == 170 and bucket(300, 256) == 300  # the limit; never below length


def test_training_steps_compile_once(tiny: Path, tmp_path: Path) -> None:
    """On one device a second step must not recompile: the new head and optimizer state
    are laid out as the step returns them before the first step (without it, each fit
    compiled its step twice)."""
    from caikit_jax import reward
    from caikit_jax import sft as jax_sft

    # shapes no other test uses, so each fit compiles its step exactly once
    before = reward._train_step.jitted_fn._cache_size()
    pm = JaxPreferenceModel(
        JaxPreferenceConfig(max_steps=3, batch_size=5, max_length=112), str(tiny)
    )
    pm.fit(marker_set(5), tmp_path / "pm")
    assert reward._train_step.jitted_fn._cache_size() - before == 1
    before = jax_sft.sft_step.jitted_fn._cache_size()
    optimiser = JaxOptimiser(sft_config(max_steps=3, batch_size=8, max_length=256))
    optimiser.sft(str(tiny), toy_traces(), tmp_path / "sft")
    assert jax_sft.sft_step.jitted_fn._cache_size() - before == 1


def test_dpo_raises_the_chosen_margin(tiny: Path, tmp_path: Path) -> None:
    optimiser = JaxOptimiser(
        JaxOptimiserConfig(
            algorithm="dpo",
            dpo=DPOSettings(learning_rate=5e-3, max_steps=3, batch_size=12, max_length=256),
        )
    )
    report = optimiser.optimise(
        str(tiny),
        str(tiny),
        None,
        [],
        marker_set(12),
        tmp_path / "dpo",  # type: ignore[arg-type]
    )
    metrics = report.metrics
    assert metrics["loss_first"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference
    assert metrics["loss_last"] < metrics["loss_first"]
    assert metrics["margin_last"] > 0
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")


def test_runs_on_a_two_device_mesh(tiny: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax, jax.numpy as jnp, numpy as np
        from pathlib import Path
        from caikit_jax import model as m
        from caikit_jax.plugin import JaxPreferenceConfig
        from caikit_jax.reward import JaxPreferenceModel
        from caikit_core.testing.checks import marker_set
        assert jax.device_count() == 2, jax.devices()
        model = m.load_model({str(tiny)!r})
        shards = len(model.embedder.input_embedding.value.sharding.device_set)
        ids = jnp.asarray([[1, 5, 9, 20, 33, 40, 7, 100]], dtype=jnp.int32)
        logits = np.asarray(m.logits(model, ids, jnp.ones_like(ids)))
        pm = JaxPreferenceModel(JaxPreferenceConfig(max_steps=2, batch_size=4, max_length=128),
                                {str(tiny)!r})
        report = pm.fit(marker_set(8), Path({str(tmp_path / "pm")!r}))
        print(json.dumps({{"shards": shards, "logits": logits.tolist(),
                          "loss": report.metrics["loss_last"]}}))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["shards"] == 2
    ids = np.array([[1, 5, 9, 20, 33, 40, 7, 100]], dtype=np.int32)
    expected = _torch_logits(tiny, ids, np.ones_like(ids))
    assert np.abs(np.array(found["logits"]) - expected).max() < 1e-3
    assert np.isfinite(found["loss"])


def test_the_jax_plugins_need_no_torch(tiny: Path, tmp_path: Path) -> None:
    """With torch unimportable, the jax preference model, SFT and DPO still run."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from pathlib import Path
        from caikit_core.testing.checks import marker_set, toy_traces
        from caikit_jax.plugin import JaxOptimiserConfig, JaxPreferenceConfig
        from caikit_jax.reward import JaxPreferenceModel
        from caikit_jax.optimiser import JaxOptimiser
        from caikit_core.training.settings import DPOSettings, SFTSettings
        tiny, out = {str(tiny)!r}, Path({str(tmp_path)!r})
        pm = JaxPreferenceModel(JaxPreferenceConfig(max_steps=1, batch_size=4, max_length=96), tiny)
        pm.fit(marker_set(4), out / "pm")
        small = dict(max_steps=1, batch_size=4, max_length=128)
        JaxOptimiser(JaxOptimiserConfig(sft=SFTSettings(**small))).sft(
            tiny, toy_traces(4), out / "sft"
        )
        dpo = JaxOptimiser(JaxOptimiserConfig(algorithm="dpo", dpo=DPOSettings(**small)))
        dpo.optimise(tiny, tiny, pm, [], marker_set(4), out / "dpo")
        print("torch-free:", "torch" not in {{k for k, v in sys.modules.items() if v is not None}})
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "torch-free: True"


# --- the conformance kit -------------------------------------------------------------------

# with the quick settings the jax plugins register (check_settings), as `caikit check`
# runs them


@parametrize_with_checks("preference_model", "jax")
def test_preference_model_jax(check: Any) -> None:
    check()


@parametrize_with_checks("policy_optimiser", "jax")
def test_policy_optimiser_jax(check: Any) -> None:
    check()


def test_caikit_check_passes_for_the_jax_preference_model() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", "check", "preference_model", "jax"],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, CAIKIT_LOAD_PLUGINS="jax"),
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "3 passed" in done.stdout


# --- one line of config ----------------------------------------------------------------------


def test_the_same_run_file_with_plugin_jax(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caikit_core.config import load_run
    from caikit_core.runner import Runner

    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "hf,feedback,local,torch,jax")
    monkeypatch.chdir(tmp_path)
    plugins.reset()
    manager = plugins.get_plugin_manager()
    if "jax" not in manager.plugin_origins():  # an egg-info from before the jax entry point
        import caikit_jax.plugin

        manager.register(caikit_jax.plugin, "jax")
    registry = plugins.get_registry()
    questions = ["Why is the sky blue?", "How do I bake bread?", "Tell me about the sea.", "Hi!"]
    (tmp_path / "prompts.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    text = RL_RUN.format(policy=tiny).replace('algorithm = "rloo"', 'algorithm = "dpo"')
    statuses = {}
    artifacts = {}
    for backend in ("torch", "jax"):
        path = tmp_path / "run.toml"
        path.write_text(text.replace('plugin = "torch"', f'plugin = "{backend}"'), "utf-8")
        summary = Runner(load_run(path, registry)).execute()
        statuses[backend] = {s.name: s.status for s in summary.stages}
        artifacts[backend] = {s.name: s.artifact for s in summary.stages}
    assert statuses["jax"] == {
        "prompts": "skipped",
        "pairs": "skipped",
        "labels": "skipped",
        "preference_model": "ran",
        "policy": "ran",
    }
    policy = artifacts["jax"]["policy"]
    assert policy is not None and policy != artifacts["torch"]["policy"]
    assert json.loads((policy / "caikit_rl.json").read_text())["backend"] == "jax"
    transformers.AutoModelForCausalLM.from_pretrained(policy)
    plugins.reset()


@pytest.mark.slow
def test_logits_match_pytorch_on_smollm2() -> None:
    from caikit_hf.models import fetch_model, fetched_model

    folder = fetched_model("smollm2-135m-instruct") or fetch_model("smollm2-135m-instruct")
    model = jax_model.load_model(folder)
    assert model.config.rope_theta == 100000.0 and model.config.weight_tying
    ids, mask = _batch()
    theirs = _torch_logits(Path(folder), ids, mask)
    ours = np.asarray(jax_model.logits(model, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    # 30 float32 layers: relative to the logits' scale, not the tiny models' absolute 1e-3
    # (measured 2026-12-03: max difference 1.53e-3 on logits up to 33.0, i.e. 4.6e-5 of
    # it, mean 7.3e-5; every position's most likely token the same)
    scale = float(np.abs(theirs[real]).max())
    assert float(np.abs(ours - theirs)[real].max()) < 1e-4 * scale
    np.testing.assert_array_equal(ours.argmax(-1)[real], theirs.argmax(-1)[real])
