"""The core's :class:`~caikit_core.evaluation.EvalContext`: a run's roles, built on
request for an instrument, and the checks that run before any instrument does.

:class:`RunEvalContext` is made from a resolved run file and (optionally) its run
directory. ``checkpoints`` are ``base`` (``models.policy``), ``sl`` (the ``sft``
stage's checkpoint) and ``rl`` (the ``policy`` stage's) where the run directory has
them, and every ``[eval] checkpoints`` entry. :func:`check_requirements` compares
each instrument's ``requires`` with what the run has and raises one
:class:`~caikit_core.errors.CaikitError` naming every instrument and what it lacks;
:func:`run_instrument` evaluates one and writes ``<out>/result.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from caikit_core.errors import CaikitError, PluginError
from caikit_core.evaluation import (
    REQUIREMENTS,
    EvalContext,
    EvalResult,
    Instrument,
    write_result,
)

if TYPE_CHECKING:
    from caikit_core.config import ResolvedRole, ResolvedRun
    from caikit_core.constitution import Constitution
    from caikit_core.store import RunStore

__all__ = [
    "RunEvalContext",
    "build_instrument",
    "check_requirements",
    "run_artifacts",
    "run_instrument",
]

#: fit stages whose checkpoint folders an evaluation uses, and the name it gets
CHECKPOINT_STAGES = {"sft": "sl", "policy": "rl"}


def run_artifacts(store: RunStore) -> dict[str, Path]:
    """The complete fit stages' artifact folders of a run directory, by stage name
    (from the fingerprints ``run.json`` records)."""
    if not store.exists():
        return {}
    stages = store.read_run().get("stages", {})
    out: dict[str, Path] = {}
    for stage, fp in stages.items() if isinstance(stages, Mapping) else ():
        manifest = store.read_manifest(stage, str(fp))
        folder = store.artifact_dir(stage, str(fp))
        if manifest is not None and manifest.complete and folder.is_dir():
            out[stage] = folder
    return out


class RunEvalContext:
    """The run as an instrument sees it (see the module docstring).

    :param run: the resolved run file.
    :param run_dir: the run directory, when there is one.
    :param artifacts: complete fit stages' folders by stage name (``sft``, ``policy``,
        ``preference_model``), e.g. from :func:`run_artifacts`.
    :param preference_model: a trained preference model folder that replaces the run's.
    :param planned: the stages that run before the instruments (the ``eval`` stage's
        check before a run starts): a ``preference_model`` stage among them counts as
        a trained preference model.
    """

    def __init__(
        self,
        run: ResolvedRun,
        *,
        run_dir: Path | None = None,
        artifacts: Mapping[str, Path] | None = None,
        preference_model: Path | None = None,
        planned: Sequence[str] = (),
    ) -> None:
        from caikit_core.stages.base import resolve_model

        self.run = run
        self.run_dir = run_dir
        #: stages that will run before the instruments: what they produce counts as had
        self.planned = frozenset(planned)
        self.seed = run.config.seed
        self.artifacts = dict(artifacts or {})
        eval_cfg = run.config.eval
        if preference_model is None and eval_cfg is not None and eval_cfg.preference_model:
            preference_model = Path(resolve_model(run.base_dir, eval_cfg.preference_model))
        if preference_model is None and "preference_model" in self.artifacts:
            preference_model = self.artifacts["preference_model"]
        self.preference_model_path = preference_model
        checkpoints = {"base": resolve_model(run.base_dir, run.config.models.policy)}
        for stage, name in CHECKPOINT_STAGES.items():
            if stage in self.artifacts:
                checkpoints[name] = str(self.artifacts[stage])
        for name, model in (eval_cfg.checkpoints if eval_cfg is not None else {}).items():
            checkpoints[name] = resolve_model(run.base_dir, model)
        self.checkpoints: Mapping[str, str] = checkpoints
        self._constitution: Constitution | None = None

    # what the run has -----------------------------------------------------------------
    def missing(self, requirement: str) -> str | None:
        """What the run lacks for ``requirement`` (in words), or ``None`` when it has it."""
        roles = self.run.roles
        if requirement == "generator":
            return None if "generator" in roles else "a [generator] table"
        if requirement == "labeller":
            lacks = [f"a [{r}] table" for r in ("labeller", "generator") if r not in roles]
            return " and ".join(lacks) or None
        if requirement == "preference_model":
            if "preference_model" not in roles:
                return "a [preference_model] table naming the preference model plugin"
            if self.preference_model_path is None and "preference_model" in self.planned:
                return None
            if self.preference_model_path is None:
                return (
                    "a trained preference model (a run directory whose preference_model "
                    "stage is complete, --preference-model PATH, or eval.preference_model)"
                )
            if not self.preference_model_path.is_dir():
                return f"the preference model folder {self.preference_model_path} (not found)"
            return None
        if requirement == "checkpoints":
            return None if self.checkpoints else "a checkpoint to evaluate"
        if requirement == "run":
            if self.run_dir is not None and self.planned:
                return None
            if self.run_dir is None or not self.run_dir.is_dir():
                return "a run directory (--run RUN_DIR, or a run file whose run has started)"
            return None
        known = ", ".join(sorted(REQUIREMENTS))
        return f"'{requirement}', which is not a requirement (known: {known})"

    # the roles, built on request ------------------------------------------------------
    def _model(self, model: str) -> str:
        from caikit_core.stages.base import resolve_model

        if model in self.checkpoints:
            return self.checkpoints[model]
        return resolve_model(self.run.base_dir, model)

    def _need(self, requirement: str) -> None:
        reason = self.missing(requirement)
        if reason is not None:
            raise CaikitError(f"evaluation: the run has no {requirement}: it needs {reason}")

    def generator(self, model: str) -> Any:
        """The run's generator on ``model`` (a checkpoint name of ``checkpoints``, a
        folder or a hub id), built once per process for the same model."""
        from caikit_core.stages.base import plugin_instance

        self._need("generator")
        return plugin_instance(self.run.roles["generator"].ref, model=self._model(model))

    @property
    def constitution(self) -> Constitution:
        if self._constitution is None:
            from caikit_core.config import resolve_path
            from caikit_core.constitutions import load_constitution

            cfg = self.run.config.constitution
            source = None if cfg.path == "default" else resolve_path(self.run.base_dir, cfg.path)
            self._constitution = load_constitution(source, format=cfg.format)
        return self._constitution

    def feedback_model(self) -> str:
        models = self.run.config.models
        return self._model(models.feedback or models.policy)

    def labeller(self) -> Any:
        """The run's labeller with its settings, driving the generator on the feedback
        model (``models.feedback``, else the policy), as the ``labels`` stage builds it."""
        return self.labeller_with()

    def labeller_with(self, **settings: Any) -> Any:
        """The run's labeller with some settings changed (e.g. ``debias=False``).

        :raises CaikitError: the labeller's config has no such setting, or a bad value.
        """
        from caikit_core.stages.base import plugin_instance

        self._need("labeller")
        role = self.run.roles["labeller"]
        config = role.config
        if settings:
            if config is None or not attrs.has(type(config)):
                raise CaikitError(f"labeller '{role.spec.name}' takes no settings to change")
            names = {f.name for f in attrs.fields(type(config))}
            unknown = sorted(set(settings) - names)
            if unknown:
                raise CaikitError(
                    f"labeller '{role.spec.name}' has no setting {', '.join(unknown)} "
                    f"(its settings: {', '.join(sorted(names))})"
                )
            try:
                config = attrs.evolve(config, **settings)
            except (TypeError, ValueError) as exc:
                raise CaikitError(f"labeller '{role.spec.name}': {exc}") from None
        generator = plugin_instance(self.run.roles["generator"].ref, model=self.feedback_model())
        return role.spec.build(config, generator=generator, constitution=self.constitution)

    def preference_model(self) -> Any:
        """The run's preference model plugin, loaded from the trained folder."""
        self._need("preference_model")
        assert self.preference_model_path is not None
        role = self.run.roles["preference_model"]
        models = self.run.config.models
        trunk = self._model(models.preference or models.feedback or models.policy)
        pm = role.spec.build(role.config, model=trunk)
        pm.load(self.preference_model_path)
        return pm


def build_instrument(resolved: ResolvedRole) -> Instrument:
    """The instrument a resolved ``[eval]`` entry names, checked against the protocol."""
    spec = resolved.spec
    instrument = spec.build(resolved.config)
    requires = getattr(instrument, "requires", None)
    if not isinstance(instrument, Instrument) or not isinstance(requires, frozenset):
        raise PluginError(
            f"instrument '{spec.name}' ({spec.origin()}): its factory returned "
            f"{type(instrument).__name__}, which lacks requires (a frozenset) or evaluate(ctx)"
        )
    return instrument


def check_requirements(instruments: Mapping[str, Instrument], ctx: RunEvalContext) -> None:
    """Every instrument's ``requires`` is met by the run, or one error naming each
    instrument and what it needs (before any model loads)."""
    problems = [
        f"instrument '{name}' needs {req.replace('_', ' ')}, which this run lacks: {reason}"
        for name, instrument in instruments.items()
        for req in sorted(instrument.requires)
        if (reason := ctx.missing(req)) is not None
    ]
    if problems:
        raise CaikitError("; ".join(problems))


def run_instrument(
    name: str, instrument: Instrument, resolved: ResolvedRole, ctx: Any, out: Path
) -> EvalResult:
    """Evaluate one instrument and write its result into ``out`` (``result.json``,
    ``rows.parquet``); the result's settings default to the resolved ones."""
    result = instrument.evaluate(ctx)
    if not isinstance(result, EvalResult):
        raise PluginError(
            f"instrument '{name}' ({resolved.spec.origin()}) returned "
            f"{type(result).__name__}, not an EvalResult"
        )
    if not result.settings:
        result = attrs.evolve(result, settings=resolved.options())
    write_result(result, out)
    return result


if TYPE_CHECKING:

    def _conforms(ctx: RunEvalContext) -> EvalContext:
        """mypy checks that the core's context satisfies the protocol."""
        return ctx
