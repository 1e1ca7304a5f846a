"""The SL-CAI and RL-CAI stage graph, driven through the executor.

Stages, in order (a run file's ``phases`` picks SL, RL or both)::

    prompts -+- responses -- revisions -- sft --+  (SFT checkpoint = RL policy)
             |                                  v
             +------------------------------- pairs -- labels -- preference_model -- policy

``source`` and ``map`` stages write Parquet shards; ``fit`` stages write a
checkpoint folder. Each stage's fingerprint covers its own settings and its
input's fingerprint, so a changed setting re-runs that stage and everything
after it, and nothing before it. A map stage's shards are checked one by one,
so an interrupted stage continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from caikit_core import __version__
from caikit_core.config import ResolvedRun, resolve_path
from caikit_core.constitution import Constitution
from caikit_core.errors import CaikitError, StageError, TrainingStopped
from caikit_core.interfaces import FitReport
from caikit_core.records import (
    Comparison,
    GenerationRequest,
    LabelledComparison,
    PreferenceLabel,
    Prompt,
    RevisionTrace,
    Sample,
    SamplingParams,
    derive_seed,
    from_arrow,
    stable_id,
    to_arrow,
)
from caikit_core.store import (
    RunStore,
    ShardInfo,
    StageManifest,
    file_digest,
    fingerprint,
    model_fingerprint,
)

log = logging.getLogger("caikit.pipeline")

T = TypeVar("T")
U = TypeVar("U")

#: bump when a stage's semantics change so old results are not reused
STAGE_VERSION = 1


@attrs.frozen
class StageDef:
    """One node of the stage graph."""

    name: str
    phase: str
    kind: str  # "source" | "map" | "fit"
    roles: tuple[str, ...]
    record_type: type | None


STAGES: dict[str, StageDef] = {
    s.name: s
    for s in (
        StageDef("prompts", "data", "source", (), Prompt),
        StageDef("responses", "sl", "map", ("generator",), Sample),
        StageDef("revisions", "sl", "map", ("generator", "critic"), RevisionTrace),
        StageDef("helpfulness", "sl", "map", ("generator",), RevisionTrace),
        StageDef("sft", "sl", "fit", ("policy_optimiser",), None),
        StageDef("pairs", "rl", "map", ("generator",), Comparison),
        StageDef("labels", "rl", "map", ("generator", "labeller"), PreferenceLabel),
        StageDef("preference_model", "rl", "fit", ("preference_model",), None),
        StageDef("policy", "rl", "fit", ("policy_optimiser",), None),
    )
}


def stage_names(run: ResolvedRun) -> list[str]:
    """The stages a run executes, in order."""
    phases = set(run.config.phases)
    names = ["prompts"]
    if "sl" in phases:
        names += ["responses", "revisions"]
        if run.config.sl.helpfulness_prompts is not None:
            names.append("helpfulness")
        if run.config.sl.sft:
            names.append("sft")
    if "rl" in phases:
        names += ["pairs", "labels", "preference_model"]
        if run.config.rl.train_policy:
            names.append("policy")
    return names


@attrs.define
class StageResult:
    name: str
    status: str  # "ran" | "skipped" | "resumed"
    rows: int
    seconds: float
    fingerprint: str
    path: Path
    artifact: Path | None = None
    metrics: dict[str, float] = attrs.field(factory=dict)


@attrs.define
class RunSummary:
    run_dir: Path
    stages: list[StageResult]

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


class _BatchFailed(Exception):
    def __init__(self, ids: list[str], cause: BaseException) -> None:
        self.ids = ids
        self.cause = cause
        super().__init__(f"{type(cause).__name__}: {cause}")


def _guard(
    fn: Callable[[list[T]], list[U]], ids: Callable[[T], str]
) -> Callable[[list[T]], list[U]]:
    def run(batch: list[T]) -> list[U]:
        try:
            return fn(batch)
        except CaikitError:
            raise
        except Exception as exc:
            raise _BatchFailed([ids(r) for r in batch], exc) from exc

    return run


class Pipeline:
    """Runs a resolved run file's stages against a run directory."""

    def __init__(self, run: ResolvedRun, *, store: RunStore | None = None) -> None:
        self.run = run
        self.cfg = run.config
        self.store = store or RunStore(run.output_path())
        self._constitution: Constitution | None = None
        self._instances: dict[tuple[str, str], Any] = {}
        self._fps: dict[str, str] = {}
        self._artifacts: dict[str, Path] = {}
        self.executor = run.roles["executor"].spec.build(run.roles["executor"].config)

    # shared pieces --------------------------------------------------------------
    @property
    def constitution(self) -> Constitution:
        if self._constitution is None:
            from caikit_core.constitutions import load_constitution

            path = self.cfg.constitution.path
            source = None if path == "default" else resolve_path(self.run.base_dir, path)
            self._constitution = load_constitution(source, format=self.cfg.constitution.format)
        return self._constitution

    def model(self, which: str) -> str:
        """The configured model for ``policy``, ``feedback`` or ``preference``."""
        models = self.cfg.models
        value = {
            "policy": models.policy,
            "feedback": models.feedback or models.policy,
            "preference": models.preference or models.feedback or models.policy,
        }[which]
        return resolve_model(self.run.base_dir, value)

    def policy_for_rl(self) -> tuple[str, Any]:
        """The RL policy/reference: the SFT checkpoint when this run trains one."""
        if "sft" in self._artifacts:
            return str(self._artifacts["sft"]), {"stage": "sft", "fingerprint": self._fps["sft"]}
        policy = self.model("policy")
        return policy, model_fingerprint(policy)

    def generator(self, model: str) -> Any:
        key = ("generator", model)
        if key not in self._instances:
            role = self.run.roles["generator"]
            log.info("loading generator '%s' with model %s", role.spec.name, model)
            self._instances[key] = role.spec.build(role.config, model=model)
        return self._instances[key]

    def _plugins(self, roles: Sequence[str]) -> dict[str, dict[str, str]]:
        out = {}
        for role in (*roles, "executor"):
            spec = self.run.roles[role].spec
            out[role] = {
                "name": spec.name,
                "plugin": spec.plugin,
                "distribution": spec.distribution,
                "version": spec.version,
            }
        return out

    def _role_payload(self, roles: Sequence[str]) -> dict[str, Any]:
        return {
            role: {
                "plugin": self.run.roles[role].spec.name,
                "options": self.run.roles[role].options(),
            }
            for role in roles
        }

    # driving ------------------------------------------------------------------------
    def execute(self) -> RunSummary:
        if {"critic", "labeller"} & set(self.run.roles):
            _ = self.constitution  # a bad constitution fails before any stage runs
        with self.store.lock():
            results = []
            for name in stage_names(self.run):
                results.append(self._execute_stage(STAGES[name]))
                self._write_run_info()
            return RunSummary(self.store.root, results)

    def _write_run_info(self) -> None:
        info = self.store.read_run() if self.store.exists() else {}
        info.update(
            {
                "caikit_version": __version__,
                "stages": dict(self._fps),
                "updated_at": time.time(),
            }
        )
        self.store.write_run(info)

    def _execute_stage(self, stage: StageDef) -> StageResult:
        handler: Callable[[StageDef], StageResult] = getattr(self, f"_stage_{stage.name}")
        return handler(stage)

    def _new_manifest(
        self, stage: StageDef, fp: str, input_fp: str, config_fp: str, models: dict[str, str]
    ) -> StageManifest:
        needs_constitution = any(r in stage.roles for r in ("critic", "labeller"))
        return StageManifest(
            stage=stage.name,
            kind=stage.kind,
            fingerprint=fp,
            input_fingerprint=input_fp,
            config_fingerprint=config_fp,
            plugins=self._plugins(stage.roles),
            constitution_hash=self.constitution.content_hash() if needs_constitution else None,
            models=models,
            seed=self.cfg.seed,
            record_type=stage.record_type.__name__ if stage.record_type else None,
        )

    def _fingerprints(
        self, stage: StageDef, input_fp: str, settings: dict[str, Any]
    ) -> tuple[str, str]:
        config_payload = {
            "stage": stage.name,
            "stage_version": STAGE_VERSION,
            "roles": self._role_payload(stage.roles),
            "settings": settings,
            "seed": self.cfg.seed,
        }
        if any(r in stage.roles for r in ("critic", "labeller")):
            config_payload["constitution"] = self.constitution.content_hash()
        config_fp = fingerprint(config_payload, what=f"the settings of stage '{stage.name}'")
        fp = fingerprint({"config": config_fp, "input": input_fp}, what=f"stage '{stage.name}'")
        self._fps[stage.name] = fp
        return fp, config_fp

    def _load_rows(self, name: str) -> list[Any]:
        fp = self._fps[name]
        manifest = self.store.read_manifest(name, fp)
        assert manifest is not None and manifest.complete, name
        cls = STAGES[name].record_type
        assert cls is not None
        rows: list[Any] = []
        for shard in sorted(manifest.shards, key=lambda s: s.index):
            rows.extend(from_arrow(self.store.read_shard(name, fp, shard.file), cls))
        return rows

    # map stages ---------------------------------------------------------------------
    def _run_map(
        self,
        stage: StageDef,
        items: Sequence[T],
        fn: Callable[[list[T]], list[U]],
        *,
        item_id: Callable[[T], str],
        fp: str,
        manifest: StageManifest,
    ) -> StageResult:
        assert stage.record_type is not None
        started = time.perf_counter()
        existing = self.store.read_manifest(stage.name, fp)
        if existing is not None:
            manifest = existing
        path = self.store.stage_dir(stage.name, fp)
        if manifest.complete:
            log.info("%s: complete, skipped (%d rows)", stage.name, manifest.rows)
            return StageResult(stage.name, "skipped", manifest.rows, 0.0, fp, path)
        self.store.clean_temp_files(stage.name, fp)
        size = self.cfg.shard_size
        shards = [list(items[i : i + size]) for i in range(0, len(items), size)]
        manifest.total_shards = len(shards)
        done = self.store.complete_shards(manifest)
        manifest.shards = sorted(done.values(), key=lambda s: s.index)
        pending = [i for i in range(len(shards)) if i not in done]
        status = "resumed" if done else "ran"
        if done:
            log.info(
                "%s: resuming, %d of %d shards already complete",
                stage.name,
                len(done),
                len(shards),
            )
        batches: list[list[T]] = []
        owner: list[int] = []
        bsz = self.cfg.batch_size
        for index in pending:
            for j in range(0, len(shards[index]), bsz):
                batches.append(shards[index][j : j + bsz])
                owner.append(index)
        remaining = {index: sum(1 for o in owner if o == index) for index in pending}
        collected: dict[int, list[U]] = {index: [] for index in pending}
        shard_started = time.perf_counter()
        guarded = _guard(fn, item_id)
        outputs: Iterator[list[Any]] = self.executor.map(
            guarded, iter(batches), total=sum(len(b) for b in batches), describe=stage.name
        )
        position = 0
        try:
            for out in outputs:
                index = owner[position]
                collected[index].extend(out)
                remaining[index] -= 1
                position += 1
                if remaining[index] == 0:
                    table = to_arrow(collected.pop(index), stage.record_type)
                    file = self.store.write_shard(stage.name, fp, index, table)
                    now = time.perf_counter()
                    manifest.shards.append(
                        ShardInfo(
                            index, file, table.num_rows, len(shards[index]), now - shard_started
                        )
                    )
                    manifest.shards.sort(key=lambda s: s.index)
                    shard_started = now
                    self.store.write_manifest(manifest)
        except _BatchFailed as failure:
            shown = ", ".join(failure.ids[:8]) + (" ..." if len(failure.ids) > 8 else "")
            raise StageError(
                f"stage '{stage.name}' failed on records [{shown}]: {failure}"
            ) from failure.cause
        manifest.complete = True
        manifest.rows = sum(s.rows for s in manifest.shards)
        manifest.finished_at = time.time()
        elapsed = time.perf_counter() - started
        manifest.timings["seconds"] = manifest.timings.get("seconds", 0.0) + elapsed
        self.store.write_manifest(manifest)
        return StageResult(stage.name, status, manifest.rows, elapsed, fp, path)

    def _check_count(self, stage: str, role: str, got: Sequence[Any], want: int) -> None:
        if len(got) != want:
            spec = self.run.roles[role].spec
            raise StageError(
                f"stage '{stage}': {role} '{spec.name}' ({spec.origin()}) returned "
                f"{len(got)} results for {want} inputs"
            )

    # the stages -----------------------------------------------------------------------
    def _stage_prompts(self, stage: StageDef) -> StageResult:
        from caikit_core.io.prompts import PromptFileError, read_prompts

        data = self.cfg.data
        path = resolve_path(self.run.base_dir, data.prompts)
        if not path.is_file():
            raise PromptFileError(
                f"{path}: prompt file not found (data.prompts in {self.run.source})"
            )
        digest = file_digest(path, what="the prompt file")
        settings = {"format": data.format, "field": data.field, "limit": data.limit}
        fp, config_fp = self._fingerprints(stage, digest, settings)
        manifest = self._new_manifest(stage, fp, digest, config_fp, {})
        prompts = read_prompts(path, format=data.format, field=data.field, limit=data.limit)
        if not prompts:
            raise StageError(f"{path}: no prompts to run")
        return self._run_map(
            stage, prompts, lambda batch: batch, item_id=_id, fp=fp, manifest=manifest
        )

    def _stage_responses(self, stage: StageDef) -> StageResult:
        policy = self.model("policy")
        sampling = self._sampling(self.cfg.sl.sampling)
        settings = {
            "sampling": attrs.asdict(sampling),
            "shard_size": self.cfg.shard_size,
            "policy": model_fingerprint(policy),
        }
        fp, config_fp = self._fingerprints(stage, self._fps["prompts"], settings)
        manifest = self._new_manifest(
            stage, fp, self._fps["prompts"], config_fp, {"policy": policy}
        )
        if self._is_complete(stage, fp):
            return self._skipped(stage, fp)
        prompts: list[Prompt] = self._load_rows("prompts")
        seed = self.cfg.seed

        def respond(batch: list[Prompt]) -> list[Sample]:
            requests = [
                GenerationRequest(
                    p.id, p.messages, sampling, 1, derive_seed(seed, p.id, "responses")
                )
                for p in batch
            ]
            generations = self.generator(policy).generate(requests)
            self._check_count(stage.name, "generator", generations, len(requests))
            return [
                Sample(stable_id("response", p.id), p.id, p.messages, g.texts[0], policy)
                for p, g in zip(batch, generations, strict=True)
            ]

        return self._run_map(stage, prompts, respond, item_id=_id, fp=fp, manifest=manifest)

    def _stage_revisions(self, stage: StageDef) -> StageResult:
        policy = self.model("policy")
        settings = {"shard_size": self.cfg.shard_size, "policy": model_fingerprint(policy)}
        fp, config_fp = self._fingerprints(stage, self._fps["responses"], settings)
        manifest = self._new_manifest(
            stage, fp, self._fps["responses"], config_fp, {"policy": policy}
        )
        if self._is_complete(stage, fp):
            return self._skipped(stage, fp)
        samples: list[Sample] = self._load_rows("responses")
        role = self.run.roles["critic"]
        critic = role.spec.build(
            role.config, generator=self.generator(policy), constitution=self.constitution
        )
        seed = self.cfg.seed

        def revise(batch: list[Sample]) -> list[RevisionTrace]:
            traces: list[RevisionTrace] = critic.revise(batch, seed=seed)
            self._check_count(stage.name, "critic", traces, len(batch))
            return traces

        return self._run_map(stage, samples, revise, item_id=_id, fp=fp, manifest=manifest)

    def _stage_helpfulness(self, stage: StageDef) -> StageResult:
        """Helpful-only samples mixed into the SFT data (the paper added 2 per prompt).

        Each sample is stored as a trace without revision steps, so the SFT
        optimiser trains on it as it is.
        """
        from caikit_core.io.prompts import PromptFileError, read_prompts

        sl = self.cfg.sl
        assert sl.helpfulness_prompts is not None
        path = resolve_path(self.run.base_dir, sl.helpfulness_prompts)
        if not path.is_file():
            raise PromptFileError(
                f"{path}: prompt file not found (sl.helpfulness_prompts in {self.run.source})"
            )
        policy = self.model("policy")
        sampling = self._sampling(sl.sampling)
        digest = file_digest(path, what="the helpfulness prompt file")
        settings = {
            "sampling": attrs.asdict(sampling),
            "samples": sl.helpfulness_samples,
            "shard_size": self.cfg.shard_size,
            "policy": model_fingerprint(policy),
        }
        fp, config_fp = self._fingerprints(stage, digest, settings)
        manifest = self._new_manifest(stage, fp, digest, config_fp, {"policy": policy})
        if self._is_complete(stage, fp):
            return self._skipped(stage, fp)
        prompts = read_prompts(path)
        seed, n = self.cfg.seed, sl.helpfulness_samples

        def sample(batch: list[Prompt]) -> list[RevisionTrace]:
            requests = [
                GenerationRequest(
                    p.id, p.messages, sampling, n, derive_seed(seed, p.id, "helpfulness")
                )
                for p in batch
            ]
            generations = self.generator(policy).generate(requests)
            self._check_count(stage.name, "generator", generations, len(requests))
            return [
                RevisionTrace(
                    stable_id("helpfulness", p.id, k),
                    p.id,
                    p.messages,
                    text,
                    (),
                    text,
                    "helpfulness",
                )
                for p, g in zip(batch, generations, strict=True)
                for k, text in enumerate(g.texts)
                if text.strip()
            ]

        return self._run_map(stage, prompts, sample, item_id=_id, fp=fp, manifest=manifest)

    def _stage_sft(self, stage: StageDef) -> StageResult:
        policy = self.model("policy")
        settings = {"policy": model_fingerprint(policy)}
        upstream = ["revisions"] + (["helpfulness"] if "helpfulness" in self._fps else [])

        def examples() -> list[RevisionTrace]:
            rows: list[RevisionTrace] = []
            for name in upstream:
                rows += [t for t in self._load_rows(name) if t.skipped_reason is None]
            return rows

        return self._run_fit(
            stage,
            "revisions",
            settings,
            {"policy": policy},
            lambda optimiser, out: optimiser.sft(policy, examples(), out),
            input_fp=fingerprint([self._fps[n] for n in upstream], what="the sft stage inputs"),
        )

    def _stage_pairs(self, stage: StageDef) -> StageResult:
        policy, policy_fp = self.policy_for_rl()
        sampling = self._sampling(self.cfg.rl.sampling)
        settings = {
            "sampling": attrs.asdict(sampling),
            "shard_size": self.cfg.shard_size,
            "policy": policy_fp,
        }
        fp, config_fp = self._fingerprints(stage, self._fps["prompts"], settings)
        manifest = self._new_manifest(
            stage, fp, self._fps["prompts"], config_fp, {"policy": policy}
        )
        if self._is_complete(stage, fp):
            return self._skipped(stage, fp)
        prompts: list[Prompt] = self._load_rows("prompts")
        seed = self.cfg.seed

        def sample_pairs(batch: list[Prompt]) -> list[Comparison]:
            requests = [
                GenerationRequest(p.id, p.messages, sampling, 2, derive_seed(seed, p.id, "pairs"))
                for p in batch
            ]
            generations = self.generator(policy).generate(requests)
            self._check_count(stage.name, "generator", generations, len(requests))
            out = []
            for p, g in zip(batch, generations, strict=True):
                if len(g.texts) != 2:
                    raise StageError(
                        f"stage 'pairs': generator returned {len(g.texts)} samples for "
                        f"record {p.id}, expected 2"
                    )
                out.append(
                    Comparison(
                        stable_id("pair", p.id), p.id, p.messages, g.texts[0], g.texts[1], policy
                    )
                )
            return out

        return self._run_map(stage, prompts, sample_pairs, item_id=_id, fp=fp, manifest=manifest)

    def _stage_labels(self, stage: StageDef) -> StageResult:
        feedback = self.model("feedback")
        settings = {"shard_size": self.cfg.shard_size, "feedback": model_fingerprint(feedback)}
        fp, config_fp = self._fingerprints(stage, self._fps["pairs"], settings)
        manifest = self._new_manifest(
            stage, fp, self._fps["pairs"], config_fp, {"feedback": feedback}
        )
        if self._is_complete(stage, fp):
            return self._skipped(stage, fp)
        comparisons: list[Comparison] = self._load_rows("pairs")
        role = self.run.roles["labeller"]
        labeller = role.spec.build(
            role.config, generator=self.generator(feedback), constitution=self.constitution
        )
        seed = self.cfg.seed

        def label(batch: list[Comparison]) -> list[PreferenceLabel]:
            labels: list[PreferenceLabel] = labeller.label(batch, seed=seed)
            self._check_count(stage.name, "labeller", labels, len(batch))
            bad = [
                f"{c.id} (p_a={x.p_a!r})"
                for c, x in zip(batch, labels, strict=True)
                if not (isinstance(x.p_a, float) and math.isfinite(x.p_a) and 0.0 <= x.p_a <= 1.0)
            ]
            wrong = [c.id for c, x in zip(batch, labels, strict=True) if x.comparison_id != c.id]
            if bad or wrong:
                what = (
                    "probabilities that are not finite numbers in [0, 1] for records "
                    + ", ".join(bad)
                    if bad
                    else f"labels for the wrong comparisons at records {', '.join(wrong)}"
                )
                raise StageError(
                    f"stage 'labels': labeller '{role.spec.name}' ({role.spec.origin()}) "
                    f"returned {what}"
                )
            return labels

        return self._run_map(stage, comparisons, label, item_id=_id, fp=fp, manifest=manifest)

    def _labelled(self) -> list[LabelledComparison]:
        comparisons = {c.id: c for c in self._load_rows("pairs")}
        return [
            LabelledComparison(comparisons[label.comparison_id], label)
            for label in self._load_rows("labels")
        ]

    def _stage_preference_model(self, stage: StageDef) -> StageResult:
        trunk = self.model("preference")
        return self._run_fit(
            stage,
            "labels",
            {"trunk": model_fingerprint(trunk)},
            {"trunk": trunk},
            lambda pm, out: pm.fit(self._labelled(), out),
            build_kwargs={"model": trunk},
        )

    def _stage_policy(self, stage: StageDef) -> StageResult:
        policy, policy_fp = self.policy_for_rl()
        pm_fp = self._fps["preference_model"]

        def optimise(optimiser: Any, out: Path) -> FitReport:
            role = self.run.roles["preference_model"]
            reward = role.spec.build(role.config, model=self.model("preference"))
            reward.load(self._artifacts["preference_model"])
            report: FitReport = optimiser.optimise(
                policy, policy, reward, self._load_rows("prompts"), self._labelled(), out
            )
            return report

        return self._run_fit(
            stage,
            "preference_model",
            {"policy": policy_fp, "prompts": self._fps["prompts"], "labels": self._fps["labels"]},
            {"policy": policy, "reference": policy},
            optimise,
            input_fp=fingerprint([pm_fp, self._fps["labels"]], what="the policy stage inputs"),
        )

    # fit stages -----------------------------------------------------------------------
    def _run_fit(
        self,
        stage: StageDef,
        upstream: str,
        settings: dict[str, Any],
        models: dict[str, str],
        fit: Callable[[Any, Path], FitReport],
        *,
        build_kwargs: dict[str, Any] | None = None,
        input_fp: str | None = None,
    ) -> StageResult:
        input_fp = input_fp or self._fps[upstream]
        fp, config_fp = self._fingerprints(stage, input_fp, settings)
        path = self.store.stage_dir(stage.name, fp)
        existing = self.store.read_manifest(stage.name, fp)
        artifact = self.store.artifact_dir(stage.name, fp)
        if existing is not None and existing.complete and artifact.is_dir():
            log.info("%s: complete, skipped", stage.name)
            self._artifacts[stage.name] = artifact
            return StageResult(stage.name, "skipped", 0, 0.0, fp, path, artifact, existing.metrics)
        manifest = self._new_manifest(stage, fp, input_fp, config_fp, models)
        role = self.run.roles[stage.roles[0]]
        started = time.perf_counter()
        instance = role.spec.build(role.config, **(build_kwargs or {}))
        with self.store.artifact_writer(stage.name, fp) as tmp:
            try:
                report = fit(instance, tmp)
            except TrainingStopped as stopped:
                kept = self._keep_stopped(stage, fp, tmp, stopped)
                raise TrainingStopped(
                    f"stage '{stage.name}' stopped: {stopped}"
                    + (f"; checkpoint kept at {kept}" if kept else ""),
                    checkpoint=str(kept) if kept else None,
                ) from stopped
        elapsed = time.perf_counter() - started
        manifest.artifact = "artifact"
        manifest.metrics = {k: float(v) for k, v in report.metrics.items()}
        manifest.complete = True
        manifest.finished_at = time.time()
        manifest.timings["seconds"] = elapsed
        self.store.write_manifest(manifest)
        self._artifacts[stage.name] = artifact
        return StageResult(stage.name, "ran", 0, elapsed, fp, path, artifact, manifest.metrics)

    def _keep_stopped(
        self, stage: StageDef, fp: str, tmp: Path, stopped: TrainingStopped
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

    # helpers --------------------------------------------------------------------------
    def _sampling(self, cfg: Any) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
        )

    def _is_complete(self, stage: StageDef, fp: str) -> bool:
        manifest = self.store.read_manifest(stage.name, fp)
        return manifest is not None and manifest.complete

    def _skipped(self, stage: StageDef, fp: str) -> StageResult:
        manifest = self.store.read_manifest(stage.name, fp)
        assert manifest is not None
        log.info("%s: complete, skipped (%d rows)", stage.name, manifest.rows)
        return StageResult(
            stage.name, "skipped", manifest.rows, 0.0, fp, self.store.stage_dir(stage.name, fp)
        )


def _id(record: Any) -> str:
    value = record.id
    assert isinstance(value, str)
    return value


def resolve_model(base_dir: Path, value: str) -> str:
    """A model named in a run file: an explicit or existing relative path becomes
    absolute; anything else (a cache alias or hub id) is passed on unchanged."""
    if value.startswith(("/", "./", "../", "~")):
        return str(resolve_path(base_dir, value))
    candidate = base_dir / value
    if candidate.exists():
        return str(candidate.resolve())
    from caikit_core.models import resolve_alias

    return resolve_alias(value)
