"""The ``jax`` backend across devices: its ``(fsdp, tp)`` mesh spans every visible
device, so two (forced) host devices shard the weights and the batch in two, and SFT
gives the one-device run's loss curve and weights (the torch plugins' counterpart is
``plugins/caikit_torch/tests/test_ddp.py``; see docs/scaling.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tunix")

import numpy as np
from safetensors.numpy import load_file

from caikit_core.testing.tiny_models import build_tiny_llama

ROOT = Path(__file__).resolve().parents[3]

#: Largest per-step loss difference allowed between 2 devices and 1 (measured: see
#: docs/scaling.md#training-across-processes).
LOSS_TOLERANCE = 1e-5
#: Largest difference of any saved weight likewise: a tenth of the learning rate (1e-2);
#: the two meshes sum in different orders, and AdamW's first steps turn even a
#: rounding-level gradient into a step of up to the learning rate.
WEIGHT_TOLERANCE = 1e-3

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import jax
    from caikit_core.testing.checks import toy_traces
    from caikit_core.training.settings import SFTSettings
    from caikit_jax import model as m
    from caikit_jax.optimiser import JaxOptimiser
    from caikit_jax.plugin import JaxOptimiserConfig

    tiny, out = sys.argv[1], Path(sys.argv[2])
    mesh = m.make_mesh()
    loaded = m.load_model(tiny, mesh=mesh)
    shards = len(loaded.embedder.input_embedding.value.sharding.device_set)
    sft = SFTSettings(learning_rate=1e-2, max_steps=4, batch_size=4, max_length=256)
    optimiser = JaxOptimiser(JaxOptimiserConfig(sft=sft))
    optimiser.sft(tiny, toy_traces(), out)
    print(json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape),
                      "shards": shards, "losses": optimiser.losses}))
    """
)


def run_on(devices: int, tiny: Path, out: Path) -> dict[str, object]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


@pytest.mark.slow
def test_sft_on_a_two_device_mesh_matches_one_device(tmp_path: Path) -> None:
    tiny = build_tiny_llama(tmp_path / "tiny", seed=0)
    one = run_on(1, tiny, tmp_path / "one")
    two = run_on(2, tiny, tmp_path / "two")
    assert (one["devices"], one["mesh"], one["shards"]) == (1, {"fsdp": 1, "tp": 1}, 1)
    assert (two["devices"], two["mesh"], two["shards"]) == (2, {"fsdp": 2, "tp": 1}, 2)
    losses_one = [(int(s), float(v)) for s, v in one["losses"]]  # type: ignore[attr-defined]
    losses_two = [(int(s), float(v)) for s, v in two["losses"]]  # type: ignore[attr-defined]
    assert [s for s, _ in losses_one] == [s for s, _ in losses_two] == [1, 2, 3, 4]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(losses_one, losses_two, strict=True))
    print(f"jax sft: max |loss difference| over 4 steps, 2 devices vs 1 = {worst:.3g}")
    assert worst <= LOSS_TOLERANCE, (losses_one, losses_two)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    weights = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    print(f"jax sft: max |weight difference| = {weights:.3g}")
    assert weights <= WEIGHT_TOLERANCE
