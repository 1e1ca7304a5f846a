"""Training across processes (``num_processes``): the ``torch`` fits launch their own
workers (``caikit_torch.distributed``, gloo on CPU) and train data-parallel; 2 processes
at half the per-process batch match 1 process at the same global batch."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
if importlib.util.find_spec("caikit_torch") is None:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("trl")
psutil = pytest.importorskip("psutil")

from safetensors.torch import load_file  # noqa: E402

from caikit_core.converter import InvalidValue, converter, describe_error  # noqa: E402
from caikit_core.errors import PluginError  # noqa: E402
from caikit_core.records import (  # noqa: E402
    Comparison,
    LabelledComparison,
    PreferenceLabel,
    RevisionStep,
    RevisionTrace,
    conversation,
)
from caikit_core.testing.tiny_models import TINY_CORPUS  # noqa: E402
from caikit_core.training.settings import DPOSettings, SFTSettings  # noqa: E402
from caikit_torch.distributed import launch  # noqa: E402
from caikit_torch.optimiser import TorchOptimiser  # noqa: E402
from caikit_torch.plugin import TorchOptimiserConfig, TorchPreferenceConfig  # noqa: E402
from caikit_torch.reward import TorchPreferenceModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Largest per-step loss difference allowed between 2 processes and 1 at the same
#: global batch (measured: see docs/scaling.md#training-across-processes).
LOSS_TOLERANCE = 1e-5
#: Largest difference of any weight likewise: summation order differs between one
#: batch of 4 and two all-reduced batches of 2, and AdamW's first steps turn even a
#: rounding-level gradient into a step of up to ``learning_rate`` (1e-3 to 3e-3 here).
WEIGHT_TOLERANCE = 2e-4


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
        label = PreferenceLabel(f"l{i}", f"c{i}", 0.9 if i % 2 else 0.2, "t")
        out.append(LabelledComparison(Comparison(f"c{i}", f"p{i}", messages, a, b), label))
    return out


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def compare(
    name: str, one: list[tuple[int, float]], two: list[tuple[int, float]], steps: int
) -> float:
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, steps + 1))
    worst = max(abs(a - b) for (_, a), (_, b) in zip(one, two, strict=True))
    print(f"{name}: max |loss difference| over {steps} steps = {worst:.3g}")
    assert worst <= LOSS_TOLERANCE, (one, two)
    return worst


def no_workers_left() -> list[Any]:
    """The live ``caikit_torch.distributed`` processes under this one."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and "caikit_torch.distributed" in " ".join(p.cmdline())
    ]


def test_sft_on_two_processes_matches_one_at_the_same_global_batch(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """8 traces, global batch 4 (1 x 4 and 2 x 2), 2 epochs: 4 steps."""

    def config(processes: int, batch: int) -> TorchOptimiserConfig:
        sft = SFTSettings(learning_rate=1e-3, epochs=2, batch_size=batch, max_length=64)
        return TorchOptimiserConfig(
            device="cpu", seed=3, algorithm="dpo", sft=sft, num_processes=processes
        )

    data = traces(8)
    one = TorchOptimiser(config(1, 4))
    one.sft(str(tiny_llama), data, tmp_path / "one")
    two = TorchOptimiser(config(2, 2))
    ckpt = tmp_path / "checkpoints"
    report = two.sft(str(tiny_llama), data, tmp_path / "two", checkpoint_dir=ckpt)
    compare("sft", one.losses, two.losses, 4)
    weights = max_diff(tmp_path / "one", tmp_path / "two")
    print(f"sft: max |weight difference| = {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE
    assert report.metrics["steps"] == 4.0 and report.metrics["examples"] == 8.0
    record = json.loads((tmp_path / "two" / "caikit_sft.json").read_text())
    assert record["config"]["num_processes"] == 2
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == 1
    # checkpoint_every_minutes (30) never came due: rank 0 wrote nothing else there
    assert not list(ckpt.glob("checkpoint-*"))
    assert no_workers_left() == []


@pytest.mark.slow
def test_preference_model_on_two_processes_matches_one(tiny_llama: Path, tmp_path: Path) -> None:
    """8 comparisons, global batch 4 (1 x 4 and 2 x 2), 2 epochs: 4 steps; checkpoints
    every 2 steps: exactly one (the newest) is kept, written by rank 0."""

    def config(processes: int, batch: int, **kw: Any) -> TorchPreferenceConfig:
        return TorchPreferenceConfig(
            device="cpu",
            learning_rate=3e-3,
            epochs=2,
            batch_size=batch,
            max_length=64,
            num_processes=processes,
            **kw,
        )

    data = comparisons(8)
    one = TorchPreferenceModel(config(1, 4), str(tiny_llama))
    first = one.fit(data, tmp_path / "one")
    two = TorchPreferenceModel(config(2, 2, checkpoint_every_steps=2), str(tiny_llama))
    ckpt = tmp_path / "checkpoints"
    second = two.fit(data, tmp_path / "two", checkpoint_dir=ckpt)
    compare("preference model", one.losses, two.losses, 4)
    weights = max_diff(tmp_path / "one", tmp_path / "two")
    print(f"preference model: max |weight difference| = {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE
    # scored in this process with the saved weights
    assert abs(first.metrics["loss"] - second.metrics["loss"]) <= LOSS_TOLERANCE
    assert second.metrics["steps"] == 4.0
    assert [p.name for p in ckpt.glob("checkpoint-*")] == ["checkpoint-2"]
    saved = sorted(p.name for p in (ckpt / "checkpoint-2").glob("*.safetensors"))
    assert saved == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng_state.safetensors",
        "scheduler.safetensors",
    ]
    assert no_workers_left() == []


@pytest.mark.slow
def test_dpo_on_two_processes_matches_one(tiny_llama: Path, tmp_path: Path) -> None:
    """8 pairs, global batch 4 (1 x 4 and 2 x 2), 2 epochs: 4 steps."""

    def config(processes: int, batch: int) -> TorchOptimiserConfig:
        dpo = DPOSettings(learning_rate=1e-3, epochs=2, batch_size=batch, max_length=64)
        return TorchOptimiserConfig(
            device="cpu", seed=3, algorithm="dpo", dpo=dpo, num_processes=processes
        )

    def losses(report: Any) -> list[tuple[int, float]]:
        return [(int(h["step"]), float(h["loss"])) for h in report.history if "loss" in h]

    data, policy = comparisons(8), str(tiny_llama)
    one = TorchOptimiser(config(1, 4)).optimise(policy, policy, None, [], data, tmp_path / "one")
    two = TorchOptimiser(config(2, 2)).optimise(policy, policy, None, [], data, tmp_path / "two")
    compare("dpo", losses(one), losses(two), 4)
    weights = max_diff(tmp_path / "one", tmp_path / "two")
    print(f"dpo: max |weight difference| = {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE
    assert json.loads((tmp_path / "two" / "caikit_rl.json").read_text())["history"]
    assert no_workers_left() == []


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_algorithms_that_sample_in_the_loop_refuse_more_than_one_process(algorithm: str) -> None:
    with pytest.raises(Exception) as raised:
        converter.structure({"algorithm": algorithm, "num_processes": 2}, TorchOptimiserConfig)
    assert describe_error(raised.value, prefix="policy_optimiser") == [
        f"policy_optimiser.num_processes: expected 1 with algorithm = {algorithm!r}, which "
        "samples in its training loop (only SFT and DPO train across processes: algorithm = "
        '"dpo"), found 2'
    ]
    with pytest.raises(InvalidValue) as direct:
        TorchOptimiserConfig(algorithm=algorithm, num_processes=2)  # type: ignore[arg-type]
    assert direct.value.field == "num_processes"


FAILING = """
import os
import time

import torch.distributed as dist


def entry(job):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 1:
        raise RuntimeError("injected failure")
    dist.barrier()  # rank 0 waits here for ever: the launcher must stop it
    time.sleep(600)
    return {}
"""


def test_a_worker_that_raises_fails_the_fit_naming_its_rank_and_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ddp_failing.py").write_text(FAILING)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as raised:
        launch("ddp_failing:entry", {}, 2, fit="sft", who="torch")
    assert str(raised.value) == (
        "torch: sft failed in worker rank 1 of 2: RuntimeError: injected failure"
    )
    assert no_workers_left() == []


@pytest.mark.slow
def test_a_worker_that_dies_by_a_signal_is_named_and_the_others_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 SIGKILLs itself (as the OOM killer would); rank 0 would sleep for ever."""
    (tmp_path / "ddp_killed.py").write_text(
        textwrap.dedent(
            """
            import os, signal, time

            def entry(job):
                if os.environ["RANK"] == "1":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)
                return {}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as raised:
        launch("ddp_killed:entry", {}, 2, fit="dpo", who="torch")
    assert str(raised.value) == (
        "torch: dpo failed in worker rank 1 of 2: the worker exited with signal 9"
    )
    assert no_workers_left() == []


@pytest.mark.slow
def test_workers_exit_when_the_launching_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL the process that launched two workers (blocked in a barrier, as training
    would be): both are gone within seconds, no orphan left behind."""
    (tmp_path / "ddp_hang.py").write_text(
        textwrap.dedent(
            """
            import os, time
            import torch.distributed as dist

            def entry(job):
                dist.init_process_group("gloo")
                with open(os.path.join(job["dir"], f"pid-{dist.get_rank()}"), "w") as f:
                    f.write(str(os.getpid()))
                dist.barrier()
                time.sleep(600)
                return {}
            """
        )
    )
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]];"
        "from caikit_torch.distributed import launch;"
        "launch('ddp_hang:entry', {'dir': sys.argv[1]}, 2, fit='sft', who='torch')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path), str(ROOT)], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("pid-*"))) < 2:
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("pid-*"))]
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids], timeout=30)
        assert alive == [] and len(gone) == 2
    finally:
        if parent.poll() is None:
            parent.kill()
