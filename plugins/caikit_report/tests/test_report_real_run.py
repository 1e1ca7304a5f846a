"""The report of a real RL-CAI run on a tiny random Llama (hf generator, the direct
labeller asking both orders, the torch preference model and PPO): the curves come
from what the real plugins recorded, not from a fixture."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from caikit_core import plugins
from caikit_core.store import RunStore
from caikit_report.page import PPO_PANELS
from caikit_report.plugin import build_report
from caikit_report.rundir import read_run

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

RUN = """\
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

[generator]
plugin = "hf"
device = "cpu"

[labeller]
plugin = "direct"
debias = true

[preference_model]
plugin = "torch"
learning_rate = 0.003
max_steps = 3
batch_size = 2
max_length = 128
device = "cpu"

[policy_optimiser]
plugin = "torch"
algorithm = "ppo"
device = "cpu"

[policy_optimiser.ppo]
learning_rate = 0.01
steps = 3
epochs = 1
rollout_batch_size = 2
mini_batch_size = 2
max_new_tokens = 8
max_length = 256
"""


@pytest.fixture
def real_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CAIKIT_LOAD_PLUGINS", "hf,feedback,local,torch")
    plugins.reset()
    yield
    plugins.reset()


def test_report_of_a_real_tiny_ppo_run(
    tmp_path: Path, tiny_llama: Path, real_plugins: None, with_report_plugin: None
) -> None:
    from caikit_core.cli import main

    (tmp_path / "prompts.txt").write_text(
        "Say something.\nTell me about the sea.\nWhat is bread?\nHello there!\n"
    )
    (tmp_path / "run.toml").write_text(RUN.format(policy=tiny_llama))
    assert main(["-q", "run", str(tmp_path / "run.toml"), "--show-traces", "0"]) == 0
    run_dir = tmp_path / "out"
    view = read_run(run_dir)
    policy, pm = view.stage("policy"), view.stage("preference_model")
    assert policy is not None and pm is not None
    # PPO recorded every panel the report plots, one row per step
    assert len(policy.manifest.history) == 3
    for _, keys in PPO_PANELS:
        assert any(k in policy.manifest.history[0] for k in keys), keys
    assert [r["step"] for r in pm.manifest.history] == [1.0, 2.0, 3.0]
    assert view.labels is not None and len(view.labels.orders) == 4  # debias: both orders
    page = build_report(run_dir).read_text()
    assert 'data-plot="policy"' in page and 'data-plot="preference-model"' in page
    assert 'data-plot="labels-orders"' in page
    assert "Not recorded by the optimiser" not in page
    # metrics.jsonl holds the same steps as the manifests
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x["metrics"] for x in lines if x["type"] == "step" and x["stage"] == "policy"]
    assert steps == policy.manifest.history
    assert all(math.isfinite(v) for row in steps for v in row.values())
    fp = RunStore(run_dir).read_run()["stages"]["policy"]
    assert {x["fingerprint"] for x in lines if x["stage"] == "policy"} == {fp}
