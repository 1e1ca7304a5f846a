"""Fault injection on the real ``caikit run`` command: SIGKILL at seeded random points of
every stage, SIGINT once per stage, a full disk and a read-only run directory. Every
interrupted run, once resumed, must end with exactly the records, artifacts and files of
an uninterrupted run.

The run is the echo fixture's (pure-Python plugins, no model) with every stage:
prompts, responses, revisions, helpfulness, sft, pairs, labels, preference_model,
policy and eval (the ``hhh`` instrument on 3 pairs). Kill points are file operations in
the run directory, numbered by the audit hook of ``tests/fault_hook/sitecustomize.py``
(on the subprocess's PYTHONPATH; it observes, caikit's code paths are unchanged); the
timed trials kill from outside at a seeded random moment instead. The full suite
(``-m faults``, ``make faults``) runs 24 trials of 1 to 3 kills each; the default suite
runs 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caikit_core.records import from_arrow, to_dict
from caikit_core.stages import STAGES
from caikit_core.store import RunStore
from tests.shared import ECHO_RUN, PROMPTS

HOOK = Path(__file__).resolve().parent / "fault_hook"
ALL_STAGES = (
    "prompts",
    "responses",
    "revisions",
    "helpfulness",
    "sft",
    "pairs",
    "labels",
    "preference_model",
    "policy",
    "eval",
)
HELPFUL = ["what is a good name for a cat?", "how do I boil an egg?", "why is the sky blue?"]
RUN = ECHO_RUN.replace(
    "shard_size = 4\n", 'shard_size = 4\n\n[sl]\nhelpfulness_prompts = "helpful.txt"\n'
) + (
    '\n[eval]\ninstruments = ["hhh"]\n\n'
    "[eval.hhh]\nlimit = 3\nrounds = 20\npreference_model = true\n"
)
#: full-suite trials (each 1 to 3 kills) and the default suite's
FULL_TRIALS = 24
SHORT_TRIALS = 3


def make_run(folder: Path) -> Path:
    """The run file (and its prompt files) in ``folder``; its output_dir is ``out``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    (folder / "helpful.txt").write_text("\n".join(HELPFUL) + "\n", encoding="utf-8")
    (folder / "run.toml").write_text(RUN, encoding="utf-8")
    return folder / "run.toml"


def caikit(
    args: list[str],
    *,
    root: Path,
    echo_site: Path,
    under: str = "",
    at: int = 0,
    sig: str = "KILL",
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m caikit_core.cli ARGS -q`` in a subprocess, with the fault hook watching
    ``root``: it sends itself SIG<sig> before the ``at``-th file operation under
    ``root/under`` (``at=0``: never)."""
    env = dict(os.environ)
    env.pop("CAIKIT_LOAD_PLUGINS", None)
    env.pop("CAIKIT_TRACE_PLUGINS", None)
    paths = [str(HOOK), str(echo_site), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        CAIKIT_FAULT_ROOT=str(root),
        CAIKIT_FAULT_UNDER=under,
        CAIKIT_FAULT_AT=str(at),
        CAIKIT_FAULT_SIGNAL=sig,
        CAIKIT_FAULT_LOG=str(log or ""),
    )
    return subprocess.run(
        [sys.executable, "-m", "caikit_core.cli", *args, "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def start_or_resume(run_file: Path) -> list[str]:
    """``run RUN_FILE`` until run.json records it, then ``run --resume RUN_DIR``."""
    out = run_file.parent / "out"
    return ["run", "--resume", str(out)] if (out / "run.json").is_file() else ["run", str(run_file)]


def snapshot(run_dir: Path) -> dict[str, Any]:
    """What a finished run holds: run.json's stage fingerprints; each map stage's records
    (read through caikit's store, in shard order, the run directory's path replaced by
    ``RUN``); each fit stage's artifact files (bytes, the path replaced); every file's
    relative path except the lock; and metrics.jsonl's stage lines. Artifact files are
    compared by the sha256 of their bytes with the path replaced: bit-exact."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    store = RunStore(run_dir)
    here = str(run_dir)
    records: dict[str, list[Any]] = {}
    artifacts: dict[str, dict[str, str]] = {}
    for stage, fp in info["stages"].items():
        manifest = store.read_manifest(stage, fp)
        assert manifest is not None and manifest.complete, stage
        assert store.damaged_shards(manifest) == {}, stage
        cls = STAGES[stage].record_type
        if cls is None:
            folder = store.artifact_dir(stage, fp)
            artifacts[stage] = {
                str(p.relative_to(folder)): hashlib.sha256(
                    p.read_bytes().replace(here.encode(), b"RUN")
                ).hexdigest()
                for p in sorted(folder.rglob("*"))
                if p.is_file()
            }
            continue
        rows = []
        for shard in sorted(manifest.shards, key=lambda s: s.index):
            for record in from_arrow(store.read_shard(stage, fp, shard.file), cls):
                rows.append(json.loads(json.dumps(to_dict(record)).replace(here, "RUN")))
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), f"{stage}: duplicated ids"
        records[stage] = rows
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name != ".lock")
    logged = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        data = json.loads(line)  # no torn line is left behind either
        if data["type"] == "stage":
            logged.append((data["stage"], data["fingerprint"], data["rows"], data["metrics"]))
    return {
        "stages": info["stages"],
        "records": records,
        "artifacts": artifacts,
        "files": files,
        "metrics": logged,
    }


def assert_same_run(run_dir: Path, reference: dict[str, Any]) -> int:
    """The finished ``run_dir`` holds exactly the reference's records, artifacts, files
    and metric lines; returns the number of records compared."""
    got = snapshot(run_dir)
    assert got["stages"] == reference["stages"]
    assert sorted(got["records"]) == sorted(reference["records"])
    for stage, rows in reference["records"].items():
        assert [r["id"] for r in got["records"][stage]] == [r["id"] for r in rows], stage
        assert got["records"][stage] == rows, stage
    assert got["artifacts"] == reference["artifacts"]
    assert got["files"] == reference["files"]  # no temporary file, checkpoint or extra folder
    assert got["metrics"] == reference["metrics"]  # each stage logged once
    return sum(len(rows) for rows in got["records"].values())


def events_by_stage(log: Path) -> dict[str, list[str]]:
    """The reference run's file operations under each stage folder, in order
    (``<event> <relative path>``), and all of them under ``""``."""
    out: dict[str, list[str]] = {"": []}
    for line in log.read_text(encoding="utf-8").splitlines():
        _, event, path = line.split("\t")
        out[""].append(f"{event} {path}")
        parts = Path(path).parts
        if len(parts) >= 2 and parts[0] == "stages":
            out.setdefault(parts[1], []).append(f"{event} {path}")
    return out


class Reference:
    def __init__(self, run_dir: Path, events: dict[str, list[str]]) -> None:
        self.run_dir = run_dir
        self.events = events
        self.snapshot = snapshot(run_dir)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, echo_site: Path) -> Reference:
    """One uninterrupted run, with its file operations logged."""
    run_file = make_run(tmp_path_factory.mktemp("reference"))
    out = run_file.parent / "out"
    log = run_file.parent / "operations.log"
    done = caikit(["run", str(run_file)], root=out, echo_site=echo_site, log=log)
    assert done.returncode == 0, done.stderr
    events = events_by_stage(log)
    assert set(events) == {"", *ALL_STAGES}
    return Reference(out, events)


def run_trial(
    seed: int, folder: Path, reference: Reference, echo_site: Path, first_stage: str | None = None
) -> tuple[int, int]:
    """Up to 3 SIGKILLs at seeded random file operations (each within one stage's folder,
    or one in four anywhere in the run directory), a resume after each, then a resume to
    the end; returns (kills that landed, records compared)."""
    rng = random.Random(seed)
    run_file = make_run(folder)
    out = folder / "out"
    stages = [first_stage or rng.choice(ALL_STAGES)]
    stages += [rng.choice(ALL_STAGES) for _ in range(rng.randint(0, 2))]
    kills = 0
    for stage in stages:
        under = "" if rng.random() < 0.25 else stage
        where = f"stages/{under}" if under else ""
        at = rng.randint(1, len(reference.events[under]))
        proc = caikit(start_or_resume(run_file), root=out, echo_site=echo_site, under=where, at=at)
        if proc.returncode == 0:
            break  # the point lay in a stage already complete: nothing left to kill
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
    final = caikit(start_or_resume(run_file), root=out, echo_site=echo_site)
    assert final.returncode == 0, final.stderr
    return kills, assert_same_run(out, reference.snapshot)


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, reference: Reference, echo_site: Path
) -> None:
    kills = [run_trial(seed, tmp_path / f"t{seed}", reference, echo_site)[0] for seed in range(3)]
    assert sum(kills) >= 3


@pytest.mark.faults
def test_sigkill_trials_across_every_stage(
    tmp_path: Path, reference: Reference, echo_site: Path
) -> None:
    """The full suite: 24 seeded trials, the first kill of trial ``i`` in stage
    ``i mod 10``, so every stage is killed in at least two trials."""
    results = [
        run_trial(
            100 + i, tmp_path / f"t{i}", reference, echo_site, ALL_STAGES[i % len(ALL_STAGES)]
        )
        for i in range(FULL_TRIALS)
    ]
    kills = sum(k for k, _ in results)
    rows = sum(r for _, r in results)
    print(f"fault trials: {FULL_TRIALS}, kills survived: {kills}, records compared: {rows}")
    assert kills >= FULL_TRIALS


@pytest.mark.faults
def test_sigkill_from_outside_at_random_times(
    tmp_path: Path, reference: Reference, echo_site: Path
) -> None:
    """SIGKILL sent by this process at a seeded random moment (0 to 0.6 s after the run
    recorded its run file, which covers the whole run), so kills also land inside writes."""
    rng = random.Random(7)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(echo_site), env.get("PYTHONPATH", "")])
    for i in range(8):
        run_file = make_run(tmp_path / f"t{i}")
        out = run_file.parent / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "caikit_core.cli", "run", str(run_file), "-q"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        while not (out / "run.json").exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        args = start_or_resume(run_file)
        final = caikit(args, root=out, echo_site=echo_site)
        assert final.returncode == 0, final.stderr
        assert_same_run(out, reference.snapshot)


def verified(run_dir: Path) -> list[str]:
    """The stages with a complete manifest whose shards all verify; fails on a damaged
    shard or an unreadable manifest anywhere."""
    store = RunStore(run_dir)
    complete = []
    for path in sorted((run_dir / "stages").glob("*/*/manifest.json")):
        fp = json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
        manifest = store.read_manifest(path.parent.parent.name, fp)
        assert manifest is not None
        assert store.damaged_shards(manifest) == {}, path
        if manifest.complete:
            complete.append(manifest.stage)
    return complete


def test_sigint_in_each_stage_stops_cleanly_and_resumes(
    tmp_path: Path, reference: Reference, echo_site: Path
) -> None:
    """Ctrl-C (SIGINT) once in every stage, in turn: exit 130 with one line saying how to
    resume, no traceback, the stages before it complete and verified; the last resume
    ends with the reference's records."""
    rng = random.Random(13)
    run_file = make_run(tmp_path)
    out = tmp_path / "out"
    for index, stage in enumerate(ALL_STAGES):
        at = rng.randint(1, len(reference.events[stage]))
        proc = caikit(
            start_or_resume(run_file),
            root=out,
            echo_site=echo_site,
            under=f"stages/{stage}",
            at=at,
            sig="INT",
        )
        assert proc.returncode == 130, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert lines[-1] == (
            f"interrupted during stage '{stage}'; resume with: caikit run --resume {out}"
        )
        # before it, a resume lists what the recorded run file enables (the echo
        # fixture's plugins are not bundled with caikit) and nothing else
        if len(lines) > 1:
            assert index > 0 and lines[0].startswith(f"WARNING  resuming {out}:"), lines
        assert set(ALL_STAGES[:index]) <= set(verified(out))
    final = caikit(start_or_resume(run_file), root=out, echo_site=echo_site)
    assert final.returncode == 0, final.stderr
    assert_same_run(out, reference.snapshot)


# --- storage faults ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted at ``tmp_path/disk`` (skipped where mount is not allowed)."""
    where = tmp_path / "disk"
    where.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def reference_bytes(reference: Reference) -> int:
    """The disk space the reference run takes (blocks: tmpfs gives each file a page)."""
    return sum(p.stat().st_blocks * 512 for p in reference.run_dir.rglob("*"))


@pytest.mark.parametrize("fraction", [0.15, 0.45])
def test_a_full_disk_is_a_clear_error_and_resume_works_once_space_is_back(
    small_disk: Path, reference: Reference, echo_site: Path, fraction: float
) -> None:
    run_file = make_run(small_disk)
    out = small_disk / "out"
    # fill the disk so that only about `fraction` of the run fits
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, free - int(fraction * reference_bytes(reference))))
    proc = caikit(["run", str(run_file)], root=out, echo_site=echo_site)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in proc.stderr
    assert "No space left on device" in line and str(out) in line
    assert "what is complete is kept: free space, then resume" in line
    assert f"caikit run --resume {out}" in line
    verified(out)  # every shard written so far verifies
    assert sorted(out.rglob("*.tmp-*")) == []  # the failed write removed its temporary file
    filler.unlink()
    final = caikit(start_or_resume(run_file), root=out, echo_site=echo_site)
    assert final.returncode == 0, final.stderr
    assert_same_run(out, reference.snapshot)


def test_a_read_only_run_directory_is_a_clear_error_and_changes_nothing(
    small_disk: Path, reference: Reference, echo_site: Path
) -> None:
    run_file = make_run(small_disk)
    out = small_disk / "out"
    stopped = caikit(
        ["run", str(run_file)], root=out, echo_site=echo_site, under="stages/labels", at=3
    )
    assert stopped.returncode == -signal.SIGKILL
    before = digests(small_disk)
    remount(small_disk, "ro")
    for args in (["run", str(run_file)], ["run", "--resume", str(out)]):
        proc = caikit(args, root=out, echo_site=echo_site)
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "Traceback" not in proc.stderr
        if args[1] == "--resume":
            assert line.startswith(
                f"error: {out}/.lock: Read-only file system; what is complete is kept: make "
                "the run directory writable (remount it read-write, or move the run), then "
                f"resume with: caikit run --resume {out}"
            )
        else:  # the run file's output_dir is checked before the lock is taken
            assert line == (
                f"error: {run_file}: output_dir: cannot write the run into {out}: "
                "Read-only file system"
            )
    assert digests(small_disk) == before
    remount(small_disk, "rw")
    final = caikit(start_or_resume(run_file), root=out, echo_site=echo_site)
    assert final.returncode == 0, final.stderr
    assert_same_run(out, reference.snapshot)


# --- a fit stage killed between its artifact's rename and its manifest's ------------------


def manifest_rename(reference: Reference, stage: str) -> int:
    """The position, among the stage folder's operations, of the manifest's rename."""
    events = reference.events[stage]
    (k,) = [i for i, e in enumerate(events, 1) if e.startswith("os.rename") and ".manifest" in e]
    return k


@pytest.mark.parametrize("stage", ["sft", "eval"])
def test_a_fit_killed_before_its_manifest_rename_is_adopted_not_retrained(
    tmp_path: Path, reference: Reference, echo_site: Path, stage: str
) -> None:
    run_file = make_run(tmp_path)
    out = tmp_path / "out"
    at = manifest_rename(reference, stage)
    killed = caikit(
        ["run", str(run_file)], root=out, echo_site=echo_site, under=f"stages/{stage}", at=at
    )
    assert killed.returncode == -signal.SIGKILL
    (folder,) = (out / "stages" / stage).iterdir()
    assert (folder / "artifact").is_dir() and not (folder / "manifest.json").exists()
    inode = (folder / "artifact").stat().st_ino
    log = tmp_path / "resume.log"
    final = caikit(["run", "--resume", str(out)], root=out, echo_site=echo_site, log=log)
    assert final.returncode == 0, final.stderr
    assert (folder / "artifact").stat().st_ino == inode  # not retrained
    touched = [line for line in log.read_text().splitlines() if f"stages/{stage}/" in line]
    assert not any(".artifact.tmp" in line for line in touched)
    assert_same_run(out, reference.snapshot)


def test_a_fit_whose_temporary_manifest_is_torn_is_retrained(
    tmp_path: Path, reference: Reference, echo_site: Path
) -> None:
    run_file = make_run(tmp_path)
    out = tmp_path / "out"
    at = manifest_rename(reference, "sft")
    killed = caikit(
        ["run", str(run_file)], root=out, echo_site=echo_site, under="stages/sft", at=at
    )
    assert killed.returncode == -signal.SIGKILL
    (folder,) = (out / "stages" / "sft").iterdir()
    (tmp,) = folder.glob(".manifest.json.tmp-*")
    tmp.write_bytes(tmp.read_bytes()[:-40])  # as if killed while writing it
    inode = (folder / "artifact").stat().st_ino
    final = caikit(["run", "--resume", str(out)], root=out, echo_site=echo_site)
    assert final.returncode == 0, final.stderr
    assert (folder / "artifact").stat().st_ino != inode  # retrained
    assert_same_run(out, reference.snapshot)
