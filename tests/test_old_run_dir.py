"""A run directory written by caikit 0.1.0 (before stages became modules) is reused
as it is: every stage skipped, no shard or checkpoint rewritten, the same summary."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from tests.conftest import FIXTURES, run_cli

OLD_RUN = FIXTURES / "run-v0.1.0"
STAGES = [
    "prompts",
    "responses",
    "revisions",
    "helpfulness",
    "sft",
    "pairs",
    "labels",
    "preference_model",
    "policy",
]


def _stage_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "stages").rglob("*"))
        if p.is_file()
    }


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "old"
    shutil.copytree(OLD_RUN, folder)
    return folder


def test_old_run_directory_is_reused_without_recomputing(tmp_path: Path, echo_site: Path) -> None:
    folder = _copy(tmp_path)
    before = _stage_files(folder / "out")
    recorded = json.loads((folder / "out" / "run.json").read_text())["stages"]

    done = run_cli(
        "run", str(folder / "run.toml"), env_extra={"COLUMNS": "200"}, pythonpath=[echo_site]
    )
    assert done.returncode == 0, done.stderr
    for stage in STAGES:
        assert f"{stage}: complete, skipped" in done.stderr, stage
    assert "rows" in done.stderr and "ran" not in done.stdout.split("run directory:")[0]
    assert _stage_files(folder / "out") == before  # nothing rewritten, nothing added
    assert json.loads((folder / "out" / "run.json").read_text())["stages"] == recorded

    want = (OLD_RUN / "caikit-run.stdout").read_text(encoding="utf-8")
    got = done.stdout[done.stdout.index("run directory:") :].replace(str(folder), "RUN")
    assert got == want


def test_old_run_directory_resumes_by_folder(tmp_path: Path, echo_site: Path) -> None:
    """``caikit run --resume`` reads the run file recorded in run.json. The fixture's
    run.json names the folder it was made in, which does not exist here, so one
    ``caikit run`` in the copied folder records where it is now; then resume reuses
    every stage."""
    folder = _copy(tmp_path)
    first = run_cli("run", str(folder / "run.toml"), "--quiet", pythonpath=[echo_site])
    assert first.returncode == 0, first.stderr
    before = _stage_files(folder / "out")
    again = run_cli("run", "--resume", str(folder / "out"), pythonpath=[echo_site])
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("complete, skipped") == len(STAGES)
    assert _stage_files(folder / "out") == before


def test_a_changed_setting_reruns_that_stage_and_later_ones_only(
    tmp_path: Path, echo_site: Path
) -> None:
    folder = _copy(tmp_path)
    run_toml = folder / "run.toml"
    run_toml.write_text(run_toml.read_text().replace("revisions = 2", "revisions = 1"))
    done = run_cli("run", str(run_toml), pythonpath=[echo_site])
    assert done.returncode == 0, done.stderr
    skipped = {s for s in STAGES if f"{s}: complete, skipped" in done.stderr}
    # the critic's setting changes revisions, hence sft and the RL stages that start from it
    assert skipped == {"prompts", "responses", "helpfulness"}


OLD_HF_RUN = FIXTURES / "run-v0.1.0-hf"
HF_MAP_STAGES = ["prompts", "responses", "revisions", "pairs", "labels"]


def test_old_run_directory_of_the_bundled_plugins_recomputes_its_model_stages_once(
    tmp_path: Path,
) -> None:
    """caikit 0.1.0 fingerprinted a local model folder by its file names and sizes; it is
    now fingerprinted by content (docs/reliability.md), which 0.1.0's manifests do not
    record. So the stages that read the local tiny model (all but prompts) compute once
    into new folders, with a note saying why; the old results are kept untouched, and
    the run after that reuses everything."""
    from caikit_core.testing.tiny_models import build_tiny_llama

    folder = tmp_path / "old-hf"
    shutil.copytree(OLD_HF_RUN, folder)
    build_tiny_llama(folder / "tiny-llama")
    before = _stage_files(folder / "out")

    done = run_cli("run", str(folder / "run.toml"), "--show-traces", "0")
    assert done.returncode == 0, done.stderr
    assert "prompts: complete, skipped" in done.stderr
    err = " ".join(done.stderr.split())  # rich wraps long lines
    for stage in [*HF_MAP_STAGES[1:], "preference_model"]:
        assert f"{stage}: complete, skipped" not in done.stderr, stage
        assert f"{stage}: computing into " in err, stage
    assert "model folders are fingerprinted by content" in err
    after = _stage_files(folder / "out")
    assert {k: after[k] for k in before} == before  # the old results are all still there

    again = run_cli("run", str(folder / "run.toml"), "--show-traces", "0")
    assert again.returncode == 0, again.stderr
    for stage in [*HF_MAP_STAGES, "preference_model"]:
        assert f"{stage}: complete, skipped" in again.stderr, stage
    assert _stage_files(folder / "out") == after
