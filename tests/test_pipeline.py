"""The stage graph over the run store: outputs, skipping, invalidation, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from caikit_core.cli import main
from caikit_core.config import load_run
from caikit_core.errors import FingerprintError, StoreError
from caikit_core.plugins import get_registry
from caikit_core.records import (
    Comparison,
    PreferenceLabel,
    RevisionTrace,
    Sample,
    derive_seed,
    from_arrow,
)
from caikit_core.runner import Runner
from caikit_core.store import RunStore, fingerprint
from tests.conftest import PROMPTS


def _run(path: Path) -> object:
    return Runner(load_run(path, get_registry())).execute()


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_full_run_writes_every_stage(echo_run: Path, with_echo: Path) -> None:
    summary = _run(echo_run)
    names = [s.name for s in summary.stages]  # type: ignore[attr-defined]
    assert names == [
        "prompts",
        "responses",
        "revisions",
        "sft",
        "pairs",
        "labels",
        "preference_model",
        "policy",
    ]
    assert all(s.status == "ran" for s in summary.stages)  # type: ignore[attr-defined]
    store = RunStore(echo_run.parent / "out")
    run_info = store.read_run() if store.exists() else {}
    assert run_info["stages"]["labels"] == summary.stage("labels").fingerprint  # type: ignore[attr-defined]

    responses = summary.stage("responses")  # type: ignore[attr-defined]
    manifest = json.loads((responses.path / "manifest.json").read_text())
    assert manifest["rows"] == 11 and manifest["total_shards"] == 3  # shard_size 4
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 3]
    assert manifest["plugins"]["generator"] == {
        "name": "echo",
        "plugin": "echo",
        "distribution": "caikit-echo",
        "version": "0.0.1",
    }
    assert manifest["plugins"]["executor"]["distribution"] == "caikit"
    assert manifest["seed"] == 3 and manifest["models"] == {"policy": "echo-policy"}
    assert manifest["complete"] is True and manifest["record_type"] == "Sample"

    samples = [
        row
        for f in sorted(responses.path.glob("shard-*.parquet"))
        for row in from_arrow(pq.read_table(f), Sample)
    ]
    assert [s.messages[-1].content for s in samples] == PROMPTS
    assert len({s.id for s in samples}) == 11

    revisions = json.loads((summary.stage("revisions").path / "manifest.json").read_text())  # type: ignore[attr-defined]
    assert len(revisions["constitution_hash"]) == 64
    traces = [
        t
        for f in sorted(summary.stage("revisions").path.glob("shard-*.parquet"))  # type: ignore[attr-defined]
        for t in from_arrow(pq.read_table(f), RevisionTrace)
    ]
    assert all(len(t.steps) == 2 for t in traces)

    pairs = [
        c
        for f in sorted(summary.stage("pairs").path.glob("shard-*.parquet"))  # type: ignore[attr-defined]
        for c in from_arrow(pq.read_table(f), Comparison)
    ]
    assert all(c.response_a != c.response_b for c in pairs)
    # RL uses the SFT checkpoint as its policy
    sft_artifact = summary.stage("sft").artifact  # type: ignore[attr-defined]
    assert {c.model for c in pairs} == {str(sft_artifact)}
    labels = [
        x
        for f in sorted(summary.stage("labels").path.glob("shard-*.parquet"))  # type: ignore[attr-defined]
        for x in from_arrow(pq.read_table(f), PreferenceLabel)
    ]
    assert all(0.0 <= x.p_a <= 1.0 for x in labels)
    assert (
        json.loads((summary.stage("policy").artifact / "config.json").read_text())["prompts"] == 11
    )  # type: ignore[attr-defined]
    assert summary.stage("preference_model").metrics == {"examples": 11.0}  # type: ignore[attr-defined]


def test_shards_load_with_datasets(echo_run: Path, with_echo: Path) -> None:
    import datasets

    summary = _run(echo_run)
    files = [
        str(p)
        for p in RunStore(echo_run.parent / "out").shard_paths(
            "revisions", summary.stage("revisions").fingerprint
        )
    ]  # type: ignore[attr-defined]
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == 11
    assert set(ds.column_names) >= {"id", "prompt_id", "messages", "steps", "final_response"}
    assert ds[0]["steps"][0]["index"] == 0


def test_rerun_skips_everything_and_writes_nothing(echo_run: Path, with_echo: Path) -> None:
    _run(echo_run)
    out = echo_run.parent / "out"
    before = _snapshot(out / "stages")
    summary = _run(echo_run)
    assert {s.status for s in summary.stages} == {"skipped"}  # type: ignore[attr-defined]
    assert _snapshot(out / "stages") == before


def test_changed_stage_config_invalidates_it_and_later_stages_only(
    echo_run: Path, with_echo: Path
) -> None:
    first = _run(echo_run)
    echo_run.write_text(echo_run.read_text().replace("revisions = 2", "revisions = 1"))
    second = _run(echo_run)
    status = {s.name: s.status for s in second.stages}  # type: ignore[attr-defined]
    assert status == {
        "prompts": "skipped",
        "responses": "skipped",
        "revisions": "ran",
        "sft": "ran",
        "pairs": "ran",
        "labels": "ran",
        "preference_model": "ran",
        "policy": "ran",
    }
    # the earlier results are still there, and switching back reuses them
    assert first.stage("revisions").path.is_dir()  # type: ignore[attr-defined]
    echo_run.write_text(echo_run.read_text().replace("revisions = 1", "revisions = 2"))
    third = _run(echo_run)
    assert {s.status for s in third.stages} == {"skipped"}  # type: ignore[attr-defined]


def test_rl_sampling_change_keeps_sl_stages(echo_run: Path, with_echo: Path) -> None:
    _run(echo_run)
    echo_run.write_text(echo_run.read_text() + "\n[rl.sampling]\ntemperature = 0.5\n")
    status = {s.name: s.status for s in _run(echo_run).stages}  # type: ignore[attr-defined]
    assert [k for k, v in status.items() if v == "skipped"] == [
        "prompts",
        "responses",
        "revisions",
        "sft",
    ]


def test_batch_size_does_not_change_results(echo_run: Path, with_echo: Path) -> None:
    first = _run(echo_run)
    echo_run.write_text(echo_run.read_text().replace("batch_size = 2", "batch_size = 3"))
    second = _run(echo_run)
    assert {s.status for s in second.stages} == {"skipped"}  # type: ignore[attr-defined]
    assert first.stage("labels").fingerprint == second.stage("labels").fingerprint  # type: ignore[attr-defined]


def test_executor_honours_batch_size(echo_run: Path, with_echo: Path) -> None:
    runner = Runner(load_run(echo_run, get_registry()))
    sizes: dict[str, list[int]] = {}
    local_map = runner.executor.map

    def recording_map(worker: Any, batches: Any, **kwargs: Any) -> Any:
        given = list(batches)
        sizes[kwargs["describe"]] = [len(batch) for _, batch in given]
        return local_map(worker, iter(given), **kwargs)

    runner.executor.map = recording_map
    runner.execute()
    # responses: 3 shards of 4, 4, 3 prompts in batches of 2 -> 2, 2, 2, 2, 2, 1
    assert sizes["responses"] == [2, 2, 2, 2, 2, 1]
    assert sizes.keys() == {"responses", "revisions", "pairs", "labels"}


def test_failing_record_is_named(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    echo_run.write_text(
        echo_run.read_text().replace('plugin = "echo"', 'plugin = "echo"\nfail_on = "number 5:"')
    )
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    from caikit_core.io.prompts import make_prompt

    bad_id = make_prompt(PROMPTS[5]).id
    assert "stage 'responses' failed on records [" in err and bad_id in err
    assert "ValueError: echo cannot answer" in err
    # the shard before the failing batch was kept
    stage_dirs = list((echo_run.parent / "out" / "stages" / "responses").iterdir())
    assert [p.name for p in sorted(stage_dirs[0].glob("shard-*"))] == ["shard-00000.parquet"]


def test_failing_fit_leaves_no_partial_artifact(
    echo_run: Path, with_echo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAIKIT_ECHO_FAIL_SFT", "1")
    with pytest.raises(RuntimeError, match="sft failed on purpose"):
        _run(echo_run)
    sft = echo_run.parent / "out" / "stages" / "sft"
    assert not any(sft.rglob("config.json"))
    monkeypatch.delenv("CAIKIT_ECHO_FAIL_SFT")
    summary = _run(echo_run)
    assert summary.stage("sft").status == "ran"  # type: ignore[attr-defined]
    assert summary.stage("revisions").status == "skipped"  # type: ignore[attr-defined]


def test_second_process_is_refused_while_locked(echo_run: Path, with_echo: Path) -> None:
    run = load_run(echo_run, get_registry())
    store = RunStore(run.output_path())
    other = RunStore(run.output_path())  # as another process's (the lock is re-entrant)
    with store.lock(), pytest.raises(StoreError, match="another caikit process"):
        Runner(run, store=other).execute()


def test_unfingerprintable_settings_are_an_error() -> None:
    with pytest.raises(
        FingerprintError, match="cannot fingerprint the settings: Out of range float"
    ):
        fingerprint({"temperature": float("nan")}, what="the settings")
    with pytest.raises(FingerprintError, match="cannot fingerprint x: Object of type object"):
        fingerprint({"a": object()}, what="x")


def test_derived_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(0, "p1", "responses") == derive_seed(0, "p1", "responses")
    seeds = {derive_seed(0, f"p{i}", "responses") for i in range(1000)}
    assert len(seeds) == 1000
    assert derive_seed(1, "p1", "responses") != derive_seed(0, "p1", "responses")


def test_bad_config_does_not_touch_existing_run(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(echo_run)
    out = echo_run.parent / "out"
    before = _snapshot(out)
    echo_run.write_text(echo_run.read_text().replace("revisions = 2", "revisions = -"))
    assert main(["run", str(echo_run)]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_missing_prompt_file_is_a_clear_error(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (echo_run.parent / "prompts.txt").unlink()
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    assert "prompts.txt" in err and "Traceback" not in err


def test_helpfulness_samples_are_mixed_into_sft(echo_run: Path, with_echo: Path) -> None:
    (echo_run.parent / "helpful.txt").write_text("what is a good book?\nhow do magnets work?\n")
    echo_run.write_text(
        echo_run.read_text()
        + '\n[sl]\nhelpfulness_prompts = "helpful.txt"\nhelpfulness_samples = 3\n'
    )
    summary = _run(echo_run)
    helpful = summary.stage("helpfulness")  # type: ignore[attr-defined]
    assert helpful.rows == 6
    traces = [
        t
        for f in sorted(helpful.path.glob("shard-*.parquet"))
        for t in from_arrow(pq.read_table(f), RevisionTrace)
    ]
    assert {t.critic for t in traces} == {"helpfulness"}
    assert all(t.steps == () and t.final_response == t.initial_response for t in traces)
    assert len({t.final_response for t in traces}) == 6  # three different samples each
    sft = json.loads((summary.stage("sft").artifact / "config.json").read_text())  # type: ignore[attr-defined]
    assert sft["examples"] == 11 + 6
    # the red-team stages are untouched by the helpfulness settings
    echo_run.write_text(
        echo_run.read_text().replace("helpfulness_samples = 3", "helpfulness_samples = 2")
    )
    status = {s.name: s.status for s in _run(echo_run).stages}  # type: ignore[attr-defined]
    assert status["revisions"] == "skipped" and status["helpfulness"] == "ran"
    assert status["sft"] == "ran"


@pytest.mark.parametrize("value", ["nan", "1.5", "-0.1"])
def test_labeller_returning_a_bad_probability_is_named(
    echo_run: Path,
    with_echo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    value: str,
) -> None:
    monkeypatch.setenv("CAIKIT_ECHO_BAD_LABEL", value)
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    from caikit_core.io.prompts import make_prompt
    from caikit_core.records import stable_id

    bad = stable_id("pair", make_prompt(PROMPTS[3]).id)
    assert "stage 'labels': labeller 'length' (plugin 'echo' from distribution 'caikit-echo'" in err
    assert "not finite numbers in [0, 1] for records" in err
    assert f"{bad} (p_a=" in err
    assert "Traceback" not in err


def test_training_stopped_keeps_its_checkpoint(
    echo_run: Path,
    with_echo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CAIKIT_ECHO_KL_STOP", "1")
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    assert "stage 'policy' stopped: KL 12.5 above kl_bound 10.0 at step 3" in err
    (kept,) = (echo_run.parent / "out" / "stages" / "policy").glob("*/stopped-*")
    assert (kept / "weights.json").is_file()
    assert f"checkpoint kept at {kept}" in " ".join(err.split())
    assert not any((echo_run.parent / "out" / "stages" / "policy").glob("*/artifact"))
    monkeypatch.delenv("CAIKIT_ECHO_KL_STOP")
    summary = _run(echo_run)
    assert summary.stage("policy").status == "ran"  # type: ignore[attr-defined]
    assert summary.stage("labels").status == "skipped"  # type: ignore[attr-defined]


def test_bad_constitution_fails_before_any_stage_runs(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (echo_run.parent / "c.toml").write_text('name = "x"\n[[critique_revision]]\nid = "a"\n')
    echo_run.write_text(echo_run.read_text() + '\n[constitution]\npath = "c.toml"\n')
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    assert "c.toml" in err and "critique_revision[0] (id 'a')" in err
    assert not (echo_run.parent / "out" / "stages").exists()
