"""Runs a resolved run file's stages against a run directory.

The runner knows no stage by name: it asks each stage of
:data:`caikit_core.stages.STAGES` that the run includes for its input and
settings, fingerprints them, and skips the stage when the run directory already
holds a complete result with that fingerprint. Otherwise

- a ``source`` stage's records are written as shards;
- a ``map`` stage's items are cut into shards of ``shard_size`` and batches of
  ``batch_size``; each batch goes to the executor under a key ``(shard, offset)``
  with the stage's :class:`~caikit_core.stages.base.WorkerSpec`; results come back
  keyed, in any order, and a shard is written once all its batches are in, its rows
  in item order and each record id once (an executor that retries a batch cannot
  duplicate rows). Complete shards are kept, so an interrupted stage resumes where
  it stopped;
- a ``fit`` stage trains into a temporary folder that becomes its ``artifact``; a
  plugin with the ``resumable`` capability also gets the stage's ``checkpoints``
  folder (``checkpoint_dir=``), which survives a kill, so a rerun continues from
  its last checkpoint; the folder is removed once the stage is complete.

A stage's fingerprint covers its own settings, its roles' plugins and configs, the
seed, the constitution (for critics and labellers) and its input's fingerprint, so
a changed setting re-runs that stage and everything after it, and nothing before it.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from caikit_core import __version__
from caikit_core.config import ResolvedRun
from caikit_core.errors import ConfigError, StageError, TrainingStopped
from caikit_core.records import to_arrow
from caikit_core.stages import STAGES, stage_names
from caikit_core.stages.base import (
    BatchFailed,
    Context,
    GeneratorWarnings,
    Key,
    Skipped,
    Stage,
    StageResult,
    release_instances,
    tally,
    warnings_line,
)
from caikit_core.store import (
    SKIPPED_FILE,
    RunStore,
    ShardInfo,
    StageManifest,
    fingerprint,
    storage_error,
)

log = logging.getLogger("caikit.runner")

#: bump when a stage's semantics change so old results are not reused
STAGE_VERSION = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) while a stage ran; the message names it and how to resume."""

    def __init__(self, stage: str, run_dir: Path) -> None:
        self.stage = stage
        super().__init__(
            f"interrupted during stage '{stage}'; resume with: caikit run --resume {run_dir}"
        )


@attrs.define
class RunSummary:
    """Every stage's result, in run order, and the context they ran in."""

    run_dir: Path
    stages: list[StageResult]
    context: Context

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class Runner:
    """Runs a resolved run file's stages against a run directory."""

    def __init__(self, run: ResolvedRun, *, store: RunStore | None = None) -> None:
        self.run = run
        self.store = store or RunStore(run.output_path())
        self.ctx = Context(run, self.store, STAGES)
        role = run.roles["executor"]
        self.executor = role.spec.build(role.config)

    def execute(self) -> RunSummary:
        if {"critic", "labeller"} & set(self.run.roles):
            _ = self.ctx.constitution  # a bad constitution fails before any stage runs
        planned = stage_names(self.run.config)
        self._check_stage_tables()
        for name in planned:
            STAGES[name]().precheck(self.ctx, planned)
        with self.store.lock():
            results = []
            try:
                names = stage_names(self.run.config)
                for name in names:
                    try:
                        results.append(self._execute(STAGES[name]()))
                        self._write_run_info(final=name == names[-1])
                        self._log_metrics(results[-1])
                    except KeyboardInterrupt:
                        raise Interrupted(name, self.store.root) from None
                    except OSError as exc:
                        error = storage_error(exc, self.store.root, name)
                        if error is None:
                            raise
                        raise error from exc
            finally:
                release_instances()
            return RunSummary(self.store.root, results, self.ctx)

    def _check_stage_tables(self) -> None:
        """``[stages.NAME]`` names a map stage (the only kind with per-stage settings)."""
        maps = [name for name, cls in STAGES.items() if cls.kind == "map"]
        problems = [
            f"stages.{name}: expected the name of a map stage ({', '.join(maps)}), found '{name}'"
            for name in self.run.config.stages
            if name not in maps
        ]
        if problems:
            raise ConfigError(self.run.source, problems)

    def _on_error(self, stage: Stage) -> str:
        table = self.run.config.stages.get(stage.name)
        return table.on_error if table is not None else "stop"

    def _write_run_info(self, *, final: bool) -> None:
        """Record the stages' fingerprints: until the last stage is done, those reached
        are updated and the others kept (a failed run leaves the last complete results
        named); at the end, exactly this run's stages."""
        info = self.store.read_run() if self.store.exists() else {}
        before = info.get("stages")
        stages = dict(before) if isinstance(before, dict) and not final else {}
        stages.update(self.ctx.fingerprints)
        info.update(
            {
                "caikit_version": __version__,
                "stages": stages,
                "updated_at": time.time(),
            }
        )
        self.store.write_run(info)

    def _log_metrics(self, result: StageResult) -> None:
        """Append the stage's lines to ``metrics.jsonl``: one per step of a fit stage's
        history, then one for the stage; once per stage and fingerprint, so a rerun
        that skips the stage adds nothing (and one whose lines a killed process never
        wrote adds them from the manifest)."""
        if (result.name, result.fingerprint) in self.store.logged_stages():
            return
        manifest = self.store.read_manifest(result.name, result.fingerprint)
        if manifest is None or not manifest.complete:
            return
        head = {"stage": manifest.stage, "fingerprint": manifest.fingerprint}
        lines: list[dict[str, Any]] = [
            {**head, "type": "step", "step": i, "metrics": row}
            for i, row in enumerate(manifest.history)
        ]
        lines.append(
            {
                **head,
                "type": "stage",
                "step": None,
                "kind": manifest.kind,
                "rows": manifest.rows,
                "seconds": _numbers(manifest.timings).get("seconds"),
                "finished_at": manifest.finished_at,
                "metrics": _numbers(manifest.metrics),
            }
        )
        if manifest.warnings:
            lines[-1]["generator_warnings"] = [list(w) for w in manifest.warnings]
        self.store.append_metrics(lines)

    # fingerprints and manifests -----------------------------------------------------------
    def _fingerprints(self, stage: Stage) -> tuple[str, str, str]:
        """The stage's input, config and full fingerprints (the last names its folder)."""
        input_fp = stage.input_fingerprint(self.ctx)
        config_payload: dict[str, Any] = {
            "stage": stage.name,
            "stage_version": STAGE_VERSION,
            "roles": {
                role: {
                    "plugin": self.ctx.role(role).plugin,
                    "options": self.ctx.role(role).fingerprint_options(),
                }
                for role in stage.roles
            },
            "settings": stage.settings(self.ctx),
            "seed": self.ctx.seed,
        }
        if self._on_error(stage) == "skip":  # its output may lack rows: not "stop"'s result
            config_payload["on_error"] = "skip"
        if self._uses_constitution(stage):
            config_payload["constitution"] = self.ctx.constitution.content_hash()
        config_fp = fingerprint(config_payload, what=f"the settings of stage '{stage.name}'")
        fp = fingerprint({"config": config_fp, "input": input_fp}, what=f"stage '{stage.name}'")
        self.ctx.fingerprints[stage.name] = fp
        return input_fp, config_fp, fp

    @staticmethod
    def _uses_constitution(stage: Stage) -> bool:
        return any(r in stage.roles for r in ("critic", "labeller"))

    def _manifest(self, stage: Stage, fp: str, input_fp: str, config_fp: str) -> StageManifest:
        plugins = {}
        specs = {role: self.run.roles[role].spec for role in (*stage.roles, "executor")}
        for role, spec in {**specs, **stage.other_plugins(self.ctx)}.items():
            plugins[role] = {
                "name": spec.name,
                "plugin": spec.plugin,
                "distribution": spec.distribution,
                "version": spec.version,
            }
        return StageManifest(
            stage=stage.name,
            kind=stage.kind,
            fingerprint=fp,
            input_fingerprint=input_fp,
            config_fingerprint=config_fp,
            plugins=plugins,
            constitution_hash=(
                self.ctx.constitution.content_hash() if self._uses_constitution(stage) else None
            ),
            models=stage.models(self.ctx),
            seed=self.ctx.seed,
            record_type=stage.record_type.__name__ if stage.record_type else None,
        )

    # driving ------------------------------------------------------------------------------
    def _execute(self, stage: Stage) -> StageResult:
        input_fp, config_fp, fp = self._fingerprints(stage)
        path = self.store.stage_dir(stage.name, fp)
        existing = self.store.read_manifest(stage.name, fp)
        if existing is None and stage.kind == "fit":
            existing = self.store.adopt_manifest(stage.name, fp)
            if existing is not None:
                log.info("%s: adopted the artifact a killed run left complete", stage.name)
                self.store.clean_temp_files(stage.name, fp)  # what else it left (we hold the lock)
        if existing is None:
            self._note_other_results(stage, fp)
        if stage.kind == "fit":
            artifact = self.store.artifact_dir(stage.name, fp)
            if existing is not None and existing.complete and artifact.is_dir():
                log.info("%s: complete, skipped", stage.name)
                self.store.remove_checkpoints(stage.name, fp)  # a kill before removal
                self.ctx.artifacts[stage.name] = artifact
                return StageResult(
                    stage.name, "skipped", 0, 0.0, fp, path, artifact,
                    existing.metrics, existing.history,
                )  # fmt: skip
            return self._run_fit(stage, fp, self._manifest(stage, fp, input_fp, config_fp))
        if existing is not None and existing.complete:
            damaged = self.store.damaged_shards(existing)
            if not damaged:
                log.info("%s: complete, skipped (%d rows)", stage.name, existing.rows)
                return StageResult(
                    stage.name, "skipped", existing.rows, 0.0, fp, path,
                    skipped=existing.skipped, warnings=tuple(existing.warnings),
                )  # fmt: skip
            for index, why in sorted(damaged.items()):
                log.warning(
                    "%s: shard %d of a complete stage is %s: recomputing it", stage.name, index, why
                )
            existing.complete = False
        manifest = existing or self._manifest(stage, fp, input_fp, config_fp)
        return self._run_shards(stage, fp, manifest)

    def _note_other_results(self, stage: Stage, fp: str) -> None:
        """Say so when a stage computes anew beside results made with other fingerprints."""
        folder = self.store.stage_dir(stage.name, fp)
        manifests = folder.parent.glob("*/manifest.json") if folder.parent.is_dir() else []
        others = sorted(m.parent.name for m in manifests if m.parent != folder)
        if others:
            log.info(
                "%s: computing into %s; the %d other result(s) in %s (%s) are kept but not "
                "reused: their settings, inputs or models differ (model folders are "
                "fingerprinted by content, see docs/reliability.md)",
                stage.name, folder.name, len(others), folder.parent, ", ".join(others[:4]),
            )  # fmt: skip

    def _run_shards(self, stage: Stage, fp: str, manifest: StageManifest) -> StageResult:
        """Write a source or map stage's shards, continuing from those already complete."""
        assert stage.record_type is not None
        started = time.perf_counter()
        self.store.clean_temp_files(stage.name, fp)
        items = stage.items(self.ctx)
        size = self.run.config.shard_size
        shards = [list(items[i : i + size]) for i in range(0, len(items), size)]
        manifest.total_shards = len(shards)
        done = self.store.complete_shards(manifest)
        manifest.shards = sorted(done.values(), key=lambda s: s.index)
        pending = [i for i in range(len(shards)) if i not in done]
        if done:
            log.info(
                "%s: resuming, %d of %d shards already complete",
                stage.name,
                len(done),
                len(shards),
            )
        batches: dict[Key, list[Any]] = {}
        bsz = self.run.config.batch_size
        for index in pending:
            for offset in range(0, len(shards[index]), bsz):
                batches[(index, offset)] = shards[index][offset : offset + bsz]
        writer = _ShardWriter(self.store, stage, fp, manifest, shards, batches)
        if stage.kind == "source" or not batches:
            outputs: Iterator[tuple[Key, list[Any]]] = iter(batches.items())
        else:
            outputs = self.executor.map(
                attrs.evolve(stage.worker(self.ctx), on_error=self._on_error(stage)),
                iter(batches.items()),
                total=sum(len(b) for b in batches.values()),
                describe=stage.name,
            )
        try:
            for key, out in outputs:
                writer.add(key, out)
        except Exception as exc:
            failure = _batch_failure(exc)
            if failure is None:
                raise
            ids = [stage.item_id(x) for x in batches.get(failure.key, [])]
            shown = ", ".join(ids[:8]) + (" ..." if len(ids) > 8 else "")
            kept = len(manifest.shards)
            message = (
                f"stage '{stage.name}' failed on records [{shown}]: {failure} ({kept} of "
                f"{len(shards)} shards complete and kept; once fixed, `caikit run --resume "
                f"{self.store.root}` continues from them, or set [stages.{stage.name}] "
                'on_error = "skip" to leave failing records out)'
            )
            raise StageError(message) from (failure.__cause__ or failure)
        if writer.missing():
            raise StageError(
                f"stage '{stage.name}': the executor returned no results for batches "
                f"{sorted(map(repr, writer.missing()))[:8]}"
            )
        manifest.complete = True
        manifest.rows = sum(s.rows for s in manifest.shards)
        manifest.skipped = sum(len(s.skipped) for s in manifest.shards)
        manifest.warnings = list(tally(w for s in manifest.shards for w in s.warnings))
        manifest.finished_at = time.time()
        elapsed = time.perf_counter() - started
        manifest.timings["seconds"] = manifest.timings.get("seconds", 0.0) + elapsed
        self.store.write_skipped(manifest)  # before the manifest says complete
        self.store.write_manifest(manifest)
        if manifest.skipped:
            log.warning(
                "%s: %d record(s) skipped on error, listed in %s",
                stage.name, manifest.skipped, self.store.stage_dir(stage.name, fp) / SKIPPED_FILE,
            )  # fmt: skip
        if manifest.warnings:
            log.warning(
                "%s: %s", stage.name, warnings_line(manifest.rows, tuple(manifest.warnings))
            )
        status = "resumed" if done else "ran"
        path = self.store.stage_dir(stage.name, fp)
        return StageResult(
            stage.name, status, manifest.rows, elapsed, fp, path,
            skipped=manifest.skipped, warnings=tuple(manifest.warnings),
        )  # fmt: skip

    def _run_fit(self, stage: Stage, fp: str, manifest: StageManifest) -> StageResult:
        release_instances()  # free the generators' models before training
        self.store.clean_temp_files(stage.name, fp)  # what a killed fit left (we hold the lock)
        started = time.perf_counter()
        self.ctx.checkpoint_dir = self.store.checkpoint_dir(stage.name, fp)
        try:
            with self.store.artifact_writer(stage.name, fp) as tmp:
                try:
                    report = stage.fit(self.ctx, tmp)
                except TrainingStopped as stopped:
                    kept = self._keep_stopped(stage, fp, tmp, stopped)
                    raise TrainingStopped(
                        f"stage '{stage.name}' stopped: {stopped}"
                        + (f"; checkpoint kept at {kept}" if kept else ""),
                        checkpoint=str(kept) if kept else None,
                    ) from stopped
        finally:
            self.ctx.checkpoint_dir = None
        elapsed = time.perf_counter() - started
        manifest.artifact = "artifact"
        manifest.metrics = {k: float(v) for k, v in report.metrics.items()}
        manifest.history = [_numbers(row) for row in report.history]
        manifest.complete = True
        manifest.finished_at = time.time()
        manifest.timings["seconds"] = elapsed
        self.store.write_manifest(manifest)
        self.store.remove_checkpoints(stage.name, fp)  # complete: nothing to resume
        artifact = self.store.artifact_dir(stage.name, fp)
        self.ctx.artifacts[stage.name] = artifact
        return StageResult(
            stage.name,
            "ran",
            0,
            elapsed,
            fp,
            self.store.stage_dir(stage.name, fp),
            artifact,
            manifest.metrics,
            manifest.history,
        )

    def _keep_stopped(
        self, stage: Stage, fp: str, tmp: Path, stopped: TrainingStopped
    ) -> Path | None:
        """Move what a stopped trainer saved out of the temporary folder (which is
        removed) to ``stopped-<time>`` in the stage folder; the stage stays incomplete."""
        source = Path(stopped.checkpoint) if stopped.checkpoint else None
        if source is None or not source.exists():
            return None
        target = self.store.stage_dir(stage.name, fp) / f"stopped-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            source.resolve().relative_to(tmp.resolve())
        except ValueError:
            return source  # saved outside the temporary folder: already safe
        shutil.move(str(source), str(target))
        return target


#: what a batch returns among its records that is not a record
_NOT_RECORDS = (Skipped, GeneratorWarnings)


def _batch_failure(exc: BaseException) -> BatchFailed | None:
    """The :class:`BatchFailed` an executor raised, or chained as a cause."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BatchFailed):
            return seen
        seen = seen.__cause__
    return None


def _numbers(row: Any) -> dict[str, float]:
    """A history row's finite numbers (a trainer's log rows also hold strings, bools)."""
    return {
        str(k): float(v)
        for k, v in dict(row).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class _ShardWriter:
    """Collects keyed batch results and writes each shard when all its batches are in."""

    def __init__(
        self,
        store: RunStore,
        stage: Stage,
        fp: str,
        manifest: StageManifest,
        shards: list[list[Any]],
        batches: dict[Key, list[Any]],
    ) -> None:
        self.store, self.stage, self.fp, self.manifest = store, stage, fp, manifest
        self.shards = shards
        self.batches = batches
        #: each batch's (shard, offset), by key
        self.place: dict[Key, tuple[int, int]] = {}
        self.waiting: dict[int, set[Key]] = {}
        for key in batches:
            assert isinstance(key, tuple), key  # the runner's own (shard, offset) keys
            self.place[key] = (key[0], key[1])
            self.waiting.setdefault(key[0], set()).add(key)
        self.received: dict[int, dict[Key, list[Any]]] = {i: {} for i in self.waiting}
        self.started = time.perf_counter()

    def missing(self) -> set[Key]:
        return {key for keys in self.waiting.values() for key in keys}

    def add(self, key: Key, outputs: list[Any]) -> None:
        if key not in self.place:
            raise StageError(
                f"stage '{self.stage.name}': the executor returned a batch it was not given "
                f"(key {key!r})"
            )
        index = self.place[key][0]
        if key not in self.waiting.get(index, ()):
            return  # a batch the executor ran again (at-least-once): already have it
        self._check_sources(key, [r for r in outputs if not isinstance(r, _NOT_RECORDS)])
        self.waiting[index].discard(key)
        self.received[index][key] = outputs
        if not self.waiting[index]:
            del self.waiting[index]
            self._write(index, self.received.pop(index))

    def _check_sources(self, key: Key, outputs: list[Any]) -> None:
        """Every record came from an item of the batch it was returned for."""
        if self.stage.join is None:
            return
        item_field, record_field = self.stage.join
        sources = {getattr(item, item_field) for item in self.batches[key]}
        strays = [r.id for r in outputs if getattr(r, record_field) not in sources]
        if strays:
            raise StageError(
                f"stage '{self.stage.name}': the executor returned records {strays[:8]} under "
                f"batch key {key!r}, but they do not come from that batch's items (their "
                f"{record_field} is none of the batch's {item_field}s); an executor must "
                "pair each batch's outputs with that batch's key"
            )

    def _write(self, index: int, parts: dict[Key, list[Any]]) -> None:
        """Rows in item order (by batch offset); two records with one id are an error
        (a retried batch never gets here twice: :meth:`add` keeps one copy)."""
        assert self.stage.record_type is not None
        out = [r for key in sorted(parts, key=lambda k: self.place[k][1]) for r in parts[key]]
        rows = [r for r in out if not isinstance(r, _NOT_RECORDS)]
        skipped = tuple((r.id, r.reason) for r in out if isinstance(r, Skipped))
        warned = tally(c for r in out if isinstance(r, GeneratorWarnings) for c in r.counts)
        ids = [r.id for r in rows]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise StageError(
                f"stage '{self.stage.name}': records {twice[:8]} were returned more than once "
                f"in shard {index}; each record needs its own id"
            )
        table = to_arrow(rows, self.stage.record_type)
        file = self.store.write_shard(self.stage.name, self.fp, index, table)
        now = time.perf_counter()
        digest = self.store.shard_digest(self.stage.name, self.fp, file)
        self.manifest.shards.append(
            ShardInfo(
                index,
                file,
                table.num_rows,
                len(self.shards[index]),
                now - self.started,
                digest,
                skipped,
                warned,
            )
        )
        self.manifest.shards.sort(key=lambda s: s.index)
        self.started = now
        self.store.write_manifest(self.manifest)
