"""Resumable PPO (``caikit_torch.ppo`` with ``checkpoint_dir``): a run killed after step
k and resumed in a fresh call gives exactly an uninterrupted run's per-step metrics
and final weights on CPU; checkpoints hold safetensors and JSON only."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import string
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

from caikit_core.errors import CaikitError, PluginError  # noqa: E402
from caikit_core.records import Conversation, conversation  # noqa: E402
from caikit_core.testing.tiny_models import TINY_CORPUS  # noqa: E402
from caikit_core.training.settings import PPOSettings  # noqa: E402
from caikit_torch import checkpoints  # noqa: E402
from caikit_torch.ppo import ROLLOUTS_FILE, PPOOptions, train_ppo  # noqa: E402

PROMPTS = [conversation(("user", text)) for text in TINY_CORPUS]
SETTINGS = PPOSettings(
    steps=4,
    rollout_batch_size=4,
    mini_batch_size=2,
    epochs=2,
    learning_rate=1e-3,
    max_new_tokens=6,
    kl_coef=0.05,
    adaptive_kl=True,
    target_kl=0.01,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class Killed(Exception):
    """Stands for a kill: raised from the reward function."""


def reward(kill_at: int | None = None):  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def score(convs: Sequence[Conversation], texts: Sequence[str]) -> list[float]:
        if calls["n"] == kill_at:
            raise Killed(f"killed in step {kill_at}")
        calls["n"] += 1
        return [sum(ch in string.ascii_lowercase for ch in t) / 10 for t in texts]

    return score


def untimed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def run(tiny: Path, out: Path, kill_at: int | None = None, **kw: object) -> list[dict[str, float]]:
    return train_ppo(
        str(tiny),
        str(tiny),
        reward(kill_at),
        PROMPTS,
        SETTINGS,
        out,
        options=PPOOptions(seed=5),
        **kw,  # type: ignore[arg-type]
    )


def test_killed_and_resumed_ppo_equals_an_uninterrupted_run_exactly(
    tiny_llama: Path, tmp_path: Path
) -> None:
    straight = run(tiny_llama, tmp_path / "straight")
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(Killed):  # steps 0, 1 done and checkpointed; killed in step 2
        run(tiny_llama, tmp_path / "a", kill_at=2, checkpoint_dir=ckpt, checkpoint_every_steps=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-2"]
    files = sorted(p.name for p in (ckpt / "step-2").iterdir())
    assert all(f.endswith((".safetensors", ".json")) for f in files), files
    # a fresh call, as after a kill: a new process would build the same objects
    resumed = run(tiny_llama, tmp_path / "b", checkpoint_dir=ckpt, checkpoint_every_steps=1)
    assert untimed(resumed) == untimed(straight)  # every metric of every step, exactly
    assert [r["beta"] for r in resumed] != [SETTINGS.kl_coef] * 4  # the KL controller moved
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / ROLLOUTS_FILE).read_text().splitlines()
    assert lines == (tmp_path / "straight" / ROLLOUTS_FILE).read_text().splitlines()
    record = json.loads((ckpt / "step-3" / checkpoints.MARKER).read_text())
    assert record["step"] == 3 and record["fit"] == "ppo"


def test_a_checkpoint_with_a_pickle_file_or_other_settings_is_refused(
    tiny_llama: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(Killed):
        run(tiny_llama, tmp_path / "a", kill_at=1, checkpoint_dir=ckpt, checkpoint_every_steps=1)
    (ckpt / "step-1" / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PluginError, match=r"optimizer\.pt.*refusing to resume"):
        run(tiny_llama, tmp_path / "b", checkpoint_dir=ckpt)
    (ckpt / "step-1" / "optimizer.pt").unlink()
    with pytest.raises(CaikitError, match="other settings"):
        train_ppo(
            str(tiny_llama),
            str(tiny_llama),
            reward(),
            PROMPTS,
            SETTINGS,
            tmp_path / "c",
            options=PPOOptions(seed=6),
            checkpoint_dir=ckpt,
        )


SCRIPT = textwrap.dedent(
    """
    import os, signal, string, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from caikit_core.records import conversation
    from caikit_core.testing.tiny_models import TINY_CORPUS
    from caikit_core.training.settings import PPOSettings
    from caikit_torch.ppo import PPOOptions, train_ppo
    tiny, out, ckpt = (Path(a) for a in sys.argv[1:4])
    kill_at = int(sys.argv[4])
    calls = [0]
    def score(convs, texts):
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return [sum(ch in string.ascii_lowercase for ch in t) / 10 for t in texts]
    settings = PPOSettings(steps=4, rollout_batch_size=4, mini_batch_size=2, epochs=2,
        learning_rate=1e-3, max_new_tokens=6, kl_coef=0.05, adaptive_kl=True, target_kl=0.01)
    prompts = [conversation(("user", t)) for t in TINY_CORPUS]
    train_ppo(str(tiny), str(tiny), score, prompts, settings, out, options=PPOOptions(seed=5),
        checkpoint_dir=ckpt, checkpoint_every_steps=1)
    """
)


@pytest.mark.slow
def test_a_sigkilled_ppo_process_resumes_to_the_same_weights(
    tiny_llama: Path, tmp_path: Path
) -> None:
    straight = run(tiny_llama, tmp_path / "straight")
    script = tmp_path / "ppo_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugins'}"}
    ckpt = tmp_path / "checkpoints"
    args = [sys.executable, str(script), str(tiny_llama), str(tmp_path / "a"), str(ckpt)]
    killed = subprocess.run([*args, "3"], env=env, capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (ckpt / "step-3").is_dir()
    done = subprocess.run([*args[:3], str(tmp_path / "b"), str(ckpt), "99"], env=env, check=False)
    assert done.returncode == 0
    record = json.loads((tmp_path / "b" / "caikit_ppo.json").read_text())
    assert untimed(record["metrics"]) == untimed(straight)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def hf_generator(model: Path) -> object:
    from caikit_core.plugins import get_registry

    spec = get_registry().get("generator", "hf")
    assert spec.config_cls is not None
    return spec.build(spec.config_cls(device="cpu"), model=str(model))


def test_resumed_ppo_pushes_the_restored_policy_into_a_rollout_generator(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """rl.rollouts = "generator": a fresh generator holds the starting weights; the
    resumed run pushes the checkpoint's policy into it before sampling, so the
    metrics and weights equal an uninterrupted run's."""
    straight = run(tiny_llama, tmp_path / "straight", rollouts=hf_generator(tiny_llama))
    ckpt = tmp_path / "checkpoints"
    with pytest.raises(Killed):
        run(
            tiny_llama,
            tmp_path / "a",
            kill_at=2,
            checkpoint_dir=ckpt,
            checkpoint_every_steps=2,
            rollouts=hf_generator(tiny_llama),
        )
    resumed = run(
        tiny_llama,
        tmp_path / "b",
        checkpoint_dir=ckpt,
        checkpoint_every_steps=2,
        rollouts=hf_generator(tiny_llama),
    )
    assert untimed(resumed) == untimed(straight)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
