"""A run killed with SIGKILL mid-stage, then resumed, equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from caikit_core.records import from_arrow, to_dict
from caikit_core.stages import STAGES
from caikit_core.store import RunStore
from tests.conftest import ECHO_RUN, PROMPTS, run_cli

SLOW = ECHO_RUN.replace(
    '[generator]\nplugin = "echo"', '[generator]\nplugin = "echo"\ndelay = 0.25'
)


def _write_run(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (folder / "run.toml").write_text(text, encoding="utf-8")
    return folder / "run.toml"


def _rows(run_dir: Path) -> dict[str, list[dict[str, object]]]:
    """Every map stage's rows, with the run directory's own path replaced."""
    info = json.loads((run_dir / "run.json").read_text())
    store = RunStore(run_dir)
    out: dict[str, list[dict[str, object]]] = {}
    for stage, fp in info["stages"].items():
        cls = STAGES[stage].record_type
        if cls is None:
            continue
        rows = []
        for path in store.shard_paths(stage, fp):
            for record in from_arrow(pq.read_table(path), cls):
                text = json.dumps(to_dict(record)).replace(str(run_dir), "RUN")
                # the SFT folder's name is its fingerprint, which covers the generator's delay
                rows.append(json.loads(re.sub(r"/stages/sft/[0-9a-f]+/", "/stages/sft/FP/", text)))
        out[stage] = rows
    return out


def _wait_for_partial_stage(run_dir: Path, stage: str, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed"
        for manifest in (run_dir / "stages" / stage).glob("*/manifest.json"):
            try:
                data = json.loads(manifest.read_text())
            except ValueError:
                continue
            if data["shards"] and not data["complete"]:
                return len(data["shards"])
        time.sleep(0.02)
    raise AssertionError(f"stage {stage} never became partially complete")


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(
    tmp_path: Path, echo_site: Path
) -> None:
    reference = _write_run(tmp_path / "reference", SLOW.replace("delay = 0.25", "delay = 0.0"))
    done = run_cli("run", str(reference), "--quiet", pythonpath=[echo_site])
    assert done.returncode == 0, done.stderr

    killed = _write_run(tmp_path / "killed", SLOW)
    env = dict(os.environ, PYTHONPATH=str(echo_site))
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "caikit_core.cli", "run", str(killed), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        shards_done = _wait_for_partial_stage(killed.parent / "out", "revisions", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= shards_done < 3

    resumed = run_cli("run", "--resume", str(killed.parent / "out"), pythonpath=[echo_site])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert (
        "revisions: resuming, " in resumed.stderr
        and " of 3 shards already complete" in resumed.stderr
    )

    got, want = _rows(killed.parent / "out"), _rows(reference.parent / "out")
    assert set(got) == {"prompts", "responses", "revisions", "pairs", "labels"}
    for stage in want:
        assert [r["id"] for r in got[stage]] == [r["id"] for r in want[stage]], stage
        assert len({r["id"] for r in got[stage]}) == len(PROMPTS), stage
        assert got[stage] == want[stage], stage
    leftovers = [p for p in (killed.parent / "out").rglob(".*tmp-*")]
    assert leftovers == []
