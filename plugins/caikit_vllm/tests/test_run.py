"""One run file, ``plugin = "hf"`` then ``plugin = "vllm"``: identical greedy SL-CAI traces.

Runs only where vLLM is installed (.venv-vllm, ``make test-vllm``). Each run is a real
``caikit run`` subprocess (responses, revisions, sft), so the engine lives and dies
with it; this module starts no engine of its own.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed in this environment; these tests run in .venv-vllm "
        "(make setup-vllm, then make test-vllm)",
        allow_module_level=True,
    )

import pyarrow.parquet as pq

from caikit_core.testing.tiny_models import TINY_CORPUS, build_tiny_llama

SL_RUN = """\
output_dir = "out"
phases = ["sl"]
seed = 5
batch_size = 2
shard_size = 4

[models]
policy = "{policy}"

[data]
prompts = "prompts.txt"

[sl.sampling]
max_new_tokens = 12
temperature = 0.0

[generator]
{generator}

[critic]
plugin = "constitutional"
revisions = 2
max_new_tokens = 12
temperature = 0.0

[policy_optimiser]
plugin = "torch"
device = "cpu"

[policy_optimiser.sft]
learning_rate = 0.001
max_steps = 1
batch_size = 2
max_length = 256
"""

HF = 'plugin = "hf"\ndevice = "cpu"\ndtype = "float32"'
VLLM = 'plugin = "vllm"\ndtype = "float32"\nenforce_eager = true\ngpu_memory_utilization = 0.3'


def _rows(out: Path, stage: str, plugin: str) -> list[dict[str, object]]:
    """The rows of ``stage`` in the one folder whose manifest names ``plugin``."""
    folders = [
        f
        for f in sorted((out / "stages" / stage).iterdir())
        if f'"{plugin}"' in (f / "manifest.json").read_text()
    ]
    assert len(folders) == 1, folders
    rows: list[dict[str, object]] = []
    for shard in sorted(folders[0].glob("shard-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())
    return rows


def test_the_same_run_file_gives_identical_greedy_sl_traces(tmp_path: Path) -> None:
    policy = build_tiny_llama(
        tmp_path / "policy",
        hidden_size=64,
        heads=2,
        kv_heads=1,
        intermediate_size=128,
        max_position_embeddings=2048,
    )
    (tmp_path / "prompts.txt").write_text("\n".join(TINY_CORPUS[:6]) + "\n")
    run = tmp_path / "run.toml"  # one run file, its [generator] table edited in between
    for table in (HF, VLLM):
        run.write_text(SL_RUN.format(policy=policy, generator=table))
        done = subprocess.run(
            [sys.executable, "-m", "caikit_core.cli", "run", str(run)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "out"
    hf, vllm = _rows(out, "revisions", "hf"), _rows(out, "revisions", "vllm")
    assert len(hf) == len(vllm) == 6
    assert [r["id"] for r in hf] == [r["id"] for r in vllm]
    assert [r["initial_response"] for r in hf] == [r["initial_response"] for r in vllm]
    assert [r["steps"] for r in hf] == [r["steps"] for r in vllm]
    assert [r["final_response"] for r in hf] == [r["final_response"] for r in vllm]
    assert all(len(r["steps"]) == 2 for r in vllm)  # type: ignore[arg-type]
    assert any(r["final_response"] for r in vllm)
