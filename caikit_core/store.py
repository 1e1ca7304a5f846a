"""The run directory: Parquet shards per stage, manifests, fingerprints, locking.

Layout::

    RUN_DIR/
      run.json                          the run file as given, and the current stage fingerprints
      metrics.jsonl                     one line per completed stage and per fit step (append-only)
      .lock                             held (flock) while a caikit process works on the run
      stages/<stage>/<fingerprint>/
        manifest.json                   what produced the stage and which shards are complete
        shard-00000.parquet ...         rows (map and source stages)
        artifact/                       a checkpoint folder (fit stages)

A stage's folder is named by its fingerprint, so a changed setting never
overwrites earlier results: it computes into a new folder, and changing the
setting back finds the old one complete. Every file is written to a temporary
name in the same folder and renamed into place, so a killed process leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pyarrow as pa
import pyarrow.parquet as pq

from caikit_core.converter import converter
from caikit_core.errors import FingerprintError, StoreError

FINGERPRINT_LENGTH = 16

#: the run directory's metrics log (see :meth:`RunStore.append_metrics`)
METRICS_FILE = "metrics.jsonl"


def fingerprint(payload: Any, *, what: str) -> str:
    """sha256 of the canonical JSON of ``payload``; a :class:`FingerprintError` if it has none.

    ``what`` names the thing being fingerprinted in the error.
    """
    try:
        text = json.dumps(
            payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise FingerprintError(f"cannot fingerprint {what}: {exc}") from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: Path, *, what: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise FingerprintError(f"cannot fingerprint {what} ({path}): {exc}") from exc
    return digest.hexdigest()


def model_fingerprint(model: str) -> Any:
    """What identifies a model: a local folder by its file names and sizes, else its id."""
    path = Path(model)
    if not path.is_dir():
        return {"id": model}
    try:
        files = sorted(
            (str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file()
        )
    except OSError as exc:
        raise FingerprintError(f"cannot fingerprint model folder {path}: {exc}") from exc
    return {"files": files}


@attrs.frozen
class ShardInfo:
    """One complete shard."""

    index: int
    file: str
    rows: int
    input_rows: int
    seconds: float


@attrs.define
class StageManifest:
    """What produced a stage's output and how far it got."""

    stage: str
    kind: str
    fingerprint: str
    input_fingerprint: str
    config_fingerprint: str
    plugins: dict[str, dict[str, str]]
    constitution_hash: str | None
    models: dict[str, str]
    seed: int
    record_type: str | None = None
    total_shards: int | None = None
    shards: list[ShardInfo] = attrs.field(factory=list)
    complete: bool = False
    rows: int = 0
    artifact: str | None = None
    metrics: dict[str, float] = attrs.field(factory=dict)
    #: a fit stage's per-step metrics (e.g. PPO's reward and KL), when its plugin reports them
    history: list[dict[str, float]] = attrs.field(factory=list)
    timings: dict[str, float] = attrs.field(factory=dict)
    created_at: float = attrs.field(factory=time.time)
    finished_at: float | None = None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (temp file, fsync, rename)."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    _atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def _finite(value: float) -> float:
    return value if math.isfinite(value) else float("nan")


class RunStore:
    """A run directory (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    # whole run -------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.run_file.is_file()

    def read_run(self) -> dict[str, Any]:
        try:
            data = json.loads(self.run_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{self.root}: not a caikit run directory (no run.json)") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{self.run_file}: unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise StoreError(f"{self.run_file}: expected a JSON object")
        return data

    def write_run(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run_file, data)

    # metrics log -----------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    def logged_stages(self) -> set[tuple[str, str]]:
        """``(stage, fingerprint)`` of every stage line in ``metrics.jsonl`` (a torn
        last line, from a killed process, is ignored)."""
        try:
            text = self.metrics_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return set()
        logged = set()
        for line in text.splitlines():
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("type") == "stage":
                logged.add((str(data.get("stage")), str(data.get("fingerprint"))))
        return logged

    def append_metrics(self, lines: list[dict[str, Any]]) -> None:
        """Append ``lines`` to ``metrics.jsonl`` as JSON lines, in one write, fsynced."""
        data = "".join(
            json.dumps(line, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
            for line in lines
        ).encode("utf-8")
        self.root.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("ab+") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    data = b"\n" + data  # after a torn line, start on a line of our own
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run directory (released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fh = (self.root / ".lock").open("a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"{self.root}: another caikit process is working on this run"
                ) from None
            yield
        finally:
            fh.close()

    # stages ---------------------------------------------------------------------
    def stage_dir(self, stage: str, fp: str) -> Path:
        return self.root / "stages" / stage / fp[:FINGERPRINT_LENGTH]

    def read_manifest(self, stage: str, fp: str) -> StageManifest | None:
        path = self.stage_dir(stage, fp) / "manifest.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = converter.structure(data, StageManifest)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise StoreError(f"{path}: unreadable manifest: {exc}") from None
        assert isinstance(manifest, StageManifest)
        if manifest.fingerprint != fp:
            raise StoreError(f"{path}: manifest fingerprint does not match its folder")
        return manifest

    def write_manifest(self, manifest: StageManifest) -> None:
        folder = self.stage_dir(manifest.stage, manifest.fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        data = converter.unstructure(manifest)
        data["timings"] = {k: _finite(v) for k, v in data["timings"].items()}
        atomic_write_json(folder / "manifest.json", data)

    def complete_shards(self, manifest: StageManifest) -> dict[int, ShardInfo]:
        """Shards listed in the manifest whose files are present."""
        folder = self.stage_dir(manifest.stage, manifest.fingerprint)
        return {s.index: s for s in manifest.shards if (folder / s.file).is_file()}

    def write_shard(self, stage: str, fp: str, index: int, table: pa.Table) -> str:
        """Write one shard atomically; returns its file name."""
        folder = self.stage_dir(stage, fp)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{index:05d}.parquet"
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        pq.write_table(table, tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
        return name

    def read_shard(self, stage: str, fp: str, file: str) -> pa.Table:
        path = self.stage_dir(stage, fp) / file
        try:
            return pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise StoreError(f"{path}: unreadable shard: {exc}") from None

    def shard_paths(self, stage: str, fp: str) -> list[Path]:
        """The complete shards' paths, e.g. for ``datasets.load_dataset("parquet", ...)``."""
        manifest = self.read_manifest(stage, fp)
        if manifest is None:
            return []
        folder = self.stage_dir(stage, fp)
        return [folder / s.file for s in sorted(manifest.shards, key=lambda s: s.index)]

    def artifact_dir(self, stage: str, fp: str) -> Path:
        return self.stage_dir(stage, fp) / "artifact"

    def checkpoint_dir(self, stage: str, fp: str) -> Path:
        """Where a fit stage's resumable checkpoints live while it trains: a folder of
        the stage folder (not the temporary artifact folder, which a kill loses),
        removed once the stage is complete."""
        return self.stage_dir(stage, fp) / "checkpoints"

    def remove_checkpoints(self, stage: str, fp: str) -> None:
        """Remove a complete fit stage's resumable checkpoints (if any are left)."""
        folder = self.checkpoint_dir(stage, fp)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def artifact_writer(self, stage: str, fp: str) -> Iterator[Path]:
        """A fresh temporary folder that becomes the stage's artifact on success."""
        final = self.artifact_dir(stage, fp)
        tmp = final.with_name(f".artifact.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        for stale in final.parent.glob(".artifact.tmp-*") if final.parent.exists() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def clean_temp_files(self, stage: str, fp: str) -> None:
        """Remove temporary files a killed process left behind in a stage folder."""
        folder = self.stage_dir(stage, fp)
        if not folder.is_dir():
            return
        for tmp in folder.glob(".*.tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
