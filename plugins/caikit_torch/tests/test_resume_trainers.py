"""Resumable TRL fits of the ``torch`` plugins (SFT, the preference model): killed
mid-epoch (an exception from ``Trainer.training_step`` at a chosen step) and resumed
in a fresh call, with HF Trainer's checkpoints whose pickle files caikit replaces by
safetensors + JSON (``caikit_torch.checkpoints.make_resumable``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from safetensors.torch import load_file  # noqa: E402

from caikit_core.records import RevisionStep, RevisionTrace, conversation  # noqa: E402
from caikit_core.testing.tiny_models import TINY_CORPUS  # noqa: E402
from caikit_core.training.settings import SFTSettings  # noqa: E402
from caikit_torch import checkpoints  # noqa: E402
from caikit_torch.optimiser import TorchOptimiser  # noqa: E402
from caikit_torch.plugin import TorchOptimiserConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Largest per-step loss difference allowed between a resumed and an uninterrupted
#: run (measured: 0 on CPU, see docs/reliability.md#resumable-training).
LOSS_TOLERANCE = 1e-6
#: Largest weight difference allowed likewise.
WEIGHT_TOLERANCE = 1e-6


class Killed(Exception):
    """Stands for a kill."""


@pytest.fixture
def kill_at_step(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``kill_at_step(k)``: the next training raises :class:`Killed` when it starts
    optimiser step ``k + 1`` (after step ``k``'s checkpoint is saved)."""
    original = transformers.Trainer.training_step

    def arm(k: int | None) -> None:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            if k is not None and self.state.global_step == k:
                raise Killed(f"killed after step {k}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(transformers.Trainer, "training_step", step)

    return arm


def traces(n: int) -> list[RevisionTrace]:
    out = []
    for i in range(n):
        text = TINY_CORPUS[i % len(TINY_CORPUS)]
        final = TINY_CORPUS[(i + 3) % len(TINY_CORPUS)]
        out.append(
            RevisionTrace(
                id=f"t{i}",
                prompt_id=f"p{i}",
                messages=conversation(("user", text)),
                initial_response="no.",
                steps=(RevisionStep(0, "h", "c", "crit", "rev", final),),
                final_response=final,
            )
        )
    return out


def sft_config(**kw: Any) -> TorchOptimiserConfig:
    return TorchOptimiserConfig(
        device="cpu",
        seed=3,
        sft=SFTSettings(learning_rate=1e-3, epochs=2, batch_size=2, max_length=64),
        **kw,
    )


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize(
    ("killed_after", "resumed_from"),
    [pytest.param(5, 4, marks=pytest.mark.slow, id="epoch0"), pytest.param(9, 8, id="epoch1")],
)
def test_killed_and_resumed_sft_matches_an_uninterrupted_run(
    tiny_llama: Path, tmp_path: Path, kill_at_step: Any, killed_after: int, resumed_from: int
) -> None:
    """12 examples, batch 2, 2 epochs: 12 steps (6 per epoch); checkpoints every 4;
    killed after step 5 (resumes at step 4, 4 batches into epoch 0) or 9 (resumes at
    step 8, 2 batches into epoch 1: the case transformers #39215 is about)."""
    data = traces(12)
    straight = TorchOptimiser(sft_config())
    straight.sft(str(tiny_llama), data, tmp_path / "straight")
    ckpt = tmp_path / "checkpoints"
    kill_at_step(killed_after)
    with pytest.raises(Killed):
        TorchOptimiser(sft_config(checkpoint_every_steps=4)).sft(
            str(tiny_llama), data, tmp_path / "a", checkpoint_dir=ckpt
        )
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == [f"checkpoint-{resumed_from}"]
    saved = ckpt / f"checkpoint-{resumed_from}"
    names = sorted(p.name for p in saved.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl"))], names
    assert {"optimizer.safetensors", "scheduler.json", "rng_state.safetensors"} <= set(names)
    kill_at_step(None)
    resumed = TorchOptimiser(sft_config(checkpoint_every_steps=4))
    resumed.sft(str(tiny_llama), data, tmp_path / "b", checkpoint_dir=ckpt)
    assert [s for s, _ in resumed.losses] == [s for s, _ in straight.losses]
    diffs = [abs(a - b) for (_, a), (_, b) in zip(resumed.losses, straight.losses, strict=True)]
    print("sft loss differences:", max(diffs))
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    print("sft weight difference:", max_diff(a, b))
    assert max_diff(a, b) <= WEIGHT_TOLERANCE
    record = json.loads((ckpt / "checkpoint-8" / checkpoints.MARKER).read_text())
    assert record == {"fit": "sft", "step": 8}  # the newest; none after the last step


def test_rng_and_nested_state_round_trip_through_safetensors_and_json(tmp_path: Path) -> None:
    import random

    import numpy as np

    checkpoints.save_state(tmp_path, "rng", checkpoints.get_rng_state())
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    checkpoints.set_rng_state(checkpoints.load_state(tmp_path, "rng"))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    state = {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}, "groups": [{"betas": (0.9, 0.99)}]}
    checkpoints.save_state(tmp_path, "nested", state)
    back = checkpoints.load_state(tmp_path, "nested")
    assert back["groups"] == [{"betas": (0.9, 0.99)}] and torch.equal(back[0]["m"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "nested.json",
        "nested.safetensors",
        "rng.json",
        "rng.safetensors",
    ]


def comparisons(n: int) -> list[Any]:
    from caikit_core.records import Comparison, LabelledComparison, PreferenceLabel

    out = []
    for i in range(n):
        messages = conversation(("user", TINY_CORPUS[i % len(TINY_CORPUS)]))
        a, b = TINY_CORPUS[(i + 1) % len(TINY_CORPUS)], TINY_CORPUS[(i + 2) % len(TINY_CORPUS)]
        p_a = 0.9 if i % 2 else 0.2
        comparison = Comparison(f"c{i}", f"p{i}", messages, a, b)
        out.append(LabelledComparison(comparison, PreferenceLabel(f"l{i}", f"c{i}", p_a, "t")))
    return out


def test_killed_and_resumed_preference_model_matches_an_uninterrupted_run(
    tiny_llama: Path, tmp_path: Path, kill_at_step: Any
) -> None:
    """10 comparisons, batch 2, 2 epochs: 10 steps (5 per epoch); checkpoints every 3;
    killed after step 7 (resumes at step 6, 1 batch into epoch 1)."""
    from caikit_torch.plugin import TorchPreferenceConfig
    from caikit_torch.reward import TorchPreferenceModel

    def config(**kw: Any) -> Any:
        return TorchPreferenceConfig(
            device="cpu", learning_rate=3e-3, epochs=2, batch_size=2, max_length=64, **kw
        )

    data = comparisons(10)
    straight = TorchPreferenceModel(config(), str(tiny_llama))
    first = straight.fit(data, tmp_path / "straight")
    ckpt = tmp_path / "checkpoints"
    kill_at_step(7)
    with pytest.raises(Killed):
        TorchPreferenceModel(config(checkpoint_every_steps=3), str(tiny_llama)).fit(
            data, tmp_path / "a", checkpoint_dir=ckpt
        )
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-6"]
    names = [p.name for p in (ckpt / "checkpoint-6").rglob("*") if p.is_file()]
    assert all(n.endswith((".safetensors", ".json", ".txt", ".jinja")) for n in names), names
    kill_at_step(None)
    resumed = TorchPreferenceModel(config(checkpoint_every_steps=3), str(tiny_llama))
    second = resumed.fit(data, tmp_path / "b", checkpoint_dir=ckpt)
    assert [s for s, _ in resumed.losses] == [s for s, _ in straight.losses] == list(range(1, 11))
    diffs = [abs(a - b) for (_, a), (_, b) in zip(resumed.losses, straight.losses, strict=True)]
    print("pm loss differences:", max(diffs))
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    print("pm weight difference:", max_diff(a, b))
    assert max_diff(a, b) <= WEIGHT_TOLERANCE
    assert abs(first.metrics["loss"] - second.metrics["loss"]) <= LOSS_TOLERANCE


def test_killed_and_resumed_dpo_matches_an_uninterrupted_run(
    tiny_llama: Path, tmp_path: Path, kill_at_step: Any
) -> None:
    """10 pairs, batch 2, 2 epochs: 10 steps; checkpoints every 3; killed after step 7
    (resumes at step 6, one batch into epoch 1)."""
    from caikit_core.training.settings import DPOSettings

    def config(**kw: Any) -> TorchOptimiserConfig:
        dpo = DPOSettings(learning_rate=1e-3, epochs=2, batch_size=2, max_length=64)
        return TorchOptimiserConfig(device="cpu", seed=3, algorithm="dpo", dpo=dpo, **kw)

    def losses(report: Any) -> list[tuple[int, float]]:
        return [(int(h["step"]), float(h["loss"])) for h in report.history if "loss" in h]

    data = comparisons(10)
    policy = str(tiny_llama)
    straight = TorchOptimiser(config()).optimise(
        policy, policy, None, [], data, tmp_path / "straight"
    )
    ckpt = tmp_path / "checkpoints"
    kill_at_step(7)
    with pytest.raises(Killed):
        TorchOptimiser(config(checkpoint_every_steps=3)).optimise(
            policy, policy, None, [], data, tmp_path / "a", checkpoint_dir=ckpt
        )
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-6"]
    kill_at_step(None)
    resumed = TorchOptimiser(config(checkpoint_every_steps=3)).optimise(
        policy, policy, None, [], data, tmp_path / "b", checkpoint_dir=ckpt
    )
    a_losses, b_losses = losses(straight), losses(resumed)
    assert [s for s, _ in a_losses] == [s for s, _ in b_losses] == list(range(1, 11))
    diffs = [abs(x - y) for (_, x), (_, y) in zip(a_losses, b_losses, strict=True)]
    print("dpo loss differences:", max(diffs))
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    print("dpo weight difference:", max_diff(a, b))
    assert max_diff(a, b) <= WEIGHT_TOLERANCE


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
plugin = "torch"
device = "cpu"
checkpoint_every_steps = {every}

[policy_optimiser.sft]
learning_rate = 0.01
max_steps = 6
batch_size = 2
max_length = 128
"""


@pytest.fixture
def with_torch(with_echo: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Only the echo fixture plugins, the local executor and the torch plugin."""
    import caikit_torch.plugin as torch_plugin
    from caikit_core import plugins

    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "echo,local,torch")
    plugins.reset()
    manager = plugins.get_plugin_manager()
    if "torch" not in manager.plugin_origins():
        manager.register(torch_plugin, "torch")
    yield
    plugins.reset()


def test_a_killed_sft_stage_resumes_on_rerun_through_the_runner(
    tiny_llama: Path, tmp_path: Path, kill_at_step: Any, with_torch: None
) -> None:
    """The runner hands the torch optimiser stages/sft/<fp>/checkpoints; a rerun after
    the kill continues there, ends as an uninterrupted run, and removes the folder.
    (checkpoint_every_steps is not fingerprinted: both runs share the stage folder.)"""
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
    kill_at_step(3)
    with pytest.raises(Killed):
        runner("killed", 2).execute()
    stage_dirs = list((tmp_path / "killed" / "stages" / "sft").iterdir())
    assert [p.name for p in stage_dirs] == [straight.path.name]  # the same fingerprint
    kept = stage_dirs[0] / "checkpoints"
    assert sorted(p.name for p in kept.glob("checkpoint-*")) == ["checkpoint-2"]
    kill_at_step(None)
    resumed = runner("killed", 2).execute().stage("sft")
    assert resumed.status == "ran" and not kept.exists()
    assert straight.artifact is not None and resumed.artifact is not None
    a_record = json.loads((straight.artifact / "caikit_sft.json").read_text())
    b_record = json.loads((resumed.artifact / "caikit_sft.json").read_text())
    assert [s for s, _ in b_record["losses"]] == list(range(1, 7))
    diffs = [
        abs(x - y) for (_, x), (_, y) in zip(a_record["losses"], b_record["losses"], strict=True)
    ]
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    a = load_file(str(straight.artifact / "model.safetensors"))
    b = load_file(str(resumed.artifact / "model.safetensors"))
    assert max_diff(a, b) <= WEIGHT_TOLERANCE


class LowercasePM:
    """A reward: 0.1 per lowercase letter of the response."""

    capabilities: frozenset[str] = frozenset()

    def score(self, samples: Any) -> list[float]:
        return [sum(c.islower() for c in s.response) / 10 for s in samples]


@pytest.mark.parametrize("algorithm", ["grpo", pytest.param("rloo", marks=pytest.mark.slow)])
def test_killed_and_resumed_group_rl_matches_an_uninterrupted_run(
    tiny_llama: Path, tmp_path: Path, kill_at_step: Any, algorithm: str
) -> None:
    """4 rollouts of 2 optimiser steps (iterations = 2): 8 steps; a checkpoint after
    every rollout; killed after step 5 (inside rollout 3): resumes at step 4, the
    rollout boundary, so TRL regenerates rollout 3 as the uninterrupted run did."""
    from caikit_core.records import Prompt
    from caikit_core.training.settings import GroupRLSettings

    table = GroupRLSettings(
        steps=4,
        rollout_batch_size=2,
        mini_batch_size=4,
        iterations=2,
        max_new_tokens=6,
        num_generations=2,
        learning_rate=1e-3,
        max_length=128,
    )

    def config(**kw: Any) -> TorchOptimiserConfig:
        return TorchOptimiserConfig(
            device="cpu", seed=3, algorithm=algorithm, **{algorithm: table}, **kw
        )

    def losses(report: Any) -> list[tuple[int, float]]:
        return [(int(h["step"]), float(h["loss"])) for h in report.history if "loss" in h]

    prompts = [Prompt(f"q{i}", conversation(("user", t))) for i, t in enumerate(TINY_CORPUS[:6])]
    policy, pm = str(tiny_llama), LowercasePM()
    straight = TorchOptimiser(config()).optimise(
        policy, policy, pm, prompts, [], tmp_path / "straight"
    )
    ckpt = tmp_path / "checkpoints"
    kill_at_step(5)
    with pytest.raises(Killed):
        TorchOptimiser(config(checkpoint_every_steps=1)).optimise(
            policy, policy, pm, prompts, [], tmp_path / "a", checkpoint_dir=ckpt
        )
    assert sorted(p.name for p in ckpt.glob("checkpoint-*")) == ["checkpoint-4"]
    kill_at_step(None)
    resumed = TorchOptimiser(config(checkpoint_every_steps=1)).optimise(
        policy, policy, pm, prompts, [], tmp_path / "b", checkpoint_dir=ckpt
    )
    a_losses, b_losses = losses(straight), losses(resumed)
    assert [s for s, _ in a_losses] == [s for s, _ in b_losses] == list(range(1, 9))
    diffs = [abs(x - y) for (_, x), (_, y) in zip(a_losses, b_losses, strict=True)]
    print(f"{algorithm} loss differences:", diffs)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    print(f"{algorithm} weight difference:", max_diff(a, b))
    rewards = [h["reward"] for h in straight.history if "reward" in h]
    assert rewards == [h["reward"] for h in resumed.history if "reward" in h]
    assert max(diffs) <= LOSS_TOLERANCE, diffs
    assert max_diff(a, b) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_caikit_run_sigkilled_in_sft_then_resume_matches_an_uninterrupted_run(
    tiny_llama: Path, tmp_path: Path, echo_site: Path
) -> None:
    """The real command: ``caikit run`` SIGKILLed once an sft checkpoint exists, then
    ``caikit run --resume RUN_DIR``: the stage continues from the checkpoint and ends
    with an uninterrupted run's losses and weights."""
    import os
    import signal
    import subprocess
    import time

    from tests.shared import PROMPTS

    env = dict(os.environ)
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    env["PYTHONPATH"] = os.pathsep.join(map(str, (echo_site, ROOT, ROOT / "plugins")))

    def write(folder: Path, every: int) -> Path:
        folder.mkdir()
        (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
        text = RUN.format(out="out", policy=tiny_llama, every=every)
        (folder / "run.toml").write_text(text.replace("max_steps = 6", "max_steps = 30"))
        return folder / "run.toml"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "caikit_core.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    reference = write(tmp_path / "reference", 100)
    assert cli("run", str(reference), "--quiet").returncode == 0
    killed = write(tmp_path / "killed", 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "caikit_core.cli", "run", str(killed), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(
            (killed.parent / "out").glob(f"stages/sft/*/checkpoints/*/{checkpoints.MARKER}")
        ):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = list((killed.parent / "out").glob("stages/sft/*/checkpoints/checkpoint-*"))
    assert kept and not list((killed.parent / "out").glob("stages/sft/*/artifact"))
    resumed = cli("run", "--resume", str(killed.parent / "out"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (a_dir,) = (reference.parent / "out").glob("stages/sft/*/artifact")
    (b_dir,) = (killed.parent / "out").glob("stages/sft/*/artifact")
    assert not list((killed.parent / "out").glob("stages/sft/*/checkpoints"))
    a_losses = json.loads((a_dir / "caikit_sft.json").read_text())["losses"]
    b_losses = json.loads((b_dir / "caikit_sft.json").read_text())["losses"]
    assert [s for s, _ in b_losses] == list(range(1, 31))
    diffs = [abs(x - y) for (_, x), (_, y) in zip(a_losses, b_losses, strict=True)]
    print("caikit run sft loss differences:", max(diffs), "resumed from", kept[0].name)
    assert max(diffs) <= LOSS_TOLERANCE
    a = load_file(str(a_dir / "model.safetensors"))
    b = load_file(str(b_dir / "model.safetensors"))
    assert max_diff(a, b) <= WEIGHT_TOLERANCE
