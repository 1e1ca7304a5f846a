"""Reliability guarantees (issue 13): stale results are never reused, damaged run
directories are repaired, bad input is refused cleanly. docs/reliability.md names
each guarantee and the test here that proves it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from caikit_core import hashing, validators
from caikit_core.cli import main
from caikit_core.config import load_run
from caikit_core.converter import InvalidValue
from caikit_core.plugins import get_plugin_manager, get_registry
from caikit_core.records import from_arrow, to_dict
from caikit_core.runner import Runner
from caikit_core.stages import STAGES
from caikit_core.store import RunStore, model_fingerprint
from tests.conftest import run_cli


def _run(path: Path) -> object:
    return Runner(load_run(path, get_registry())).execute()


def _status(summary: object) -> dict[str, str]:
    return {s.name: s.status for s in summary.stages}  # type: ignore[attr-defined]


def _weights(folder: Path, seed: int) -> None:
    """A model folder: weights of fixed shapes drawn from ``seed``, a config, a tokenizer."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((8, 4)).astype(np.float32)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}', encoding="utf-8")


@pytest.fixture
def hash_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """caikit's cache (and so its file-hash cache) in a fresh folder."""
    monkeypatch.setenv("CAIKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- 1. content fingerprints for models ------------------------------------------------


def test_new_weights_of_the_same_shapes_recompute_the_model_stages(
    echo_run: Path, with_echo: Path, hash_cache: Path
) -> None:
    model = echo_run.parent / "model"
    _weights(model, seed=0)
    echo_run.write_text(echo_run.read_text().replace('"echo-policy"', '"model"'))
    assert set(_status(_run(echo_run)).values()) == {"ran"}
    size = (model / "model.safetensors").stat().st_size

    _weights(model, seed=1)  # what retraining into the same folder does
    assert (model / "model.safetensors").stat().st_size == size
    status = _status(_run(echo_run))
    assert status["prompts"] == "skipped"
    assert status["responses"] == "ran" and status["revisions"] == "ran"
    assert status["pairs"] == "ran" and status["labels"] == "ran"


def test_a_model_folder_is_fingerprinted_by_content(tmp_path: Path, hash_cache: Path) -> None:
    model = tmp_path / "model"
    _weights(model, seed=0)
    first = model_fingerprint(str(model))
    assert model_fingerprint(str(model)) == first  # stable
    _weights(model, seed=1)
    assert model_fingerprint(str(model)) != first
    _weights(model, seed=0)
    assert model_fingerprint(str(model)) == first  # the same bytes, the same fingerprint


def _settle(folder: Path) -> None:
    """Date the folder's files an hour back, as files written by an earlier training run."""
    old = time.time() - 3600
    for p in folder.iterdir():
        os.utime(p, (old, old))


def test_unchanged_files_are_not_hashed_again(
    tmp_path: Path, hash_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    _weights(model, seed=0)
    _settle(model)
    first = model_fingerprint(str(model))
    assert (hash_cache / "hashes.json").is_file()
    hashing._memo.clear()  # a new process: only the cache file remembers
    read: list[Path] = []
    real = hashing._sha256

    def counting(path: Path) -> str:
        read.append(path)
        return real(path)

    monkeypatch.setattr(hashing, "_sha256", counting)
    assert model_fingerprint(str(model)) == first
    assert read == []
    # rewritten in place with other bytes of the same size: hashed again
    _weights(model, seed=1)
    _settle(model)
    assert model_fingerprint(str(model)) != first
    assert [p.name for p in read] == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("bad", ["", "{", "[1, 2]", '{"entries": {"x": 1}}', "\x00\xff"])
def test_a_corrupt_hash_cache_is_ignored_and_rewritten(
    tmp_path: Path, hash_cache: Path, bad: str
) -> None:
    model = tmp_path / "model"
    _weights(model, seed=0)
    _settle(model)
    want = model_fingerprint(str(model))
    hashing._memo.clear()
    (hash_cache / "hashes.json").write_text(bad, encoding="latin-1")
    assert model_fingerprint(str(model)) == want
    entries = json.loads((hash_cache / "hashes.json").read_text())["entries"]
    assert len(entries) == 3


def test_concurrent_writers_leave_a_valid_hash_cache(tmp_path: Path, hash_cache: Path) -> None:
    """Eight writers storing at once: the file is always whole JSON (each replaces it
    atomically), no temporary file is left, and at worst an entry is lost (a rehash)."""
    import threading

    file = hashing.cache_file()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(25):
                hashing._store(file, {f"k{n}-{i}": {"sha256": "0" * 64, "at": float(i)}})
                json.loads(file.read_text())  # never half a file
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 25 <= len(hashing._load(file)) <= 200
    assert [p.name for p in hash_cache.iterdir()] == ["hashes.json"]


def test_a_hub_id_is_fingerprinted_by_its_cached_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_fingerprint("org/model") == {"id": "org/model"}  # not cached: by its id
    ref = tmp_path / "hub" / "models--org--model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    assert model_fingerprint("org/model") == {"id": "org/model", "revision": "a" * 40}
    ref.write_text("b" * 40)  # a newer revision was downloaded
    assert model_fingerprint("org/model") == {"id": "org/model", "revision": "b" * 40}


# --- 2. complete stages' shards are verified on reuse ---------------------------------


def _records(run_dir: Path, stage: str) -> list[dict[str, object]]:
    info = json.loads((run_dir / "run.json").read_text())
    store = RunStore(run_dir)
    cls: Any = STAGES[stage].record_type
    assert cls is not None
    return [
        json.loads(json.dumps(to_dict(r)).replace(str(run_dir), "RUN"))
        for path in store.shard_paths(stage, info["stages"][stage])
        for r in from_arrow(pq.read_table(path), cls)
    ]


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.glob("shard-*.parquet"))
    }


def _revisions_dir(run_dir: Path) -> Path:
    (folder,) = (run_dir / "stages" / "revisions").iterdir()
    return folder


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_a_missing_or_damaged_shard_of_a_complete_stage_is_recomputed_on_resume(
    tmp_path: Path, echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "prompts.txt").write_bytes((echo_run.parent / "prompts.txt").read_bytes())
    (reference / "run.toml").write_bytes(echo_run.read_bytes())
    assert main(["run", str(reference / "run.toml"), "--quiet"]) == 0
    out = echo_run.parent / "out"
    assert main(["run", str(echo_run), "--quiet"]) == 0
    folder = _revisions_dir(out)
    before = _files(folder)
    assert len(before) == 3
    shard = folder / "shard-00001.parquet"
    if damage == "delete":
        shard.unlink()
    else:  # same size, other bytes: only a checksum notices
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    capsys.readouterr()

    # export and resume agree: the stage is incomplete, and resume repairs it
    export = ["export", str(out), "--out", str(tmp_path / "cai.jsonl"), "--format", "jsonl"]
    assert main(export) == 2
    err = capsys.readouterr().err
    assert "stage 'revisions' is incomplete (2 of 3 shards)" in err and "--resume" in err
    assert main(["run", "--resume", str(out), "--show-traces", "0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "revisions: shard 1 of a complete stage is " in err
    assert "revisions: resuming, 2 of 3 shards already complete" in err
    after = _files(folder)
    assert after.keys() == before.keys()
    for name in ("shard-00000.parquet", "shard-00002.parquet"):
        assert after[name] == before[name], name  # not rewritten
    assert after["shard-00001.parquet"][1] == before["shard-00001.parquet"][1]  # recomputed
    for stage in ("revisions", "pairs", "labels"):
        assert _records(out, stage) == _records(reference / "out", stage), stage
    assert main(export) == 0


def test_a_shard_of_an_old_manifest_without_checksums_is_checked_by_its_row_count(
    echo_run: Path, with_echo: Path
) -> None:
    assert main(["run", str(echo_run), "--quiet"]) == 0
    folder = _revisions_dir(echo_run.parent / "out")
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["sha256"]  # as caikit 0.1.0 wrote them
    (folder / "manifest.json").write_text(json.dumps(manifest))
    store = RunStore(echo_run.parent / "out")
    old = store.read_manifest("revisions", manifest["fingerprint"])
    assert old is not None and store.damaged_shards(old) == {}
    # shard 2 (3 rows) copied over shard 1 (4 rows)
    (folder / "shard-00001.parquet").write_bytes((folder / "shard-00002.parquet").read_bytes())
    assert store.damaged_shards(old) == {1: "damaged (shard-00001.parquet: 3 rows, not 4)"}
    summary = Runner(load_run(echo_run, get_registry())).execute()
    assert _status(summary)["revisions"] == "resumed"
    assert pq.read_metadata(folder / "shard-00001.parquet").num_rows == 4


# --- 3. YAML alias bombs -----------------------------------------------------------------


def _alias_bomb(key: str = "output_dir") -> str:
    """Nine levels of nine aliases: 9**9 (387 million) strings once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    lines.append(f"{key}: *a8")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_quickly_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(), encoding="utf-8")
    assert len(path.read_bytes()) < 600
    started = time.perf_counter()
    assert main(["run", str(path)]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert f"error: {path}: 1 config problem:" in err
    assert "invalid YAML: aliases expand the document to more than 100000 values" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_yaml_constitution_alias_bomb_is_refused(tmp_path: Path) -> None:
    from caikit_core.constitutions import load_constitution
    from caikit_core.errors import ConstitutionError

    path = tmp_path / "c.yaml"
    path.write_text(_alias_bomb("critique_revision"), encoding="utf-8")
    started = time.perf_counter()
    with pytest.raises(ConstitutionError, match="aliases expand the document") as info:
        load_constitution(str(path), "caikit")
    assert time.perf_counter() - started < 5
    assert str(path) in str(info.value)


def test_a_recursive_yaml_alias_is_refused(tmp_path: Path) -> None:
    from caikit_core.config import read_file
    from caikit_core.errors import ConfigError

    path = tmp_path / "loop.yaml"
    path.write_text("output_dir: &x [*x]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="an alias refers to the value it is inside"):
        read_file(path)


def test_error_messages_render_huge_values_in_bounded_time() -> None:
    from caikit_core.converter import show

    row = ["lol"] * 9
    value: Any = row
    for _ in range(8):
        value = [value] * 9  # shared, as an alias bomb's lists are: 9**9 strings
    started = time.perf_counter()
    text = show(value)
    assert time.perf_counter() - started < 0.5
    assert text.endswith("(list)") and len(text) < 80
    assert len(show({"k": "v" * 10_000, "j": list(range(10_000))})) < 80


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("output_dir: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
        ("seed: " + "9" * 5000 + "\n", "a value cannot be read"),
    ],
)
def test_yaml_that_python_cannot_build_is_a_config_error(
    tmp_path: Path, text: str, problem: str
) -> None:
    from caikit_core.config import read_file
    from caikit_core.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=problem) as info:
        read_file(path)
    assert info.value.source == str(path)


# --- 4. NaN and infinities are refused by every numeric validator -----------------------

NUMERIC_VALIDATORS: dict[str, Any] = {
    "positive_number": validators.positive_number,
    "non_negative_number": validators.non_negative_number,
    "number_in(0, 1)": validators.number_in(0, 1),
    "number_in(0, 1, low_open)": validators.number_in(0, 1, low_open=True),
    "number_in(0, inf)": validators.number_in(0, math.inf),
    "number_in(-inf, inf, open)": validators.number_in(
        -math.inf, math.inf, low_open=True, high_open=True
    ),
    "optional(positive_number)": validators.optional(validators.positive_number),
    "optional(non_negative_number)": validators.optional(validators.non_negative_number),
    "positive_int": validators.positive_int,
    "non_negative_int": validators.non_negative_int,
    "int_at_least(2)": validators.int_at_least(2),
    "integer": validators.integer,
}


def test_every_numeric_validator_is_tested() -> None:
    numeric = {
        name
        for name in validators.__all__
        if name not in {"NOT_FINITE", "Check", "boolean", "non_empty_string", "one_of", "optional"}
    }
    covered = {name.split("(")[0] for name in NUMERIC_VALIDATORS}
    assert numeric <= covered, numeric - covered


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", list(NUMERIC_VALIDATORS))
def test_numeric_validators_refuse_non_finite_values(name: str, value: float) -> None:
    check = NUMERIC_VALIDATORS[name]
    cls = attrs.make_class("C", {"rate": attrs.field(validator=check)})
    with pytest.raises(InvalidValue) as info:
        cls(value)
    assert info.value.field == "rate"
    assert str(info.value) == f"expected {check.what}, found {value!r}{validators.NOT_FINITE}"


@pytest.mark.parametrize(
    ("table", "line", "key"),
    [
        ("sl.sampling", "temperature = nan", "sl.sampling.temperature"),
        ("sl.sampling", "temperature = inf", "sl.sampling.temperature"),
        ("rl.sampling", "top_p = nan", "rl.sampling.top_p"),
    ],
)
def test_a_non_finite_number_in_a_run_file_is_refused_naming_its_key(
    echo_run: Path,
    with_echo: Path,
    capsys: pytest.CaptureFixture[str],
    table: str,
    line: str,
    key: str,
) -> None:
    echo_run.write_text(echo_run.read_text() + f"\n[{table}]\n{line}\n")
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    value = line.split(" = ")[1]
    assert f"error: {echo_run}: 1 config problem:\n  {key}: expected " in err
    assert f", found {value} (NaN and infinities are refused)\n" in err
    assert "Traceback" not in err
    assert not (echo_run.parent / "out").exists()


# --- 5. one lock from recording the run file to the end of the run ----------------------


def test_a_second_run_is_refused_between_recording_and_running(
    echo_run: Path, with_echo: Path, echo_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first ``caikit run`` has recorded its run file in run.json and is about to run
    the stages; a second ``caikit run`` of another run file with the same output_dir,
    a real process started at exactly that moment, is refused and changes nothing."""
    other = echo_run.parent / "other.toml"
    other.write_text(echo_run.read_text().replace("seed = 3", "seed = 4"), encoding="utf-8")
    run_json = echo_run.parent / "out" / "run.json"
    seen: dict[str, Any] = {}
    execute = Runner.execute

    def second_run_first(self: Runner) -> Any:
        seen["recorded"] = run_json.read_bytes()
        seen["second"] = run_cli("run", str(other), pythonpath=[echo_site])
        seen["after"] = run_json.read_bytes()
        return execute(self)

    monkeypatch.setattr(Runner, "execute", second_run_first)
    assert main(["run", str(echo_run), "--quiet"]) == 0
    second = seen["second"]
    assert second.returncode == 2, second.stderr
    assert "another caikit process is working on this run" in second.stderr
    assert "Traceback" not in second.stderr
    assert seen["after"] == seen["recorded"]  # the second run wrote nothing
    info = json.loads(run_json.read_text())
    assert info["config"]["seed"] == 3 and info["config_source"] == str(echo_run)
    assert len(list((run_json.parent / "stages" / "responses").iterdir())) == 1  # seed 3 only


def test_resume_holds_the_lock_while_it_reads_the_recorded_run_file(
    echo_run: Path, with_echo: Path
) -> None:
    from caikit_core.errors import StoreError

    assert main(["run", str(echo_run), "--quiet"]) == 0
    store = RunStore(echo_run.parent / "out")
    with store.lock():
        assert main(["run", "--resume", str(store.root), "--quiet"]) == 2
    with store.lock(), store.lock():  # re-entrant within one RunStore
        pass
    with (
        RunStore(store.root).lock(),
        pytest.raises(StoreError, match="another caikit"),
        RunStore(store.root).lock(),
    ):
        pass


# --- 6. where a run is written ----------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_empty_output_dir_is_refused(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    echo_run.write_text(echo_run.read_text().replace('output_dir = "out"', 'output_dir = ""'))
    before = _snapshot(echo_run.parent)
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    assert f"error: {echo_run}: 1 config problem:\n  output_dir: expected a folder" in err
    assert "Traceback" not in err
    assert _snapshot(echo_run.parent) == before  # no run.json, .lock or stages/ beside it


def test_a_run_directory_of_another_run_file_is_refused_unless_new_run(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = echo_run.parent / "other.toml"
    other.write_text(echo_run.read_text().replace("seed = 3", "seed = 4"), encoding="utf-8")
    out = echo_run.parent / "out"
    assert main(["run", str(echo_run), "--quiet"]) == 0
    before = _snapshot(out)
    capsys.readouterr()

    assert main(["run", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} holds the run of {echo_run}, not of {other}" in err
    assert "--new-run" in err and "Traceback" not in err
    assert _snapshot(out) == before

    # the same run file, edited: still its run
    echo_run.write_text(echo_run.read_text().replace("revisions = 2", "revisions = 1"))
    assert main(["run", str(echo_run), "--quiet"]) == 0

    assert main(["run", str(other), "--new-run", "--quiet"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config_source"] == str(other) and info["config"]["seed"] == 4


# --- 7. recording, temporary files, run.json after a failure ----------------------------


def test_a_non_finite_plugin_setting_is_refused_naming_its_key(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The echo generator's ``delay`` has no validator: the run file is still refused,
    at the key, before anything is written (it cannot be recorded or fingerprinted)."""
    echo_run.write_text(
        echo_run.read_text().replace('plugin = "echo"', 'plugin = "echo"\ndelay = nan')
    )
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    assert f"error: {echo_run}: 1 config problem:\n  generator.delay: found nan; a run file" in err
    assert "Traceback" not in err
    assert not (echo_run.parent / "out").exists()


def test_stale_temporary_files_of_a_fit_stage_are_removed(echo_run: Path, with_echo: Path) -> None:
    """A kill between a fit stage's artifact rename and its manifest rename leaves the
    manifest's temporary file; the next run removes it (as it does for map stages)."""
    assert main(["run", str(echo_run), "--quiet"]) == 0
    (sft,) = (echo_run.parent / "out" / "stages" / "sft").iterdir()
    manifest = (sft / "manifest.json").read_bytes()
    (sft / "manifest.json").unlink()
    (sft / ".manifest.json.tmp-999999").write_bytes(manifest)
    (sft / ".artifact.tmp-999998").mkdir()
    assert main(["run", str(echo_run), "--quiet"]) == 0
    assert sorted(p.name for p in sft.iterdir() if p.name.startswith(".")) == []
    assert (sft / "manifest.json").is_file()


def test_a_failed_resume_keeps_the_stage_map_of_run_json(
    echo_run: Path, with_echo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = echo_run.parent / "out"
    assert main(["run", str(echo_run), "--quiet"]) == 0
    stages = json.loads((out / "run.json").read_text())["stages"]
    (sft,) = (out / "stages" / "sft").iterdir()
    (sft / "manifest.json").unlink()
    monkeypatch.setenv("CAIKIT_ECHO_FAIL_SFT", "1")
    with pytest.raises(RuntimeError, match="sft failed on purpose"):
        main(["run", "--resume", str(out), "--quiet"])
    assert json.loads((out / "run.json").read_text())["stages"] == stages
    assert (
        main(["export", str(out), "--out", str(tmp_path / "cai.jsonl"), "--format", "jsonl"]) == 0
    )
    # a successful run records exactly its own stages
    monkeypatch.delenv("CAIKIT_ECHO_FAIL_SFT")
    echo_run.write_text(echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]'))
    assert main(["run", str(echo_run), "--quiet"]) == 0
    now = json.loads((out / "run.json").read_text())["stages"]
    assert sorted(now) == ["prompts", "responses", "revisions", "sft"]


# --- generator warnings reach the summary and the manifest -------------------------------

CUT = "echo: answer cut at max_new_tokens=7"


def _warned(echo_run: Path) -> Path:
    """The echo run with answers cut at 7 "tokens" in the SL stages: every response warns."""
    text = echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]')
    echo_run.write_text(text + "\n[sl.sampling]\nmax_new_tokens = 7\n")
    return echo_run.parent / "out"


def _manifest(run_dir: Path, stage: str) -> dict[str, Any]:
    (folder,) = (run_dir / "stages" / stage).iterdir()
    data: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return data


def test_generator_warnings_are_counted_in_the_summary_the_manifest_and_metrics(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _warned(echo_run)
    assert main(["run", str(echo_run)]) == 0
    std = capsys.readouterr()
    (folder,) = (out / "stages" / "responses").iterdir()
    line = (
        f"responses: 11 record(s), 11 generator warning(s): '{CUT}' (x11) "
        f"(all in {folder / 'manifest.json'})"
    )
    assert line in std.out.splitlines()
    assert f"responses: 11 record(s), 11 generator warning(s): '{CUT}' (x11)" in std.err
    assert "revisions: " not in " ".join(ln for ln in std.out.splitlines() if "warning" in ln)
    manifest = _manifest(out, "responses")
    assert manifest["warnings"] == [[CUT, 11]]
    assert [s["warnings"] for s in manifest["shards"]] == [[[CUT, 4]], [[CUT, 4]], [[CUT, 3]]]
    assert _manifest(out, "revisions")["warnings"] == []  # the critic's answers are not cut
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (stage,) = [x for x in lines if x["type"] == "stage" and x["stage"] == "responses"]
    assert stage["generator_warnings"] == [[CUT, 11]]
    assert all("generator_warnings" not in x for x in lines if x["stage"] != "responses")

    # a rerun that reuses the stage shows them again, from the manifest
    assert main(["run", str(echo_run)]) == 0
    assert line in capsys.readouterr().out.splitlines()


def test_generator_warnings_are_counted_once_per_record_on_resume_and_retries(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed stage keeps the warnings of the shards it reuses and counts those it
    recomputes once; an executor that returns every batch twice counts each once."""
    from tests.test_executors import _ExecutorPlugin

    out = _warned(echo_run)
    assert main(["run", str(echo_run), "--quiet"]) == 0
    (folder,) = (out / "stages" / "responses").iterdir()
    (folder / "shard-00001.parquet").unlink()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert _manifest(out, "responses")["warnings"] == [[CUT, 11]]

    get_plugin_manager().register(_ExecutorPlugin(), "test-executors")
    text = echo_run.read_text().replace('output_dir = "out"', 'output_dir = "retried"')
    echo_run.write_text(text + '\n[executor]\nplugin = "retrying"\n')
    assert main(["run", str(echo_run), "--quiet"]) == 0
    assert _manifest(echo_run.parent / "retried", "responses")["warnings"] == [[CUT, 11]]
    capsys.readouterr()


def test_generator_warnings_are_bounded() -> None:
    """At most 20 distinct messages of at most 300 characters; the rest are counted."""
    from caikit_core.stages.base import OTHER_WARNINGS, tally

    long = "x" * 1000
    counts = [(f"warning {i:02d}", 1) for i in range(30)] + [(long, 5), ("warning 03", 2)]
    kept = tally(counts)
    assert len(kept) == 21
    assert kept[0] == ("x" * 297 + "...", 5)
    assert kept[1] == ("warning 03", 3)
    assert kept[-1] == (OTHER_WARNINGS, 11)  # 30 + 1 messages, 20 kept
    assert sum(n for _, n in kept) == 30 + 5 + 2
    assert tally([*kept, (OTHER_WARNINGS, 4), ("warning 03", 1)])[-1] == (OTHER_WARNINGS, 15)


# --- a misspelt local model path is not a hub id -------------------------------------------


@pytest.mark.parametrize(
    ("model", "hub_id"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("gpt2", True),
        ("echo-policy", True),
        ("my_org/model.v2", True),
        ("a/b/c", False),
        ("my model", False),
        ("org/-model", False),
        ("org/model.", False),
        ("org--x/model", False),
        ("org/model..v2", False),
        ("org/model.git", False),
        ("x" * 97, False),
        ("", False),
    ],
)
def test_what_can_be_a_hub_id(model: str, hub_id: bool) -> None:
    from caikit_core.models import could_be_hub_id

    assert could_be_hub_id(model) is hub_id


def test_a_model_written_as_a_missing_path_is_refused_before_anything_runs(
    echo_run: Path,
    with_echo: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Online too (no HF_HUB_OFFLINE): a path that does not exist is one error naming the
    key, the folder and the closest existing folder beside it, before the run directory
    exists; a name that may be a hub id is passed on (the echo generator loads none)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    base = echo_run.parent
    (base / "models" / "smollm2-135m").mkdir(parents=True)
    (base / "models" / "other").mkdir()
    (base / "afile").write_text("x", encoding="utf-8")
    text = echo_run.read_text()
    cases = {
        "models/smollm2-135": (
            f"no such model folder: {base}/models/smollm2-135 (the closest folder there is "
            f"{base}/models/smollm2-135m)"
        ),
        "./models/zzz": f"no such model folder: {base}/models/zzz",
        f"{base}/nowhere/model": f"no such model folder: {base}/nowhere/model",
        "x y": f"no such model folder: {base}/x y",
        "afile": f"{base}/afile is a file, not a model folder",
    }
    for model, why in cases.items():
        echo_run.write_text(text.replace('policy = "echo-policy"', f'policy = "{model}"'))
        assert main(["run", str(echo_run)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {echo_run}: 1 config problem:\n  models.policy: {why}\n", model
        assert not (base / "out").exists()
    # the other model keys and eval checkpoints are checked the same way
    echo_run.write_text(
        text.replace('policy = "echo-policy"', 'policy = "echo-policy"\nfeedback = "~/no-such-x"')
        + '\n[eval]\ncheckpoints = {old = "models/olde"}\n'
    )
    assert main(["run", str(echo_run)]) == 2
    err = capsys.readouterr().err
    home = Path("~/no-such-x").expanduser()
    assert f"  models.feedback: no such model folder: {home}\n" in err
    assert f"  eval.checkpoints.old: no such model folder: {base}/models/olde\n" in err
    # an existing folder, and a well-formed id that may be on the hub, pass
    for model in ("models/other", "./models/other", "some-org/some-model"):
        echo_run.write_text(text.replace('policy = "echo-policy"', f'policy = "{model}"'))
        assert main(["run", str(echo_run), "--quiet"]) == 0, model
    capsys.readouterr()


# --- the storage-error advice fits the error ------------------------------------------------


def test_storage_error_advice_fits_the_error(tmp_path: Path) -> None:
    """A full disk says to free space; a write refused for permission says which folder
    to make writable, and nothing about space; a read-only file system, to remount."""
    import errno

    from caikit_core.store import storage_error

    run_dir = tmp_path / "out"
    (run_dir / "stages").mkdir(parents=True)
    (run_dir / "run.json").write_text("{}", encoding="utf-8")
    resume = f"then resume with: caikit run --resume {run_dir}"
    shard = str(run_dir / "stages" / ".shard-00000.parquet.tmp-1")

    def said(code: int, filename: str | None) -> str:
        error = storage_error(OSError(code, os.strerror(code), filename), run_dir, "responses")
        assert error is not None
        return str(error)

    assert said(errno.ENOSPC, None) == (
        f"{run_dir} (stage 'responses'): No space left on device; what is complete is kept: "
        f"free space, {resume}"
    )
    for code in (errno.EACCES, errno.EPERM):
        assert said(code, shard) == (
            f"{shard} (stage 'responses'): {os.strerror(code)}; what is complete is kept: "
            f"make {run_dir / 'stages'} writable for this user, {resume}"
        )
    assert said(errno.EACCES, None).endswith(f"make {run_dir} writable for this user, {resume}")
    assert "remount it read-write" in said(errno.EROFS, None)
    assert storage_error(OSError(errno.ENOENT, "gone"), run_dir) is None


def _mode_bits_bind_us(folder: Path) -> bool:
    """Whether a folder of mode 0o500 refuses this process a new file (not for root,
    unless it lacks CAP_DAC_OVERRIDE)."""
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").write_text("", encoding="utf-8")
    except PermissionError:
        return True
    finally:
        folder.chmod(0o700)
    return False


def test_a_run_directory_this_user_cannot_write_is_named_with_how_to_fix_it(
    echo_run: Path, with_echo: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if not _mode_bits_bind_us(tmp_path / "probe"):
        pytest.skip("this process writes into a folder of mode 0o500 (root): no EACCES to see")
    out = echo_run.parent / "out"
    text = echo_run.read_text().replace('phases = ["sl", "rl"]', 'phases = ["sl"]')
    echo_run.write_text(text)
    assert main(["run", str(echo_run), "--quiet"]) == 0
    capsys.readouterr()
    out.chmod(0o500)
    try:
        assert main(["run", "--resume", str(out)]) == 2
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err
    assert line.startswith(f"error: {out}/.run.json.tmp-"), err
    assert line.endswith(
        f": Permission denied; what is complete is kept: make {out} writable for this user, "
        f"then resume with: caikit run --resume {out}"
    )
    assert "free space" not in line
