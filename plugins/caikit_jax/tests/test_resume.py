"""Resumable fits of the ``jax`` plugins (SFT, the preference model, DPO): killed
after a chosen step (an exception from the step function or Tunix's step hook) and
resumed in a fresh call from the checkpoint :mod:`caikit_jax.checkpoints` saved."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest

pytest.importorskip("tunix")

from safetensors.numpy import load_file

from caikit_core.errors import PluginError
from caikit_core.records import (
    Comparison,
    LabelledComparison,
    PreferenceLabel,
    RevisionStep,
    RevisionTrace,
    conversation,
)
from caikit_core.testing.tiny_models import TINY_CORPUS
from caikit_core.training.settings import DPOSettings, SFTSettings
from caikit_jax import checkpoints, dpo, reward, sft
from caikit_jax.config import JaxOptimiserConfig, JaxPreferenceConfig
from caikit_jax.optimiser import JaxOptimiser
from caikit_jax.reward import JaxPreferenceModel


class Killed(Exception):
    """Stands for a kill."""


def traces(n: int) -> list[RevisionTrace]:
    out = []
    for i in range(n):
        final = TINY_CORPUS[(i + 3) % len(TINY_CORPUS)]
        out.append(
            RevisionTrace(
                id=f"t{i}",
                prompt_id=f"p{i}",
                messages=conversation(("user", TINY_CORPUS[i % len(TINY_CORPUS)])),
                initial_response="no.",
                steps=(RevisionStep(0, "h", "c", "crit", "rev", final),),
                final_response=final,
            )
        )
    return out


def comparisons(n: int) -> list[LabelledComparison]:
    out = []
    for i in range(n):
        messages = conversation(("user", TINY_CORPUS[i % len(TINY_CORPUS)]))
        a, b = TINY_CORPUS[(i + 1) % len(TINY_CORPUS)], TINY_CORPUS[(i + 2) % len(TINY_CORPUS)]
        comparison = Comparison(f"c{i}", f"p{i}", messages, a, b)
        p_a = 0.9 if i % 2 else 0.2
        out.append(LabelledComparison(comparison, PreferenceLabel(f"l{i}", f"c{i}", p_a, "t")))
    return out


def kill_after(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, k: int) -> None:
    """``module.name`` (a step function) raises :class:`Killed` on its call ``k + 1``."""
    original = getattr(module, name)
    calls = [0]

    def step(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > k:
            raise Killed(f"killed after step {k}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, step)


def weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, what: str) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = max(float(np.abs(wa[k].astype(np.float64) - wb[k].astype(np.float64)).max()) for k in wa)
    print(f"{what} weight difference:", diff)
    assert diff == 0.0  # bitwise on CPU (docs/reliability.md#resumable-training)


def checkpoint_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sft_config(**kw: Any) -> JaxOptimiserConfig:
    settings = SFTSettings(learning_rate=1e-3, epochs=2, batch_size=2, max_length=64)
    return JaxOptimiserConfig(**{"device": "cpu", "seed": 3, "sft": settings, **kw})


def test_killed_and_resumed_sft_equals_an_uninterrupted_run_bitwise(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """6 traces, batch 2, 2 epochs: 6 steps (3 per epoch); checkpoints every 2; killed
    after step 5 (resumes at step 4, one batch into epoch 1)."""
    straight = JaxOptimiser(sft_config())
    straight.sft(str(tiny_llama), traces(6), tmp_path / "straight")
    ckpt = tmp_path / "checkpoints"
    with monkeypatch.context() as m:
        kill_after(m, sft, "sft_step", 5)
        with pytest.raises(Killed):
            JaxOptimiser(sft_config(checkpoint_every_steps=2)).sft(
                str(tiny_llama), traces(6), tmp_path / "a", checkpoint_dir=ckpt
            )
    assert checkpoint_files(ckpt) == [
        "step-4/caikit_checkpoint.json",
        "step-4/loop.json",
        "step-4/model.json",
        "step-4/model.safetensors",
        "step-4/optimizer.json",
        "step-4/optimizer.safetensors",
    ]
    marker = json.loads((ckpt / "step-4" / checkpoints.MARKER).read_text())
    assert (marker["step"], marker["fit"], marker["backend"]) == (4, "sft", "jax")
    resumed = JaxOptimiser(sft_config(checkpoint_every_steps=2))
    resumed.sft(str(tiny_llama), traces(6), tmp_path / "b", checkpoint_dir=ckpt)
    assert [s for s, _ in resumed.losses] == [s for s, _ in straight.losses] == list(range(1, 7))
    assert resumed.losses == straight.losses  # bitwise on CPU
    assert_same_weights(tmp_path / "straight", tmp_path / "b", "sft")


@pytest.mark.slow
def test_killed_and_resumed_preference_model_equals_an_uninterrupted_run_bitwise(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 comparisons, batch 2, 2 epochs: 8 steps; checkpoints every 3; killed after
    step 7 (resumes at step 6, two batches into epoch 1)."""

    def config(**kw: Any) -> JaxPreferenceConfig:
        return JaxPreferenceConfig(
            device="cpu", learning_rate=3e-3, epochs=2, batch_size=2, max_length=64, **kw
        )

    data = comparisons(8)
    straight = JaxPreferenceModel(config(), str(tiny_llama))
    first = straight.fit(data, tmp_path / "straight")
    ckpt = tmp_path / "checkpoints"
    with monkeypatch.context() as m:
        kill_after(m, reward, "_train_step", 7)
        with pytest.raises(Killed):
            JaxPreferenceModel(config(checkpoint_every_steps=3), str(tiny_llama)).fit(
                data, tmp_path / "a", checkpoint_dir=ckpt
            )
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-6"]
    resumed = JaxPreferenceModel(config(checkpoint_every_steps=3), str(tiny_llama))
    second = resumed.fit(data, tmp_path / "b", checkpoint_dir=ckpt)
    assert [s for s, _ in resumed.losses] == list(range(1, 9))
    assert resumed.losses == straight.losses
    assert second.metrics["loss"] == first.metrics["loss"]
    assert_same_weights(tmp_path / "straight", tmp_path / "b", "preference model")


@pytest.mark.slow
def test_killed_and_resumed_dpo_equals_an_uninterrupted_run_bitwise(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 pairs, batch 2, 2 epochs: 8 steps of Tunix's DPOTrainer; checkpoints every 3;
    killed after step 7 (resumes at step 6)."""

    def config(**kw: Any) -> JaxOptimiserConfig:
        settings = DPOSettings(learning_rate=1e-3, epochs=2, batch_size=2, max_length=64)
        return JaxOptimiserConfig(device="cpu", seed=3, algorithm="dpo", dpo=settings, **kw)

    data = comparisons(8)
    policy = str(tiny_llama)
    straight = JaxOptimiser(config())
    straight.optimise(policy, policy, None, [], data, tmp_path / "straight")  # type: ignore[arg-type]
    ckpt = tmp_path / "checkpoints"
    original = dpo.LossRecorder.on_train_step_start

    def start(self: Any, train_ctx: Any) -> None:
        original(self, train_ctx)
        if train_ctx.train_steps == 7:
            raise Killed("killed after step 7")

    with monkeypatch.context() as m:
        m.setattr(dpo.LossRecorder, "on_train_step_start", start)
        with pytest.raises(Killed):
            JaxOptimiser(config(checkpoint_every_steps=3)).optimise(
                policy,
                policy,
                None,
                [],
                data,
                tmp_path / "a",
                checkpoint_dir=ckpt,  # type: ignore[arg-type]
            )
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-6"]
    resumed = JaxOptimiser(config(checkpoint_every_steps=3))
    resumed.optimise(policy, policy, None, [], data, tmp_path / "b", checkpoint_dir=ckpt)  # type: ignore[arg-type]
    assert [s for s, _ in resumed.losses] == [s for s, _ in straight.losses] == list(range(1, 9))
    assert resumed.losses == straight.losses
    assert_same_weights(tmp_path / "straight", tmp_path / "b", "dpo")


def test_a_checkpoint_with_a_pickle_file_or_other_settings_is_refused(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "checkpoints"
    with monkeypatch.context() as m:
        kill_after(m, sft, "sft_step", 3)
        with pytest.raises(Killed):
            JaxOptimiser(sft_config(checkpoint_every_steps=2)).sft(
                str(tiny_llama), traces(6), tmp_path / "a", checkpoint_dir=ckpt
            )
    with pytest.raises(PluginError, match=r"jax: checkpoint .*step-2 was saved .*\(seed\)"):
        JaxOptimiser(sft_config(checkpoint_every_steps=2, seed=4)).sft(
            str(tiny_llama), traces(6), tmp_path / "b", checkpoint_dir=ckpt
        )
    (ckpt / "step-2" / "optimizer.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(PluginError, match=r"optimizer\.pkl\); refusing to resume from it"):
        JaxOptimiser(sft_config(checkpoint_every_steps=2)).sft(
            str(tiny_llama), traces(6), tmp_path / "c", checkpoint_dir=ckpt
        )


RUN = """\
output_dir = "{out}"
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
revisions = 1

[policy_optimiser]
plugin = "jax"
device = "cpu"
checkpoint_every_steps = {every}

[policy_optimiser.sft]
learning_rate = 0.01
max_steps = 6
batch_size = 2
max_length = 128
"""


@pytest.fixture
def with_jax(with_echo: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Only the echo fixture plugins, the local executor and the jax plugin."""
    import caikit_jax.plugin as jax_plugin
    from caikit_core import plugins

    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "echo,local,jax")
    plugins.reset()
    manager = plugins.get_plugin_manager()
    if "jax" not in manager.plugin_origins():
        manager.register(jax_plugin, "jax")
    yield
    plugins.reset()


@pytest.mark.slow
def test_a_killed_jax_sft_stage_resumes_on_rerun_through_the_runner(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_jax: None
) -> None:
    """The runner hands the jax optimiser (``resumable``) stages/sft/<fp>/checkpoints;
    a rerun after the kill continues there, ends bitwise as an uninterrupted run, and
    removes the folder (checkpoint_every_steps is not fingerprinted)."""
    from caikit_core import plugins
    from caikit_core.config import load_run
    from caikit_core.runner import Runner
    from tests.shared import PROMPTS

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    def runner(out: str, every: int) -> Runner:
        path = tmp_path / f"{out}.toml"
        path.write_text(RUN.format(out=out, policy=tiny_llama, every=every), encoding="utf-8")
        return Runner(load_run(path, plugins.get_registry()))

    straight = runner("straight", 100).execute().stage("sft")
    with monkeypatch.context() as m:
        kill_after(m, sft, "sft_step", 3)
        with pytest.raises(Killed):
            runner("killed", 2).execute()
    stage_dirs = list((tmp_path / "killed" / "stages" / "sft").iterdir())
    assert [p.name for p in stage_dirs] == [straight.path.name]  # the same fingerprint
    kept = stage_dirs[0] / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-2"]
    resumed = runner("killed", 2).execute().stage("sft")
    assert resumed.status == "ran" and not kept.exists()
    assert straight.artifact is not None and resumed.artifact is not None
    a_record = json.loads((straight.artifact / "caikit_sft.json").read_text())
    b_record = json.loads((resumed.artifact / "caikit_sft.json").read_text())
    assert [s for s, _ in b_record["losses"]] == list(range(1, 7))
    assert b_record["losses"] == a_record["losses"]
    assert_same_weights(straight.artifact, resumed.artifact, "sft stage")


def ppo_config(**kw: Any) -> JaxOptimiserConfig:
    """4 PPO steps of 2 rollouts of 1 prompt, 2 epochs each, adaptive KL."""
    from caikit_jax.tests.test_ppo import _config

    base = _config(steps=4, mini_batch_size=1, epochs=2, adaptive_kl=True, target_kl=0.01)
    return JaxOptimiserConfig(**{**attrs.asdict(base, recurse=False), "device": "cpu", **kw})


class KillingReward:
    """:class:`~caikit_jax.tests.test_ppo.FractionalLengthReward` that raises
    :class:`Killed` on its call ``kill_at`` (one call per rollout), in Tunix's data
    thread: a kill in the middle of a PPO step."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, kill_at: int | None = None) -> None:
        from caikit_jax.tests.test_ppo import FractionalLengthReward

        self.inner, self.kill_at = FractionalLengthReward(), kill_at

    def fit(self, labelled: Any, out: Path) -> Any:
        return self.inner.fit(labelled, out)

    def load(self, path: Path) -> None:
        pass

    def score(self, samples: Any) -> list[float]:
        if self.kill_at is not None and len(self.inner.calls) + 1 == self.kill_at:
            raise Killed(f"killed in rollout {self.kill_at}")
        return self.inner.score(samples)

    @property
    def calls(self) -> list[list[Any]]:
        return self.inner.calls


@pytest.mark.slow
def test_killed_and_resumed_ppo_equals_an_uninterrupted_run_bitwise(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """4 PPO steps of 2 rollouts of 1 prompt, 2 epochs each (16 optimiser steps of the
    actor and of the critic), adaptive KL; a checkpoint after every step; killed in the
    first rollout of step 3 (resumes at step 2; the resumed run saves step 3, which
    must hold steps 1 and 2's records too)."""
    from caikit_jax.tests.test_ppo import _prompts

    config = ppo_config

    policy = str(tiny_llama)
    straight_reward = KillingReward()
    straight = JaxOptimiser(config())
    first = straight.optimise(
        policy, policy, straight_reward, _prompts(), [], tmp_path / "straight"
    )
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(Killed):
        JaxOptimiser(config(checkpoint_every_steps=1)).optimise(
            policy,
            policy,
            KillingReward(kill_at=5),
            _prompts(),
            [],
            tmp_path / "a",
            checkpoint_dir=ckpt,
        )
    assert checkpoint_files(ckpt) == [
        "step-2/actor.json",
        "step-2/actor.safetensors",
        "step-2/actor_optimizer.json",
        "step-2/actor_optimizer.safetensors",
        "step-2/caikit_checkpoint.json",
        "step-2/critic.json",
        "step-2/critic.safetensors",
        "step-2/critic_optimizer.json",
        "step-2/critic_optimizer.safetensors",
        "step-2/loop.json",
    ]
    marker = json.loads((ckpt / "step-2" / checkpoints.MARKER).read_text())
    assert (marker["step"], marker["fit"], marker["backend"]) == (2, "ppo", "jax")
    resumed_reward = KillingReward()
    resumed = JaxOptimiser(config(checkpoint_every_steps=1))
    second = resumed.optimise(
        policy, policy, resumed_reward, _prompts(), [], tmp_path / "b", checkpoint_dir=ckpt
    )
    # saved after the resume: the whole run's records so far, not only the resumed part
    saved = json.loads((ckpt / "step-3" / checkpoints.LOOP).read_text())
    assert saved["step"] == 3 and saved["rollout_calls"] == 6 and len(saved["rollouts"]) == 6
    per_step = [float(np.mean(saved["histories"]["actor/loss"][i : i + 4])) for i in (0, 4, 8)]
    assert per_step == [loss for _, loss in straight.losses[:3]]
    # the same responses were sampled in steps 3 and 4 (the rollouts' seed counter)
    assert resumed_reward.calls == straight_reward.calls[4:]
    assert [s for s, _ in resumed.losses] == [s for s, _ in straight.losses] == [1, 2, 3, 4]
    assert resumed.losses == straight.losses  # bitwise on CPU
    assert untimed(second.history) == untimed(first.history)
    assert first.history[-1]["beta"] != first.history[0]["beta"]  # the controller moved
    # the resumed run's first two steps keep the times the killed run measured
    assert [r["time/train"] for r in second.history[:2]] == [
        saved["seconds"][k]["train"] for k in sorted(saved["seconds"])[:2]
    ]
    assert untimed([second.metrics]) == untimed([first.metrics])
    assert_same_weights(tmp_path / "straight", tmp_path / "b", "ppo")


def untimed(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """``rows`` less what measures time (``time/*``, ``seconds``, ``seconds_per_step``),
    which no rerun repeats."""
    timing = ("time/", "seconds")
    return [{k: v for k, v in row.items() if not k.startswith(timing)} for row in rows]


PPO_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from caikit_jax.optimiser import JaxOptimiser
    from caikit_jax.tests.test_ppo import FractionalLengthReward, _prompts
    from caikit_jax.tests.test_resume import ppo_config
    tiny, out, ckpt, kill_at = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    class Reward(FractionalLengthReward):
        def score(self, samples):
            if len(self.calls) + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().score(samples)
    JaxOptimiser(ppo_config(checkpoint_every_steps=1)).optimise(
        tiny, tiny, Reward(), _prompts(), [], out, checkpoint_dir=ckpt)
    """
)


@pytest.mark.slow
def test_a_sigkilled_jax_ppo_process_resumes_to_the_same_weights(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A real SIGKILL (in the second rollout of step 3, from Tunix's data thread), then
    a fresh process resumes from step-2: its record (per-step losses, metrics) and
    weights equal an uninterrupted run's."""
    from caikit_jax.common import RL_RECORD
    from caikit_jax.tests.test_ppo import FractionalLengthReward, _prompts

    policy = str(tiny_llama)
    JaxOptimiser(ppo_config()).optimise(
        policy, policy, FractionalLengthReward(), _prompts(), [], tmp_path / "straight"
    )
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'plugins'}"}
    script = tmp_path / "ppo_run.py"
    script.write_text(PPO_SCRIPT)
    ckpt = tmp_path / "checkpoints"
    args = [sys.executable, str(script), policy]
    killed = subprocess.run(
        [*args, str(tmp_path / "a"), str(ckpt), "6"], env=env, capture_output=True, check=False
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2"]
    done = subprocess.run(
        [*args, str(tmp_path / "b"), str(ckpt), "0"], env=env, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    a = json.loads((tmp_path / "straight" / RL_RECORD).read_text())
    b = json.loads((tmp_path / "b" / RL_RECORD).read_text())
    assert [s for s, _ in b["losses"]] == [1, 2, 3, 4]
    assert b["losses"] == a["losses"]
    assert untimed([b["metrics"]]) == untimed([a["metrics"]])
    assert_same_weights(tmp_path / "straight", tmp_path / "b", "ppo after SIGKILL")


RL_RUN = """\
output_dir = "{out}"
phases = ["sl", "rl"]
seed = 1
batch_size = 4
shard_size = 4

[models]
policy = "{policy}"

[data]
prompts = "prompts.txt"

[sl]
sft = false

[generator]
plugin = "echo"

[critic]
plugin = "shout"
revisions = 1

[labeller]
plugin = "length"

[preference_model]
plugin = "wordcount"

[policy_optimiser]
plugin = "jax"
device = "cpu"
algorithm = "ppo"
checkpoint_every_steps = {every}

[policy_optimiser.ppo]
steps = 3
rollout_batch_size = 2
mini_batch_size = 1
max_new_tokens = 6
learning_rate = 1e-3
max_length = 128
"""


@pytest.mark.slow
def test_a_killed_jax_ppo_policy_stage_resumes_on_rerun_through_the_runner(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_jax: None
) -> None:
    """The policy stage (jax PPO, 3 steps of 2 rollouts, the echo plugins' wordcount
    preference model) killed in the second rollout of step 2, with a checkpoint after
    every step: stages/policy/<fp>/checkpoints keeps step-1, and a rerun finishes the
    stage with per-step history, losses and weights bitwise equal to an uninterrupted
    run's, and removes the folder."""
    from caikit_core import plugins
    from caikit_core.config import load_run
    from caikit_core.runner import Runner
    from caikit_jax import ppo
    from caikit_jax.common import RL_RECORD
    from tests.shared import PROMPTS

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")

    def runner(out: str, every: int) -> Runner:
        path = tmp_path / f"{out}.toml"
        path.write_text(RL_RUN.format(out=out, policy=tiny_llama, every=every), encoding="utf-8")
        return Runner(load_run(path, plugins.get_registry()))

    straight = runner("straight", 100).execute().stage("policy")
    with monkeypatch.context() as m:
        kill_after(m, ppo, "_scores", 3)  # the 4th rollout: step 2's second
        with pytest.raises(Killed):
            runner("killed", 1).execute()
    stage_dirs = list((tmp_path / "killed" / "stages" / "policy").iterdir())
    assert [p.name for p in stage_dirs] == [straight.path.name]  # the same fingerprint
    kept = stage_dirs[0] / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-1"]
    resumed = runner("killed", 1).execute().stage("policy")
    assert resumed.status == "ran" and not kept.exists()
    assert straight.artifact is not None and resumed.artifact is not None
    a_record = json.loads((straight.artifact / RL_RECORD).read_text())
    b_record = json.loads((resumed.artifact / RL_RECORD).read_text())
    assert [s for s, _ in b_record["losses"]] == [1, 2, 3]
    assert b_record["losses"] == a_record["losses"]
    assert len(resumed.history) == 3 and untimed(resumed.history) == untimed(straight.history)
    assert_same_weights(straight.artifact, resumed.artifact, "policy stage")
