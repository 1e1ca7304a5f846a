"""Plugin faults (docs/reliability.md#plugin-faults): a plugin raising mid-batch stops
the run naming the plugin, its distribution, the stage and the records; complete shards
stay and ``--resume`` continues from them; ``[stages.NAME] on_error = "skip"`` leaves
failing records out, listing each with its reason in ``skipped.parquet``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from caikit_core.cli import main
from caikit_core.io.prompts import make_prompt
from tests.conftest import PROMPTS

ECHO = "generator 'echo' (plugin 'echo' from distribution 'caikit-echo' 0.0.1)"


def _stage_dir(out: Path, stage: str) -> Path:
    (folder,) = (out / "stages" / stage).iterdir()
    return folder


def _rows(out: Path, stage: str) -> list[dict[str, object]]:
    folder = _stage_dir(out, stage)
    rows: list[dict[str, object]] = []
    for shard in sorted(folder.glob("shard-*.parquet")):
        rows.extend(pq.read_table(shard).to_pylist())
    for row in rows:
        row.pop("model", None)
    return rows


def test_a_raising_plugin_stops_the_run_naming_it_and_resume_continues_after_the_fix(
    echo_run: Path,
    with_echo: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = echo_run.parent / "out"
    monkeypatch.setenv("CAIKIT_ECHO_FAIL_ON", "number 5:")  # a bug outside the run file
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    ids = [make_prompt(PROMPTS[i]).id for i in (4, 5)]
    assert (
        f"error: stage 'responses' failed on records [{ids[0]}, {ids[1]}]: {ECHO} raised "
        f"ValueError: echo cannot answer {PROMPTS[5]!r} (1 of 3 shards complete and kept; "
        f"once fixed, `caikit run --resume {out}` continues from them, or set "
        '[stages.responses] on_error = "skip" to leave failing records out)'
    ) in err
    assert "Traceback" not in err
    shard0 = _stage_dir(out, "responses") / "shard-00000.parquet"
    before = os.stat(shard0)
    assert sorted(p.name for p in _stage_dir(out, "responses").glob("shard-*")) == [shard0.name]

    monkeypatch.delenv("CAIKIT_ECHO_FAIL_ON")  # the fix
    assert main(["run", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "responses: resuming, 1 of 3 shards already complete" in err
    after = os.stat(shard0)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # the same records as an uninterrupted run's (but for the model paths into each run)
    clean = echo_run.parent / "clean.toml"
    clean.write_text(echo_run.read_text().replace('output_dir = "out"', 'output_dir = "clean"'))
    assert main(["run", str(clean)]) == 0
    for stage in ("responses", "revisions", "pairs", "labels"):
        assert _rows(out, stage) == _rows(echo_run.parent / "clean", stage), stage


SKIP = '\n[stages.responses]\non_error = "skip"\n\n[stages.pairs]\non_error = "skip"\n'


def test_on_error_skip_lists_each_skipped_record_with_its_reason_and_counts_it(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = echo_run.read_text().replace('plugin = "echo"', 'plugin = "echo"\nfail_on = "number 5:"')
    echo_run.write_text(text + SKIP)
    assert main(["run", str(echo_run)]) == 0
    captured = capsys.readouterr()
    out = echo_run.parent / "out"
    bad = make_prompt(PROMPTS[5]).id
    reason = f"{ECHO} raised ValueError: echo cannot answer {PROMPTS[5]!r}"
    for stage in ("responses", "pairs"):
        folder = _stage_dir(out, stage)
        assert pq.read_table(folder / "skipped.parquet").to_pylist() == [
            {"shard": 1, "id": bad, "reason": reason}
        ]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (manifest["rows"], manifest["skipped"]) == (10, 1)
        assert [(s["rows"], s["input_rows"]) for s in manifest["shards"]] == [
            (4, 4),
            (3, 4),
            (3, 3),
        ]
        assert manifest["shards"][1]["skipped"] == [[bad, reason]]
        prompt_ids = [r["prompt_id"] for r in _rows(out, stage)]
        assert prompt_ids == [make_prompt(p).id for i, p in enumerate(PROMPTS) if i != 5]
        assert (
            f'{stage}: 1 record(s) skipped on error (on_error = "skip"), listed in '
            f"{folder / 'skipped.parquet'}" in " ".join(captured.out.split())
        )
    assert not list(_stage_dir(out, "revisions").glob("skipped.parquet"))
    assert len(_rows(out, "labels")) == 10


def test_on_error_enters_the_fingerprint_of_its_stage_only_when_skip(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(echo_run)]) == 0
    capsys.readouterr()
    echo_run.write_text(echo_run.read_text() + '\n[stages.labels]\non_error = "stop"\n')
    assert main(["run", str(echo_run)]) == 0
    assert "labels: complete, skipped" in capsys.readouterr().err  # "stop" is the default
    echo_run.write_text(echo_run.read_text().replace('"stop"', '"skip"'))
    assert main(["run", str(echo_run)]) == 0
    err = capsys.readouterr().err
    for reused in ("prompts", "responses", "revisions", "pairs"):
        assert f"{reused}: complete, skipped" in err
    assert "labels: complete, skipped" not in err
    assert len(list((echo_run.parent / "out" / "stages" / "labels").iterdir())) == 2


def test_a_stages_table_must_name_a_map_stage(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    echo_run.write_text(echo_run.read_text() + '\n[stages.sft]\non_error = "skip"\n')
    assert main(["run", str(echo_run)]) == 2
    assert (
        "stages.sft: expected the name of a map stage (responses, revisions, helpfulness, "
        "pairs, labels), found 'sft'" in capsys.readouterr().err
    )
    echo_run.write_text(echo_run.read_text().replace("[stages.sft]", "[stages.responses]"))
    echo_run.write_text(echo_run.read_text().replace('"skip"', '"retry"'))
    assert main(["run", str(echo_run)]) == 2
    assert (
        "stages[responses].on_error: expected one of 'stop', 'skip', found 'retry' (str)"
        in capsys.readouterr().err
    )
