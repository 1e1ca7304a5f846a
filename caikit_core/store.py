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
import errno
import fcntl
import hashlib
import json
import logging
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
from caikit_core.hashing import file_sha256

log = logging.getLogger("caikit.store")

FINGERPRINT_LENGTH = 16

#: the run directory's metrics log (see :meth:`RunStore.append_metrics`)
METRICS_FILE = "metrics.jsonl"
#: a map stage's items left out under ``on_error = "skip"``, beside its shards
SKIPPED_FILE = "skipped.parquet"


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
    """What identifies a model.

    - a local folder: the sha256 of each of its files (weights, config, tokenizer),
      by relative path; files and folders whose name starts with ``.`` are left out.
      Hashes are cached by path, size, mtime, ctime and inode
      (:mod:`caikit_core.hashing`), so a rerun does not read the weights again;
    - a hub id found in the local Hugging Face cache: the id and the commit its
      ``refs/main`` names;
    - any other id: the id alone (logged once), as caikit 0.1.0 did.
    """
    path = Path(model)
    if not path.is_dir():
        revision = hub_revision(model)
        if revision is None:
            if model not in _ID_ONLY:
                _ID_ONLY.add(model)
                log.info(
                    "model %r is neither a folder nor in the local Hugging Face cache: "
                    "fingerprinted by its name alone",
                    model,
                )
            return {"id": model}
        return {"id": model, "revision": revision}
    try:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        digests = file_sha256(files)
    except OSError as exc:
        raise FingerprintError(f"cannot fingerprint model folder {path}: {exc}") from exc
    return {"sha256": {str(p.relative_to(path)): d for p, d in zip(files, digests, strict=True)}}


_ID_ONLY: set[str] = set()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "huggingface"
    return base / "hub"


def hub_revision(model: str) -> str | None:
    """The commit the local hub cache's ``refs/main`` names for ``model``, if any."""
    if not model or model.startswith((".", "/", "~")) or model.count("/") > 1:
        return None
    ref = hub_cache_dir() / f"models--{model.replace('/', '--')}" / "refs" / "main"
    try:
        text = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    ok = len(text) == 40 and all(c in "0123456789abcdef" for c in text)
    return text if ok else None


def shard_file_name(index: int) -> str:
    """The file name of shard ``index`` in its stage folder (the only one it can have)."""
    return f"shard-{index:05d}.parquet"


@attrs.frozen
class ShardInfo:
    """One complete shard."""

    index: int
    file: str
    rows: int
    input_rows: int
    seconds: float
    #: the file's sha256 when it was written (``None`` in manifests of caikit 0.1.0)
    sha256: str | None = None
    #: the items of this shard left out under ``on_error = "skip"``: (id, reason) each
    skipped: tuple[tuple[str, str], ...] = ()
    #: what the generator warned while this shard's batches ran: (message, count) each,
    #: most frequent first, bounded (``caikit_core.stages.base.tally``)
    warnings: tuple[tuple[str, int], ...] = ()


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
    #: items left out under ``on_error = "skip"`` (listed in ``skipped.parquet``)
    skipped: int = 0
    #: the shards' generator warnings merged: (message, count) each, bounded
    warnings: list[tuple[str, int]] = attrs.field(factory=list)
    artifact: str | None = None
    metrics: dict[str, float] = attrs.field(factory=dict)
    #: a fit stage's per-step metrics (e.g. PPO's reward and KL), when its plugin reports them
    history: list[dict[str, float]] = attrs.field(factory=list)
    timings: dict[str, float] = attrs.field(factory=dict)
    created_at: float = attrs.field(factory=time.time)
    finished_at: float | None = None


#: the errors of a full disk (or quota) and of a folder that cannot be written
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(exc: OSError, where: Path, stage: str | None = None) -> StoreError | None:
    """The one-line error for a write that failed because the disk is full or the run
    directory ``where`` cannot be written (``None`` for any other error): the path, the
    reason, and how to continue (free space; remount; make the folder writable for this
    user). ``where`` stands in for the path when the error names none (pyarrow's do not)."""
    if exc.errno not in STORAGE_ERRNOS:
        return None
    path = exc.filename if isinstance(exc.filename, str) else str(where)
    during = f" (stage '{stage}')" if stage else ""
    then = (
        f"resume with: caikit run --resume {where}"
        if (where / "run.json").is_file()
        else "run it again"
    )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space"
    elif exc.errno == errno.EROFS:
        fix = "make the run directory writable (remount it read-write, or move the run)"
    else:  # EACCES, EPERM: this user may not write there; the disk is not full
        fix = f"make {_folder_of(Path(path), where)} writable for this user"
    return StoreError(
        f"{path}{during}: {os.strerror(exc.errno)}; what is complete is kept: {fix}, then {then}"
    )


def _folder_of(path: Path, where: Path) -> Path:
    """The folder to make writable for a failed write of ``path``: the path itself when
    it is a folder, else the folder holding it (``where`` when it names neither)."""
    if path.is_dir():
        return path
    return path.parent if path.parent.is_dir() else where


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. a full disk: give its space back
        raise


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
        self._held = 0

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
        """Hold an exclusive lock on the run directory (released if the process dies).

        Re-entrant within one :class:`RunStore`: ``caikit run`` takes it before it
        records the run file and the runner takes it again inside, so the directory
        is never unlocked between the two. Another ``RunStore`` (another process) is
        refused while it is held.
        """
        if self._held:
            self._held += 1
            try:
                yield
            finally:
                self._held -= 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fh = (self.root / ".lock").open("a+")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"{self.root}: another caikit process is working on this run"
                ) from None
            self._held = 1
            for stale in self.root.glob(".run.json.tmp-*"):  # a killed process's
                stale.unlink(missing_ok=True)
            try:
                yield
            finally:
                self._held = 0
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

    def adopt_manifest(self, stage: str, fp: str) -> StageManifest | None:
        """A fit stage's manifest that a killed process wrote in full but did not rename
        into place, renamed now; ``None`` (the stage is retrained) unless the folder
        holds the stage's ``artifact`` (renamed into place only after its fit returned)
        and a temporary manifest that parses, says complete and has this fingerprint."""
        folder = self.stage_dir(stage, fp)
        if not self.artifact_dir(stage, fp).is_dir():
            return None
        for tmp in sorted(folder.glob(".manifest.json.tmp-*")):
            try:
                manifest = converter.structure(
                    json.loads(tmp.read_text(encoding="utf-8")), StageManifest
                )
            except Exception:
                continue  # torn by the kill: not verifiable
            if manifest.fingerprint == fp and manifest.complete and manifest.artifact:
                os.replace(tmp, folder / "manifest.json")
                assert isinstance(manifest, StageManifest)
                return manifest
        return None

    def complete_shards(self, manifest: StageManifest) -> dict[int, ShardInfo]:
        """Shards listed in the manifest whose files are present and intact
        (see :meth:`damaged_shards`)."""
        bad = self.damaged_shards(manifest)
        return {s.index: s for s in manifest.shards if s.index not in bad}

    def damaged_shards(self, manifest: StageManifest) -> dict[int, str]:
        """Why each shard of the manifest cannot be used, by index: its file is missing,
        its sha256 differs from the one recorded when it was written, or (in manifests
        without checksums) its row count differs from the manifest's; and, in a complete
        manifest, shards it does not list at all."""
        folder = self.stage_dir(manifest.stage, manifest.fingerprint)
        bad: dict[int, str] = {}
        for shard in manifest.shards:
            if shard.file != shard_file_name(shard.index):
                # a name the store never writes (an absolute path, '..'): never opened
                bad[shard.index] = (
                    f"listed under a name the store never writes ({shard.file!r}, not "
                    f"{shard_file_name(shard.index)})"
                )
                continue
            path = folder / shard.file
            if not path.is_file():
                bad[shard.index] = f"missing ({path.name})"
                continue
            try:
                if shard.sha256 is not None:
                    if file_digest(path, what="a shard") != shard.sha256:
                        bad[shard.index] = f"damaged ({path.name}: its sha256 changed)"
                elif (rows := pq.read_metadata(path).num_rows) != shard.rows:
                    bad[shard.index] = f"damaged ({path.name}: {rows} rows, not {shard.rows})"
            except (OSError, pa.ArrowInvalid, FingerprintError) as exc:
                bad[shard.index] = f"unreadable ({path.name}: {exc})"
        if manifest.complete and manifest.total_shards is not None:
            listed = {s.index for s in manifest.shards}
            for index in range(manifest.total_shards):
                if index not in listed:
                    bad[index] = "not listed in the manifest"
        return bad

    def shard_digest(self, stage: str, fp: str, file: str) -> str:
        """The sha256 of a shard file (recorded in its :class:`ShardInfo`)."""
        return file_digest(self.stage_dir(stage, fp) / file, what="a shard")

    def write_shard(self, stage: str, fp: str, index: int, table: pa.Table) -> str:
        """Write one shard atomically; returns its file name."""
        name = shard_file_name(index)
        self._write_parquet(stage, fp, name, table)
        return name

    def _write_parquet(self, stage: str, fp: str, name: str, table: pa.Table) -> None:
        folder = self.stage_dir(stage, fp)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_skipped(self, manifest: StageManifest) -> Path | None:
        """Write ``skipped.parquet`` (columns ``shard``, ``id``, ``reason``) beside the
        shards from the manifest's skipped items, or remove a stale one when there are
        none; returns its path when written."""
        path = self.stage_dir(manifest.stage, manifest.fingerprint) / SKIPPED_FILE
        rows = [(s.index, i, why) for s in manifest.shards for i, why in s.skipped]
        if not rows:
            path.unlink(missing_ok=True)
            return None
        shard, ids, reasons = (list(col) for col in zip(*rows, strict=True))
        table = pa.table(
            {
                "shard": pa.array(shard, pa.int64()),
                "id": pa.array(ids, pa.string()),
                "reason": pa.array(reasons, pa.string()),
            }
        )
        self._write_parquet(manifest.stage, manifest.fingerprint, SKIPPED_FILE, table)
        return path

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
        return [
            folder / shard_file_name(s.index)
            for s in sorted(manifest.shards, key=lambda s: s.index)
        ]

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
        log.info("%s: saved to %s", stage, final)  # the final folder, not the temporary one

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
