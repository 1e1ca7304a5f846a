"""Run files: TOML (tomllib) or YAML (:func:`caikit_core.safe_yaml.load`: the safe
loader, with alias-expanded documents bounded), validated strictly.

A run file names one plugin per role, in a table whose ``plugin`` key is the
registered name and whose other keys are that plugin's own settings::

    [labeller]
    plugin = "direct"
    debias = true

Loading happens in two steps, both before any model is loaded:

1. :func:`load_config` reads the file and structures the core sections;
2. :func:`resolve` looks each role's plugin up in the registry and structures
   its settings into the plugin's own attrs config class.

Every problem is reported as ``key.path: expected ..., found ...``; all of a
file's problems are reported together in one :class:`ConfigError`.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml
from cattrs.gen import make_dict_structure_fn

from caikit_core import safe_yaml, validators
from caikit_core.converter import InvalidValue, converter, describe_error, show
from caikit_core.errors import ConfigError
from caikit_core.interfaces import (
    GENERATOR_ROLLOUTS,
    ROLLOUTS,
    SUPPORTS_PPO,
    SUPPORTS_PREFERENCE_LOSS,
    SUPPORTS_SFT,
)
from caikit_core.plugins import INSTRUMENT, ROLES, PluginSpec, Registry, unknown_plugin_message

Phase = Literal["sl", "rl"]


@attrs.frozen
class RoleConfig:
    """A role's table: the plugin's registered name and its raw settings."""

    plugin: str
    options: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ModelsConfig:
    """Models by role. Each is a local checkpoint folder, a cache alias or a hub id."""

    policy: str
    feedback: str | None = None
    preference: str | None = None


@attrs.frozen
class DataConfig:
    """Where the red-team prompts come from."""

    prompts: str
    format: Literal["auto", "jsonl", "parquet", "text", "hh-rlhf"] = "auto"
    field: str = "prompt"
    limit: int | None = attrs.field(
        default=None, validator=validators.optional(validators.positive_int)
    )


@attrs.frozen
class ConstitutionConfig:
    """The constitution: ``"default"`` (the project's own) or a file."""

    path: str = "default"
    format: Literal["auto", "caikit", "anthropic", "llm-swarm"] = "auto"


@attrs.frozen
class SamplingConfig:
    """Sampling settings for a generation stage."""

    max_new_tokens: int = attrs.field(default=256, validator=validators.positive_int)
    temperature: float = attrs.field(default=0.7, validator=validators.non_negative_number)
    top_p: float = attrs.field(default=1.0, validator=validators.number_in(0, 1, low_open=True))


@attrs.frozen
class SLConfig:
    """Phase 1 (SL-CAI) settings."""

    sampling: SamplingConfig = SamplingConfig()
    sft: bool = True
    helpfulness_prompts: str | None = None
    helpfulness_samples: int = attrs.field(default=2, validator=validators.positive_int)


@attrs.frozen
class RLConfig:
    """Phase 2 (RL-CAI) settings.

    ``rollouts``: where the policy optimiser samples its RL rollouts from:
    ``"optimiser"`` (its own in-process sampling, e.g. HF ``generate`` in the
    ``torch`` backend) or ``"generator"`` (the run's ``[generator]`` plugin, e.g.
    ``vllm``, loaded with the policy and given its new weights after every update).
    """

    sampling: SamplingConfig = SamplingConfig(temperature=1.0)
    train_policy: bool = True
    rollouts: Literal["optimiser", "generator"] = "optimiser"


@attrs.frozen
class StageConfig:
    """Settings of one map stage, ``[stages.NAME]``.

    ``on_error``: ``"stop"`` (a batch whose plugin raises fails the stage, naming the
    plugin and the records; complete shards are kept for ``--resume``) or ``"skip"``
    (the batch is run again one record at a time and each record that still fails is
    left out, its id and reason listed in the stage's ``skipped.parquet``).
    """

    on_error: Literal["stop", "skip"] = "stop"


#: the keys of ``[eval]`` itself; every other key is an instrument's settings table
EVAL_KEYS = ("instruments", "checkpoints", "preference_model")


@attrs.frozen
class EvalConfig:
    """The ``[eval]`` table: the instruments the ``eval`` stage runs, the checkpoints
    they compare, and each instrument's settings as an ``[eval.NAME]`` table (kept in
    ``settings``, by instrument name; see ``docs/evaluation.md``)."""

    instruments: tuple[str, ...] = ()
    #: more checkpoints to evaluate, by name (``base``, ``sl`` and ``rl`` come from the run)
    checkpoints: Mapping[str, str] = attrs.field(factory=dict)
    #: a trained preference model folder to use instead of the run's own
    preference_model: str | None = None
    settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)


@attrs.frozen
class RunConfig:
    """A whole run file (see ``docs/config.md``)."""

    output_dir: str = attrs.field(validator=validators.Check(
        'a folder (an empty path would put the run into the run file\'s own folder; '
        'write "." to mean that)', lambda v: isinstance(v, str) and bool(v.strip())
    ))  # fmt: skip
    models: ModelsConfig
    data: DataConfig
    phases: tuple[Phase, ...] = ("sl",)
    seed: int = 0
    batch_size: int = attrs.field(default=8, validator=validators.positive_int)
    shard_size: int = attrs.field(default=64, validator=validators.positive_int)
    constitution: ConstitutionConfig = ConstitutionConfig()
    sl: SLConfig = SLConfig()
    rl: RLConfig = RLConfig()
    generator: RoleConfig | None = None
    critic: RoleConfig | None = None
    labeller: RoleConfig | None = None
    preference_model: RoleConfig | None = None
    policy_optimiser: RoleConfig | None = None
    executor: RoleConfig = RoleConfig("local")
    eval: EvalConfig | None = None
    #: per-stage settings by stage name (``[stages.responses] on_error = "skip"``)
    stages: Mapping[str, StageConfig] = attrs.field(factory=dict)


def _role_hook(value: Any, _type: Any) -> RoleConfig:
    if isinstance(value, str):
        return RoleConfig(plugin=value)
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a table with a 'plugin' key, found {show(value)}")
    if "plugin" not in value:
        raise ValueError("expected a 'plugin' key naming the plugin, found none")
    plugin = value["plugin"]
    if not isinstance(plugin, str):
        raise TypeError(f"'plugin' must be a string, found {show(plugin)}")
    return RoleConfig(plugin=plugin, options={k: v for k, v in value.items() if k != "plugin"})


converter.register_structure_hook(RoleConfig, _role_hook)

_eval_structure = make_dict_structure_fn(
    EvalConfig, converter, _cattrs_forbid_extra_keys=True, _cattrs_detailed_validation=True
)


def _eval_hook(value: Any, _type: Any) -> EvalConfig:
    """``[eval]``: its own keys, and one settings table per instrument."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a table, found {show(value)}")
    core = {k: v for k, v in value.items() if k in EVAL_KEYS}
    tables: dict[str, Any] = {}
    errors: list[Exception] = []
    for key, table in value.items():
        if key in EVAL_KEYS:
            continue
        if not isinstance(table, Mapping):
            errors.append(
                InvalidValue(
                    key,
                    f"expected [eval.{key}], a table of the instrument's settings, or one of "
                    f"the keys {', '.join(EVAL_KEYS)}; found {show(table)}",
                )
            )
        else:
            tables[key] = dict(table)
    try:
        config = _eval_structure({**core, "settings": tables}, EvalConfig)
    except Exception as exc:
        errors.insert(0, exc)
    if errors:
        raise ExceptionGroup("bad [eval] keys", errors)
    assert isinstance(config, EvalConfig)
    return config


def _eval_unstructure(config: EvalConfig) -> dict[str, Any]:
    """``[eval]`` as a run file writes it: the settings tables beside its own keys."""
    data: dict[str, Any] = {
        "instruments": list(config.instruments),
        "checkpoints": dict(config.checkpoints),
    }
    if config.preference_model is not None:
        data["preference_model"] = config.preference_model
    data.update({k: dict(v) for k, v in config.settings.items()})
    return data


converter.register_structure_hook(EvalConfig, _eval_hook)
converter.register_unstructure_hook(EvalConfig, _eval_unstructure)

#: which roles each phase needs (policy_optimiser in SL only when ``sl.sft``)
PHASE_ROLES: dict[str, tuple[str, ...]] = {
    "sl": ("generator", "critic", "policy_optimiser"),
    "rl": ("generator", "labeller", "preference_model", "policy_optimiser"),
}


@attrs.frozen
class ResolvedRole:
    """A role resolved against the registry: its spec and validated config."""

    role: str
    spec: PluginSpec
    config: Any

    @property
    def ref(self) -> RoleRef:
        """The role as plain, picklable data (what crosses to a stage's worker)."""
        return RoleRef(self.role, self.spec.name, self.config)

    def options(self) -> dict[str, Any]:
        return self.ref.options()


@attrs.frozen
class RoleRef:
    """A role resolved to plain data: which plugin, with which validated config.

    Picklable (the config is a frozen attrs instance), so it can cross to another
    process, where :meth:`spec` finds the plugin in that process's registry.
    """

    role: str
    plugin: str
    config: Any = None

    def spec(self) -> PluginSpec:
        """The plugin's registration, looked up in this process's registry."""
        from caikit_core.plugins import get_registry

        return get_registry().get(self.role, self.plugin)

    def options(self) -> dict[str, Any]:
        """The config as plain data."""
        if self.config is None:
            return {}
        data = converter.unstructure(self.config)
        assert isinstance(data, dict)
        return data

    def fingerprint_options(self) -> dict[str, Any]:
        """What of the config enters fingerprints: :meth:`options` less the fields
        whose metadata says ``fingerprint: False`` (``report_to``: where metrics go)."""
        data = self.options()
        if attrs.has(type(self.config)):
            for field in attrs.fields(type(self.config)):
                if field.metadata.get("fingerprint", True) is False:
                    data.pop(field.name, None)
        return data


@attrs.frozen
class ResolvedRun:
    """A run file resolved: core settings plus one plugin per role in use."""

    source: str
    base_dir: Path
    config: RunConfig
    roles: dict[str, ResolvedRole]
    #: the instruments of ``[eval]`` (listed in ``instruments`` or given a settings
    #: table), resolved like roles (``role`` is ``"instrument"``), by name
    instruments: dict[str, ResolvedRole] = attrs.field(factory=dict)

    def output_path(self) -> Path:
        return resolve_path(self.base_dir, self.config.output_dir)

    def as_dict(self) -> dict[str, Any]:
        """The config with every default filled in, as plain data."""
        data = converter.unstructure(self.config)
        assert isinstance(data, dict)
        for role in ROLES:
            data.pop(role, None)
        for role, resolved in self.roles.items():
            data[role] = {"plugin": resolved.spec.name, **resolved.options()}
        if data.get("eval") is None:
            data.pop("eval", None)
        else:
            data["eval"].update({n: r.options() for n, r in self.instruments.items()})
        return data


# --- reading --------------------------------------------------------------------------


def read_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML file into a dict; syntax errors name the file and line."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"cannot read file: {exc}"]) from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [f"invalid TOML: {exc}"]) from None
    elif suffix in (".yaml", ".yml"):
        try:
            data = safe_yaml.load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"invalid YAML: {_yaml_message(exc)}"]) from None
        if data is None:
            data = {}
    else:
        raise ConfigError(
            source, [f"unknown run file type '{suffix or path.name}' (expected .toml, .yaml, .yml)"]
        )
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a table, found {show(data)}"])
    return data


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(problem)


def parse_config(data: Mapping[str, Any], source: str) -> RunConfig:
    """Structure the core sections; collects every problem into one ConfigError."""
    try:
        config = converter.structure(dict(data), RunConfig)
    except Exception as exc:
        raise ConfigError(source, describe_error(exc)) from None
    assert isinstance(config, RunConfig)
    return config


def load_config(path: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """Read and structure a run file (plugins are not resolved yet)."""
    p = Path(path)
    data = read_file(p)
    return parse_config(data, str(p)), data


def resolve(config: RunConfig, registry: Registry, *, source: str, base_dir: Path) -> ResolvedRun:
    """Resolve each role's plugin and validate its settings against its config class."""
    problems: list[str] = []
    if not config.phases:
        problems.append("phases: expected at least one of 'sl', 'rl', found none")
    if len(set(config.phases)) != len(config.phases):
        problems.append(f"phases: each phase may appear once, found {list(config.phases)}")
    needed: set[str] = {"executor"}
    for phase in config.phases:
        for role in PHASE_ROLES[phase]:
            if phase == "sl" and role == "policy_optimiser" and not config.sl.sft:
                continue
            needed.add(role)
    roles: dict[str, ResolvedRole] = {}
    for role in ROLES:
        role_cfg: RoleConfig | None = getattr(config, role)
        if role_cfg is None:
            if role in needed:
                phases = [p for p in config.phases if role in PHASE_ROLES[p]]
                names = ", ".join(registry.names(role)) or "none installed"
                problems.append(
                    f"{role}: required by phase {', '.join(repr(p) for p in phases)}, "
                    f"found no [{role}] table (available plugins: {names})"
                )
            continue
        resolved = _resolve_role(role, role_cfg, registry, problems)
        if resolved is not None:
            roles[role] = resolved
    problems.extend(_capability_problems(config, roles))
    instruments = _resolve_instruments(config.eval, registry, problems)
    if problems:
        raise ConfigError(source, problems)
    return ResolvedRun(
        source=source, base_dir=base_dir, config=config, roles=roles, instruments=instruments
    )


def _resolve_instruments(
    cfg: EvalConfig | None, registry: Registry, problems: list[str]
) -> dict[str, ResolvedRole]:
    """The instruments ``[eval]`` lists or gives settings to; problems are appended."""
    if cfg is None:
        return {}
    out: dict[str, ResolvedRole] = {}
    if len(set(cfg.instruments)) != len(cfg.instruments):
        problems.append(
            f"eval.instruments: each instrument may appear once, found {list(cfg.instruments)}"
        )
    names = list(dict.fromkeys([*cfg.instruments, *cfg.settings]))
    for name in names:
        where = "eval.instruments" if name in cfg.instruments else f"eval.{name}"
        resolved = resolve_instrument(
            name, cfg.settings.get(name, {}), registry, problems, where=where
        )
        if resolved is not None:
            out[name] = resolved
    return out


def resolve_instrument(
    name: str,
    settings: Mapping[str, Any],
    registry: Registry,
    problems: list[str],
    *,
    where: str = "eval.instruments",
) -> ResolvedRole | None:
    """Look an instrument up and structure its settings (``[eval.NAME]``) into its
    config class; problems (prefixed ``where`` or ``eval.NAME``) are appended."""
    available = registry.names(INSTRUMENT)
    if name not in available:
        problems.append(f"{where}: " + unknown_plugin_message(INSTRUMENT, name, available))
        return None
    spec = registry.get(INSTRUMENT, name)
    if spec.config_cls is None:
        if settings:
            keys = ", ".join(sorted(settings))
            problems.append(f"eval.{name}: instrument '{name}' takes no settings, found {keys}")
            return None
        return ResolvedRole(role=INSTRUMENT, spec=spec, config=None)
    try:
        value: Any = converter.structure(dict(settings), spec.config_cls)
    except Exception as exc:
        problems.extend(describe_error(exc, prefix=f"eval.{name}"))
        return None
    return ResolvedRole(role=INSTRUMENT, spec=spec, config=value)


def _capability_problems(config: RunConfig, roles: Mapping[str, ResolvedRole]) -> list[str]:
    """Roles whose plugin lacks a capability the run needs (checked before anything runs)."""
    problems: list[str] = []
    optimiser = roles.get("policy_optimiser")
    if optimiser is None:
        return problems
    caps = optimiser.spec.capabilities
    listed = ", ".join(sorted(caps)) or "none"
    if "sl" in config.phases and config.sl.sft and SUPPORTS_SFT not in caps:
        problems.append(
            f"policy_optimiser.plugin: '{optimiser.spec.name}' cannot fine-tune (no "
            f"'{SUPPORTS_SFT}' capability; it has: {listed}), which sl.sft = true needs"
        )
    rl_caps = {SUPPORTS_PPO, SUPPORTS_PREFERENCE_LOSS}
    if "rl" in config.phases and config.rl.train_policy and not caps & rl_caps:
        problems.append(
            f"policy_optimiser.plugin: '{optimiser.spec.name}' cannot optimise a policy "
            f"(needs '{SUPPORTS_PPO}' or '{SUPPORTS_PREFERENCE_LOSS}'; it has: {listed}), "
            "which rl.train_policy = true needs"
        )
    if "rl" in config.phases and config.rl.train_policy and config.rl.rollouts == "generator":
        problems.extend(_rollout_problems(optimiser, roles.get("generator")))
    return problems


def _rollout_problems(optimiser: ResolvedRole, generator: ResolvedRole | None) -> list[str]:
    """What ``rl.rollouts = "generator"`` needs of the optimiser and the generator."""
    problems: list[str] = []
    name = optimiser.spec.name
    if GENERATOR_ROLLOUTS not in optimiser.spec.capabilities:
        problems.append(
            f"rl.rollouts: 'generator' needs a policy optimiser that takes rollouts from a "
            f"generator ('{GENERATOR_ROLLOUTS}' capability); '{name}' samples its own: set "
            'rl.rollouts = "optimiser"'
        )
    algorithm = getattr(optimiser.config, "algorithm", None)
    if algorithm == "dpo":
        problems.append(
            "rl.rollouts: 'generator' is for algorithms that sample (ppo, grpo, rloo); "
            f"policy_optimiser.algorithm = {algorithm!r} samples nothing"
        )
    if generator is not None and ROLLOUTS not in generator.spec.capabilities:
        problems.append(
            f"rl.rollouts: 'generator' needs a generator with the '{ROLLOUTS}' capability; "
            f"generator.plugin '{generator.spec.name}' has none"
        )
    return problems


def _resolve_role(
    role: str, role_cfg: RoleConfig, registry: Registry, problems: list[str]
) -> ResolvedRole | None:
    """Look a role's plugin up and structure its settings; problems are appended."""
    if role_cfg.plugin not in registry.names(role):
        problems.append(
            f"{role}.plugin: " + unknown_plugin_message(role, role_cfg.plugin, registry.names(role))
        )
        return None
    spec = registry.get(role, role_cfg.plugin)
    unavailable = spec.unavailable()
    if unavailable is not None:
        problems.append(f"{role}.plugin: '{spec.name}' cannot run here: {unavailable}")
    if spec.config_cls is None:
        if role_cfg.options:
            keys = ", ".join(sorted(role_cfg.options))
            problems.append(f"{role}: plugin '{spec.name}' takes no settings, found {keys}")
            return None
        return ResolvedRole(role=role, spec=spec, config=None)
    try:
        plugin_config: Any = converter.structure(dict(role_cfg.options), spec.config_cls)
    except Exception as exc:
        problems.extend(describe_error(exc, prefix=role))
        return None
    return ResolvedRole(role=role, spec=spec, config=plugin_config)


def check_run_data(
    data: Mapping[str, Any], source: str, registry: Registry, base_dir: Path
) -> ResolvedRun:
    """Structure and resolve raw run-file data, reporting the core's problems and
    every role table's problems together."""
    try:
        config = parse_config(data, source)
    except ConfigError as exc:
        problems = list(exc.problems)
        for role in ROLES:
            raw = data.get(role)
            if isinstance(raw, Mapping) and isinstance(raw.get("plugin"), str):
                _resolve_role(role, _role_hook(raw, RoleConfig), registry, problems)
        raise ConfigError(source, problems) from None
    resolved = resolve(config, registry, source=source, base_dir=base_dir)
    non_finite = [
        f"{key}: found {value!r}; a run file cannot hold NaN or infinities (they cannot be "
        "recorded in run.json or fingerprinted)"
        for key, value in non_finite_values(data)
    ]
    if non_finite:
        raise ConfigError(source, non_finite)
    return resolved


def check_inputs(run: ResolvedRun) -> None:
    """Refuse, before any model loads or stage runs, the input files a run would find
    missing or unusable later: ``data.prompts``, ``sl.helpfulness_prompts`` (phase
    ``sl``), model folders that do not exist (``models.*``, ``eval`` models; written as
    paths or impossible as hub ids) and the constitution (read and validated; it must
    hold the critique/revision principles a critic needs and the feedback principles a
    labeller needs).

    :raises ConfigError: one line per problem, naming the key.
    """
    from caikit_core.constitutions import load_constitution
    from caikit_core.errors import ConstitutionError

    config = run.config
    problems: list[str] = []
    files = [("data.prompts", config.data.prompts)]
    if "sl" in config.phases and config.sl.helpfulness_prompts is not None:
        files.append(("sl.helpfulness_prompts", config.sl.helpfulness_prompts))
    for key, value in files:
        path = resolve_path(run.base_dir, value)
        if not path.is_file():
            what = "is a folder, not a prompt file" if path.is_dir() else "no such prompt file"
            problems.append(f"{key}: {what}: {path}")
    problems.extend(_model_problems(run))
    needs = {"critic": "critique_revision", "labeller": "feedback"}
    if needs.keys() & run.roles.keys():
        cfg = config.constitution
        where = None if cfg.path == "default" else resolve_path(run.base_dir, cfg.path)
        try:
            constitution = load_constitution(where, format=cfg.format)
        except ConstitutionError as exc:
            problems.append(f"constitution.path: {exc}")
        else:
            for role, section in needs.items():
                if role in run.roles and not getattr(constitution, section):
                    problems.append(
                        f"constitution.path: {where or 'default'} has no {section} principles, "
                        f"which the {role} ('{run.roles[role].spec.name}') needs"
                    )
    if problems:
        raise ConfigError(run.source, problems)


def _model_problems(run: ResolvedRun) -> list[str]:
    """``models.*`` and ``eval`` models written as paths (or that cannot be hub ids)
    whose folder does not exist (:func:`caikit_core.models.missing_model_folder`)."""
    from caikit_core.models import missing_model_folder

    models = run.config.models
    found = [
        ("models.policy", models.policy),
        ("models.feedback", models.feedback),
        ("models.preference", models.preference),
    ]
    if run.config.eval is not None:
        found.append(("eval.preference_model", run.config.eval.preference_model))
        found.extend((f"eval.checkpoints.{k}", v) for k, v in run.config.eval.checkpoints.items())
    problems = []
    for key, value in found:
        why = missing_model_folder(value, run.base_dir) if value else None
        if why is not None:
            problems.append(f"{key}: {why}")
    return problems


def non_finite_values(data: Any, path: str = "") -> list[tuple[str, float]]:
    """Every NaN or infinity in plain data, with its key path (``generator.delay``)."""
    found: list[tuple[str, float]] = []
    stack: list[tuple[str, Any]] = [(path, data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append((where or "(top level)", value))
        elif isinstance(value, Mapping):
            items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
            stack.extend(reversed(items))
        elif isinstance(value, (list, tuple)):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)]))
    return found


def load_run(path: str | Path, registry: Registry) -> ResolvedRun:
    """Read, structure and resolve a run file."""
    p = Path(path)
    data = read_file(p)
    return check_run_data(data, str(p), registry, p.resolve().parent)


def resolve_path(base_dir: Path, value: str) -> Path:
    """A path from a run file: ``~`` expanded, relative paths against the file's folder."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base_dir / p).resolve()
