"""What a stage is, what its worker is, and what a stage can ask of the run.

A **stage** is a class with declarations (name, phase, kind, inputs, record
type, roles) and a few methods the runner calls: its fingerprinted
``settings``, its ``items`` and, for a map stage, a :class:`WorkerSpec`; for a
fit stage, ``fit``. It reads earlier stages only through :class:`Context`.

A **worker spec** is what crosses to wherever a batch runs: a module-level
worker class and plain, picklable keyword arguments (roles as
:class:`RoleRef` = plugin name + validated config, model paths, sampling
settings, the constitution, the seed). :meth:`WorkerSpec.build` makes the
worker in the process that calls it; the worker builds its plugins through
:func:`plugin_instance`, a per-process cache, so a local run loads the policy
model once for the responses, revisions and helpfulness stages.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import attrs

from caikit_core.config import RoleRef
from caikit_core.errors import CaikitError, StageError
from caikit_core.records import (
    Generation,
    GenerationRequest,
    Prompt,
    SamplingParams,
    derive_seed,
    from_arrow,
)

if TYPE_CHECKING:
    from caikit_core.config import ResolvedRun, RunConfig
    from caikit_core.constitution import Constitution
    from caikit_core.interfaces import FitReport
    from caikit_core.store import RunStore

log = logging.getLogger("caikit.stages")

#: a batch's key: plain, hashable, picklable data chosen by the runner
Key = Hashable


# --- roles and workers ------------------------------------------------------------------


_INSTANCES: dict[tuple[str, ...], Any] = {}
_INSTANCES_LOCK = threading.Lock()


def plugin_instance(role: RoleRef, **kwargs: Any) -> Any:
    """Build ``role``'s plugin once per process for the same config and ``kwargs``.

    ``kwargs`` must be plain values (a model path, ...); the cache is keyed by them.
    Use :meth:`RoleRef.spec` and ``spec.build`` directly for instances that take
    other plugins' instances as arguments (critics, labellers).
    """
    key = (
        json.dumps([role.role, role.plugin, role.options()], sort_keys=True, default=str),
        json.dumps(kwargs, sort_keys=True, default=str),
    )
    with _INSTANCES_LOCK:  # threads of one executor load a model once, not once each
        if key not in _INSTANCES:
            spec = role.spec()
            log.info("loading %s '%s' with %s", role.role, spec.name, kwargs)
            _INSTANCES[key] = spec.build(role.config, **kwargs)
        return _INSTANCES[key]


def release_instances() -> None:
    """Forget every cached plugin instance of this process (their models are freed
    when nothing else holds them)."""
    with _INSTANCES_LOCK:
        _INSTANCES.clear()


class Worker(Protocol):
    """Maps one batch of a stage's items to its output records. A worker that drives a
    generator holds it as ``generator_warnings``, a :class:`WarningRecorder`, so what
    the generator warns reaches the stage's manifest and summary."""

    def __call__(self, batch: list[Any]) -> list[Any]: ...


class BatchFailed(Exception):
    """A batch raised: carries the batch's key so the runner can name its records.

    Plain data only (key and message), so it pickles back from another process; the
    original exception is its ``__cause__`` where it was raised.
    """

    def __init__(self, key: Key, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return self.message


@attrs.frozen
class Skipped:
    """An item a batch left out under ``on_error = "skip"``: its id and the reason.
    Returned among the batch's records; the runner lists it in ``skipped.parquet``."""

    id: str
    reason: str


#: at most this many distinct generator warnings are kept per batch, shard and stage;
#: the rest are counted under :data:`OTHER_WARNINGS`
MAX_WARNINGS = 20
#: at most this many characters of each warning are kept
MAX_WARNING_CHARS = 300
#: the message the warnings beyond :data:`MAX_WARNINGS` are counted under
OTHER_WARNINGS = "(other warnings)"


def tally(counts: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """``(message, count)`` pairs merged by message: the most frequent first (then by
    message), each message cut to :data:`MAX_WARNING_CHARS`, and those beyond the first
    :data:`MAX_WARNINGS` counted as :data:`OTHER_WARNINGS` (last), so the result is
    bounded whatever the plugins say."""
    merged: Counter[str] = Counter()
    for message, count in counts:
        text = (
            message
            if len(message) <= MAX_WARNING_CHARS
            else message[: MAX_WARNING_CHARS - 3] + "..."
        )
        merged[text] += count
    other = merged.pop(OTHER_WARNINGS, 0)
    ranked = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))
    other += sum(n for _, n in ranked[MAX_WARNINGS:])
    kept = tuple(ranked[:MAX_WARNINGS])
    return (*kept, (OTHER_WARNINGS, other)) if other else kept


def warnings_line(rows: int, warnings: tuple[tuple[str, int], ...], shown: int = 3) -> str:
    """``16 record(s), 3 generator warning(s): 'prompt of ...' (x3)``: the total and the
    ``shown`` most frequent messages (see :func:`tally`)."""
    total = sum(n for _, n in warnings)
    listed = "; ".join(f"{m!r} (x{n})" for m, n in warnings[:shown])
    more = f"; and {len(warnings) - shown} other message(s)" if len(warnings) > shown else ""
    return f"{rows} record(s), {total} generator warning(s): {listed}{more}"


@attrs.frozen
class GeneratorWarnings:
    """What the generator warned while a batch ran (``Generation.warnings``), as
    :func:`tally` pairs. Returned among the batch's records, so it travels with them
    from any executor and is kept once per batch when a batch runs twice."""

    counts: tuple[tuple[str, int], ...]


class WarningRecorder:
    """A generator as a worker and the plugins it builds see it: every call of
    ``generate`` is passed on and the ``warnings`` of its generations are counted, per
    thread (an executor may run batches of one built worker on several threads); any
    other attribute is the generator's own."""

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self._local = threading.local()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """The generator's ``generate``, its warnings counted."""
        generations: list[Generation] = self.generator.generate(requests)
        counts = self._counts()
        for generation in generations:
            counts.update(getattr(generation, "warnings", ()) or ())
        return generations

    def take(self) -> Counter[str]:
        """The warnings this thread counted since its last call, and start again."""
        counts = self._counts()
        self._local.counts = Counter()
        return counts

    def _counts(self) -> Counter[str]:
        counts: Counter[str] | None = getattr(self._local, "counts", None)
        if counts is None:
            counts = self._local.counts = Counter()
        return counts

    def __getattr__(self, name: str) -> Any:
        if name in ("generator", "_local"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.generator, name)


class BatchRunner:
    """A built worker as an executor calls it: ``runner(key, batch) -> outputs``.

    An exception other than a :class:`CaikitError` (which already says what went
    wrong) is raised as :class:`BatchFailed` with the batch's key, its message naming
    the plugin the exception came from (``roles``: the worker's plugins). Under
    ``on_error = "skip"`` the batch is instead run again one item at a time, and each
    item that still raises is returned as a :class:`Skipped` among the records.
    A worker with a ``generator_warnings`` :class:`WarningRecorder` has what its
    generator warned returned as one :class:`GeneratorWarnings` among the records.
    """

    def __init__(
        self, worker: Worker, roles: Sequence[RoleRef] = (), on_error: str = "stop"
    ) -> None:
        self.worker = worker
        self.roles = tuple(roles)
        self.on_error = on_error
        self.recorder: WarningRecorder | None = getattr(worker, "generator_warnings", None)

    def __call__(self, key: Key, batch: list[Any]) -> list[Any]:
        self._warnings()  # none left from a call that raised
        try:
            return self.worker(batch) + self._warnings()
        except CaikitError:
            raise
        except Exception as exc:
            if self.on_error != "skip":
                raise BatchFailed(key, self.describe(exc)) from exc
            log.info("a batch of %d items raised; running them one at a time", len(batch))
        self._warnings()  # the items run again, and warn again
        out: list[Any] = []
        for item in batch:
            try:
                out.extend(self.worker([item]))
            except CaikitError:
                raise
            except Exception as exc:
                out.append(Skipped(str(getattr(item, "id", item)), self.describe(exc)))
        return out + self._warnings()

    def _warnings(self) -> list[GeneratorWarnings]:
        """What the generator warned since the last call, as a one-item list (or none)."""
        counts = self.recorder.take() if self.recorder is not None else None
        return [GeneratorWarnings(tally(counts.items()))] if counts else []

    def describe(self, exc: BaseException) -> str:
        """``exc`` as ``generator 'echo' (plugin 'echo' from distribution 'caikit-echo'
        0.0.1) raised ValueError: ...``: the worker's plugin whose package holds the
        innermost frame of the traceback that lies in any of theirs (the exception's
        type and message alone when none does)."""
        what = f"{type(exc).__name__}: {exc}"
        by_package: dict[str, list[tuple[str, str]]] = {}
        for ref in self.roles:
            try:
                spec = ref.spec()
            except CaikitError:
                continue
            factory = getattr(spec.factory, "func", spec.factory)  # a functools.partial's
            package = str(getattr(factory, "__module__", None) or "").partition(".")[0]
            if not package:
                continue
            by_package.setdefault(package, []).append((f"{ref.role} '{spec.name}'", spec.origin()))
        for frame, _ in reversed(list(traceback.walk_tb(exc.__traceback__))):
            package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
            if package in by_package:
                names = sorted({name for name, _ in by_package[package]})
                return f"{' or '.join(names)} ({by_package[package][0][1]}) raised {what}"
        return what


@attrs.frozen
class WorkerSpec:
    """A worker class and the plain arguments to build it with, in any process."""

    worker: type
    kwargs: Mapping[str, Any] = attrs.field(factory=dict)
    #: ``"stop"`` (a raising batch fails the stage) or ``"skip"`` (see :class:`BatchRunner`)
    on_error: str = "stop"

    def build(self) -> BatchRunner:
        """Build the worker here (plugins come from this process's cache)."""
        roles = [v for v in self.kwargs.values() if isinstance(v, RoleRef)]
        return BatchRunner(self.worker(**self.kwargs), roles, self.on_error)


def check_count(stage: str, role: RoleRef, got: Sequence[Any], want: int) -> None:
    """A plugin returned one result per input, or a :class:`StageError` naming it."""
    if len(got) != want:
        spec = role.spec()
        raise StageError(
            f"stage '{stage}': {role.role} '{spec.name}' ({spec.origin()}) returned "
            f"{len(got)} results for {want} inputs"
        )


def sampling(cfg: Any) -> SamplingParams:
    """A run file's sampling table as :class:`SamplingParams`."""
    return SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
    )


class SamplingWorker:
    """What the sampling stages' workers share: ``samples`` completions per prompt from
    the run's generator, each request seeded by the run seed, the prompt id and the
    stage's name, so a prompt's text never depends on the batch it lands in."""

    stage = ""

    def __init__(
        self,
        *,
        generator: RoleRef,
        model: str,
        sampling: SamplingParams,
        seed: int,
        samples: int = 1,
    ) -> None:
        self.generator_role = generator
        self.generator_warnings = WarningRecorder(plugin_instance(generator, model=model))
        self.generator = self.generator_warnings
        self.model = model
        self.sampling = sampling
        self.seed = seed
        self.samples = samples

    @classmethod
    def spec(cls, ctx: Context, model: str, cfg: Any, samples: int = 1) -> WorkerSpec:
        """This worker on the run's generator, ``model`` and sampling table ``cfg``."""
        kwargs = {
            "generator": ctx.role("generator"),
            "model": model,
            "sampling": sampling(cfg),
            "seed": ctx.seed,
            "samples": samples,
        }
        return WorkerSpec(cls, kwargs)

    def sample(self, batch: list[Prompt]) -> list[Generation]:
        seeds = [derive_seed(self.seed, p.id, self.stage) for p in batch]
        requests = [
            GenerationRequest(p.id, p.messages, self.sampling, self.samples, seed)
            for p, seed in zip(batch, seeds, strict=True)
        ]
        generations: list[Generation] = self.generator.generate(requests)
        check_count(self.stage, self.generator_role, generations, len(requests))
        return generations


class FeedbackWorker:
    """What the critic's and the labeller's workers share: the stage's feedback plugin
    (``role``) built around the run's generator on ``model`` (from the process cache)
    and the constitution."""

    stage = ""
    role = ""

    def __init__(
        self,
        *,
        plugin: RoleRef,
        generator: RoleRef,
        model: str,
        constitution: Constitution,
        seed: int,
    ) -> None:
        self.plugin_role = plugin
        self.generator_warnings = WarningRecorder(plugin_instance(generator, model=model))
        self.plugin = plugin.spec().build(
            plugin.config, generator=self.generator_warnings, constitution=constitution
        )
        self.seed = seed

    @classmethod
    def spec(cls, ctx: Context, model: str) -> WorkerSpec:
        """This worker with the run's ``role`` plugin, generator on ``model``, constitution."""
        kwargs = {
            "plugin": ctx.role(cls.role),
            "generator": ctx.role("generator"),
            "model": model,
            "constitution": ctx.constitution,
            "seed": ctx.seed,
        }
        return WorkerSpec(cls, kwargs)


# --- what a stage sees of the run -------------------------------------------------------


@attrs.define
class StageResult:
    """One stage's outcome, as the CLI shows it."""

    name: str
    status: str  # "ran" | "skipped" | "resumed"
    rows: int
    seconds: float
    fingerprint: str
    path: Path
    artifact: Path | None = None
    metrics: dict[str, float] = attrs.field(factory=dict)
    history: list[dict[str, float]] = attrs.field(factory=list)
    #: records a map stage left out under ``on_error = "skip"``
    skipped: int = 0
    #: what the generator warned while a map stage ran: (message, count), see :func:`tally`
    warnings: tuple[tuple[str, int], ...] = ()


class Context:
    """The run as a stage sees it: settings, models, the constitution, and what
    earlier stages produced (their fingerprints, rows and artifacts)."""

    def __init__(
        self, run: ResolvedRun, store: RunStore, stages: Mapping[str, type[Stage]]
    ) -> None:
        self.run = run
        self.store = store
        self.stages = stages
        self.fingerprints: dict[str, str] = {}
        self.artifacts: dict[str, Path] = {}
        #: the running fit stage's checkpoint folder (set by the runner around ``fit``)
        self.checkpoint_dir: Path | None = None
        self._constitution: Constitution | None = None

    @property
    def config(self) -> RunConfig:
        return self.run.config

    @property
    def seed(self) -> int:
        return self.run.config.seed

    @property
    def constitution(self) -> Constitution:
        if self._constitution is None:
            from caikit_core.config import resolve_path
            from caikit_core.constitutions import load_constitution

            cfg = self.config.constitution
            source = None if cfg.path == "default" else resolve_path(self.run.base_dir, cfg.path)
            self._constitution = load_constitution(source, format=cfg.format)
        return self._constitution

    def role(self, name: str) -> RoleRef:
        return self.run.roles[name].ref

    def fit_options(self, plugin: Any) -> dict[str, Any]:
        """The keywords a fit stage adds to its plugin's fit call: ``checkpoint_dir``
        (the stage's checkpoint folder, created) for a plugin that declares the
        ``resumable`` capability, nothing for any other (so a third-party plugin's
        fit signature need not change)."""
        from caikit_core.interfaces import RESUMABLE

        if self.checkpoint_dir is None or RESUMABLE not in getattr(plugin, "capabilities", ()):
            return {}
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return {"checkpoint_dir": self.checkpoint_dir}

    def path(self, value: str) -> Path:
        """A path named in the run file, relative to the run file's folder."""
        from caikit_core.config import resolve_path

        return resolve_path(self.run.base_dir, value)

    def model(self, which: str) -> str:
        """The configured model for ``policy``, ``feedback`` or ``preference``."""
        models = self.config.models
        value = {
            "policy": models.policy,
            "feedback": models.feedback or models.policy,
            "preference": models.preference or models.feedback or models.policy,
        }[which]
        return resolve_model(self.run.base_dir, value)

    def rl_policy(self) -> tuple[str, Any]:
        """The RL policy/reference and its fingerprint: the SFT checkpoint when this
        run trains one, else the configured policy."""
        from caikit_core.store import model_fingerprint

        if "sft" in self.artifacts:
            return str(self.artifacts["sft"]), {
                "stage": "sft",
                "fingerprint": self.fingerprints["sft"],
            }
        policy = self.model("policy")
        return policy, model_fingerprint(policy)

    def rows(self, name: str) -> list[Any]:
        """Every record an earlier (complete) map stage wrote, in shard order."""
        fp = self.fingerprints[name]
        manifest = self.store.read_manifest(name, fp)
        assert manifest is not None and manifest.complete, name
        cls = self.stages[name].record_type
        assert cls is not None
        rows: list[Any] = []
        for shard in sorted(manifest.shards, key=lambda s: s.index):
            rows.extend(from_arrow(self.store.read_shard(name, fp, shard.file), cls))
        return rows


def resolve_model(base_dir: Path, value: str) -> str:
    """A model named in a run file: an explicit or existing relative path becomes
    absolute; anything else (a cache alias or hub id) is passed on unchanged."""
    from caikit_core.config import resolve_path

    if value.startswith(("/", "./", "../", "~")):
        return str(resolve_path(base_dir, value))
    candidate = base_dir / value
    if candidate.exists():
        return str(candidate.resolve())
    from caikit_core.models import resolve_alias

    return resolve_alias(value)


# --- stages -----------------------------------------------------------------------------


class Stage:
    """One node of the stage graph. Subclasses set the class attributes and
    override the methods their kind needs; the runner does the rest.

    :cvar name: the stage's folder name under ``stages/`` and its key in ``run.json``.
    :cvar phase: ``"data"``, ``"sl"`` or ``"rl"``.
    :cvar kind: ``"source"`` (reads a file), ``"map"`` (a worker over batches of an
        earlier stage's records) or ``"fit"`` (trains and saves a checkpoint folder).
    :cvar inputs: the stages whose output it reads.
    :cvar record_type: the attrs record class of its rows (``None`` for fit stages).
    :cvar roles: the roles it uses; their plugins and settings enter its fingerprint.
    :cvar join: for map stages, the item field and record field that tie a record to
        the item it came from.
    """

    name: ClassVar[str]
    phase: ClassVar[str]
    kind: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    record_type: ClassVar[type | None] = None
    roles: ClassVar[tuple[str, ...]] = ()
    #: map stages: (item field, record field) that are equal for a record and the item
    #: it came from; the runner checks every batch's records against its items with it
    join: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def included(cls, config: RunConfig) -> bool:
        """Whether a run with ``config`` runs this stage (default: its phase is on)."""
        return cls.phase == "data" or cls.phase in config.phases

    def precheck(self, ctx: Context, planned: Sequence[str]) -> None:
        """Refuse, before any stage runs, what would make this stage fail later
        (``planned``: the names of the stages this run executes); default: nothing."""

    def input_fingerprint(self, ctx: Context) -> str:
        """What this stage's input is; default: its one input stage's fingerprint."""
        (single,) = self.inputs
        return ctx.fingerprints[single]

    def settings(self, ctx: Context) -> dict[str, Any]:
        """The settings (besides its roles' configs and the seed) that enter the
        fingerprint: change one and this stage and everything after it run again."""
        return {}

    def models(self, ctx: Context) -> dict[str, str]:
        """The models it uses, by role, for the manifest."""
        return {}

    def other_plugins(self, ctx: Context) -> dict[str, Any]:
        """Plugins it uses besides its roles' (``PluginSpec`` by a key of its choice),
        whose provenance the manifest records beside the roles'; default: none."""
        return {}

    # map and source stages
    def items(self, ctx: Context) -> Sequence[Any]:
        """What it maps over (map) or the records it writes (source); default: the
        rows of its one input stage."""
        (single,) = self.inputs
        return ctx.rows(single)

    def worker(self, ctx: Context) -> WorkerSpec:
        """The worker that maps one batch of items to records (map stages)."""
        raise NotImplementedError(f"stage '{self.name}' has no worker")

    def item_id(self, item: Any) -> str:
        """How the runner names an item when its batch fails."""
        value = item.id
        assert isinstance(value, str)
        return value

    # fit stages
    def fit(self, ctx: Context, out: Path) -> FitReport:
        """Train and save to ``out`` (fit stages)."""
        raise NotImplementedError(f"stage '{self.name}' has no fit")

    # what the CLI prints after the run
    def summary(self, ctx: Context, result: StageResult) -> list[str]:
        """Lines the CLI prints about this stage after the run's table."""
        return []

    def examples(
        self, ctx: Context, result: StageResult, count: int
    ) -> list[tuple[str, list[str]]]:
        """Up to ``count`` output examples as ``(title, rich-markup lines)``
        (``caikit run --show-traces``)."""
        return []
