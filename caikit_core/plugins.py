"""The plugin manager: entry points in group ``caikit``, the allow-list, tracing,
and the registry of everything the plugins registered.

Environment variables:

``CAIKIT_LOAD_PLUGINS``
    Comma-separated entry-point names to load; unset loads all, empty loads none.
``CAIKIT_TRACE_PLUGINS``
    When set to a non-empty value other than ``0``, every hook call is printed to
    stderr with its arguments and results.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import pluggy

from caikit_core import hookspecs
from caikit_core.errors import PluginError
from caikit_core.interfaces import ALL_CAPABILITIES

ENTRY_POINT_GROUP = "caikit"
BUNDLED_DISTRIBUTION = "caikit"

#: role -> the hook that registers it
ROLE_HOOKS: dict[str, str] = {
    "generator": "register_generators",
    "critic": "register_critics",
    "labeller": "register_labellers",
    "preference_model": "register_preference_models",
    "policy_optimiser": "register_policy_optimisers",
    "executor": "register_executors",
}
ROLES = tuple(ROLE_HOOKS)
#: the registry's kind for evaluation instruments: registered and listed like a role,
#: but not a role of a run (a run file has no ``[instrument]`` table)
INSTRUMENT = "instrument"
#: kinds of registered things that are not run roles -> the hook that registers them
OTHER_KIND_HOOKS: dict[str, str] = {INSTRUMENT: "register_evaluations"}
#: every kind the registry holds -> its hook: the roles, then the other kinds
KIND_HOOKS: dict[str, str] = {**ROLE_HOOKS, **OTHER_KIND_HOOKS}
KINDS = tuple(KIND_HOOKS)
#: every hook a plugin may implement: the registration hooks and ``register_commands``
HOOKS = (*KIND_HOOKS.values(), "register_commands")


@attrs.frozen
class PluginSpec:
    """One registered implementation of a role (or of another kind: ``instrument``)."""

    role: str  # a role of :data:`ROLES`, or a kind of :data:`OTHER_KIND_HOOKS`
    name: str
    factory: Callable[..., Any]
    config_cls: type | None
    capabilities: frozenset[str]
    description: str
    plugin: str  # the entry-point (or in-process registration) name
    distribution: str
    version: str
    #: the conformance kit's quick settings (``register(..., check_settings=...)``)
    check_settings: Mapping[str, Any] | None = None
    #: a cheap check that the plugin can run here (``register(..., preflight=...)``)
    preflight: Callable[[], str | None] | None = None

    def unavailable(self) -> str | None:
        """Why the plugin cannot run in this environment (its preflight's answer), or
        ``None``; a preflight that itself fails is reported, not raised."""
        if self.preflight is None:
            return None
        try:
            return self.preflight()
        except Exception as exc:
            return f"its preflight check failed: {type(exc).__name__}: {exc}"

    @property
    def bundled(self) -> bool:
        return self.distribution == BUNDLED_DISTRIBUTION

    def origin(self) -> str:
        return f"plugin '{self.plugin}' from distribution '{self.distribution}' {self.version}"

    def build(self, config: Any, **kwargs: Any) -> Any:
        """Call the factory; errors raised by it name the plugin."""
        try:
            return self.factory(config, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            if isinstance(exc, (OSError, ValueError, KeyError)):
                raise PluginError(
                    f"{self.role} '{self.name}' ({self.origin()}) failed to start: {exc}"
                ) from exc
            raise


class Registry:
    """Everything registered through the registration hooks, by kind (role) and name."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, PluginSpec]] = {kind: {} for kind in KINDS}

    def add(self, spec: PluginSpec) -> None:
        existing = self._specs[spec.role].get(spec.name)
        if existing is not None:
            raise PluginError(
                f"two plugins register the {spec.role} name '{spec.name}': "
                f"{existing.origin()} and {spec.origin()}"
            )
        self._specs[spec.role][spec.name] = spec

    def names(self, role: str) -> list[str]:
        return sorted(self._specs[role])

    def get(self, role: str, name: str) -> PluginSpec:
        """The spec for ``name`` in ``role``, or a :class:`PluginError` naming the options."""
        try:
            return self._specs[role][name]
        except KeyError:
            raise PluginError(unknown_plugin_message(role, name, self.names(role))) from None

    def __contains__(self, key: tuple[str, str]) -> bool:
        role, name = key
        return name in self._specs.get(role, {})

    def all(self) -> list[PluginSpec]:
        return [self._specs[kind][name] for kind in KINDS for name in sorted(self._specs[kind])]


def unknown_plugin_message(role: str, name: str, available: list[str]) -> str:
    msg = f"unknown {role} plugin '{name}'"
    close = difflib.get_close_matches(name, available, n=1)
    if close:
        msg += f"; did you mean '{close[0]}'?"
    listed = ", ".join(available) if available else "none installed"
    loaded = os.environ.get("CAIKIT_LOAD_PLUGINS")
    if loaded is not None:
        listed += f"; CAIKIT_LOAD_PLUGINS={loaded!r} limits which plugins load"
    return f"{msg} (available: {listed})"


# --- loading ------------------------------------------------------------------------


@attrs.frozen
class _Origin:
    distribution: str
    version: str


class PluginManager:
    """A pluggy manager for project ``caikit`` plus provenance and the registry."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[str, _Origin] = {}
        self._registry: Registry | None = None
        self._undo_trace: Callable[[], None] | None = None

    # registration ----------------------------------------------------------------
    def register(
        self, module: object, name: str, *, distribution: str = "<in-process>", version: str = ""
    ) -> None:
        """Register a hookimpl module (or object), validating it against the specs."""
        if name in self._origins:
            prev = self._origins[name]
            raise PluginError(
                f"two plugins use the entry-point name '{name}': distribution "
                f"'{prev.distribution}' {prev.version} and '{distribution}' {version}"
            )
        try:
            self.pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin '{name}' from distribution '{distribution}' {version} is invalid: {exc}"
            ) from exc
        self._origins[name] = _Origin(distribution, version)
        self._check_unknown_hooks(name, distribution, version)
        self._registry = None

    def _check_unknown_hooks(self, name: str, distribution: str, version: str) -> None:
        plugin = self.pm.get_plugin(name)
        for attr in dir(plugin):
            if getattr(getattr(plugin, attr, None), "caikit_impl", None) is None:
                continue
            if attr not in HOOKS:
                self.pm.unregister(name=name)
                del self._origins[name]
                close = difflib.get_close_matches(attr, HOOKS, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise PluginError(
                    f"plugin '{name}' from distribution '{distribution}' {version} "
                    f"implements unknown hook '{attr}'{hint}"
                )

    def load_entry_points(self) -> None:
        """Load the entry points of group ``caikit``, honouring ``CAIKIT_LOAD_PLUGINS``.

        Names and distributions come from the installed metadata, without importing
        anything: an entry point the allow-list leaves out is never imported, and an
        entry-point name two distributions declare (or one already registered in this
        process) is refused before either module is imported, so a second distribution
        declaring ``hf`` runs no code.
        """
        allow = allowed_plugins()
        chosen: dict[str, tuple[importlib.metadata.EntryPoint, str, str]] = {}
        eps = sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=_ep_key)
        for ep in eps:
            if allow is not None and ep.name not in allow:
                continue
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            prev = self._origins.get(ep.name)
            if prev is not None and prev.distribution == dist:
                continue  # registered already (the same distribution seen twice on sys.path)
            if ep.name in chosen and chosen[ep.name][1] == dist:
                continue  # the same distribution seen twice on sys.path
            if prev is None and ep.name in chosen:
                prev = _Origin(chosen[ep.name][1], chosen[ep.name][2])
            if prev is not None:
                raise PluginError(
                    f"two plugins use the entry-point name '{ep.name}': distribution "
                    f"'{prev.distribution}' {prev.version} and '{dist}' {version} "
                    "(neither was imported; uninstall one, or leave its name out of "
                    "CAIKIT_LOAD_PLUGINS)"
                )
            chosen[ep.name] = (ep, dist, version)
        for name, (ep, dist, version) in chosen.items():
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{name}' from distribution '{dist}' {version} failed to import "
                    f"({ep.value}): {type(exc).__name__}: {exc}"
                ) from exc
            self.register(module, name, distribution=dist, version=version)

    # tracing --------------------------------------------------------------------
    def enable_tracing(self, stream: Any = None) -> None:
        out = stream if stream is not None else sys.stderr

        def before(hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
            names = ", ".join(i.plugin_name for i in impls)
            args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            print(f"caikit trace: {hook_name}({args}) -> impls [{names}]", file=out)

        def after(
            outcome: Any, hook_name: str, impls: Sequence[Any], kwargs: Mapping[str, Any]
        ) -> None:
            exc = outcome.exception
            result = f"raised {exc!r}" if exc is not None else repr(outcome.get_result())
            print(f"caikit trace: {hook_name} result: {result}", file=out)

        self._undo_trace = self.pm.add_hookcall_monitoring(before, after)

    # the registry ---------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._collect()
        return self._registry

    def _collect(self) -> Registry:
        registry = Registry()
        trace = self._undo_trace is not None
        for role, hook_name in KIND_HOOKS.items():
            self._call_each(
                hook_name, functools.partial(_make_register, registry, role, trace=trace)
            )
        return registry

    def register_commands(self, make_register: Callable[[str], hookspecs.RegisterCommand]) -> None:
        """Call each plugin's ``register_commands`` hook.

        :param make_register: builds the ``register`` callable handed to one plugin
            from the words that name it (``plugin 'hf' from distribution 'caikit'
            0.1``), so that the errors it raises can name the plugin.
        """
        self._call_each(
            "register_commands", lambda plugin, origin: make_register(_where(plugin, origin))
        )

    def _call_each(self, hook_name: str, make_register: Callable[[str, _Origin], Any]) -> None:
        """Call ``hook_name`` of each plugin with its own ``register``; an exception
        other than :class:`PluginError` becomes one naming the plugin."""
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name
            origin = self._origins.get(plugin_name, _Origin("<in-process>", ""))
            others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
            caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                caller(register=make_register(plugin_name, origin))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"{_where(plugin_name, origin)} failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

    def plugin_origins(self) -> dict[str, tuple[str, str]]:
        return {k: (v.distribution, v.version) for k, v in self._origins.items()}


def _where(plugin: str, origin: _Origin) -> str:
    return f"plugin '{plugin}' from distribution '{origin.distribution}' {origin.version}".rstrip()


def _make_register(
    registry: Registry, role: str, plugin: str, origin: _Origin, trace: bool
) -> hookspecs.Register:
    where = _where(plugin, origin)

    def register(
        name: str,
        factory: Callable[..., Any],
        *,
        config: type | None = None,
        capabilities: Iterable[str] = (),
        description: str = "",
        check_settings: Mapping[str, Any] | None = None,
        preflight: Callable[[], str | None] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"{where}: {role} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise PluginError(f"{where}: factory for {role} '{name}' is not callable")
        if config is not None and not attrs.has(config):
            raise PluginError(
                f"{where}: config for {role} '{name}' must be an attrs class, got {config!r}"
            )
        if check_settings is not None and not isinstance(check_settings, Mapping):
            raise PluginError(
                f"{where}: check_settings for {role} '{name}' must be a table (a mapping), "
                f"got {check_settings!r}"
            )
        if preflight is not None and not callable(preflight):
            raise PluginError(f"{where}: preflight for {role} '{name}' is not callable")
        caps = frozenset(capabilities)
        unknown = caps - ALL_CAPABILITIES
        if unknown:
            raise PluginError(
                f"{where}: {role} '{name}' declares unknown capabilities {sorted(unknown)} "
                f"(known: {', '.join(sorted(ALL_CAPABILITIES))})"
            )
        if not description:
            doc = inspect.getdoc(factory) or ""
            description = doc.splitlines()[0] if doc else ""
        spec = PluginSpec(
            role=role,
            name=name,
            factory=factory,
            config_cls=config,
            capabilities=caps,
            description=description,
            plugin=plugin,
            distribution=origin.distribution,
            version=origin.version,
            check_settings=check_settings,
            preflight=preflight,
        )
        registry.add(spec)
        if trace:
            print(f"caikit trace: registered {role} '{name}' from {where}", file=sys.stderr)

    return register


def _ep_key(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    return (ep.name, ep.value)


def allowed_plugins() -> set[str] | None:
    raw = os.environ.get("CAIKIT_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def tracing_requested() -> bool:
    return os.environ.get("CAIKIT_TRACE_PLUGINS", "") not in ("", "0")


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, loading entry points on first use."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        if tracing_requested():
            manager.enable_tracing()
        manager.load_entry_points()
        _manager = manager
    return _manager


def get_registry() -> Registry:
    return get_plugin_manager().registry


def reset() -> None:
    """Forget the process-wide manager (tests, or after installing a plugin)."""
    global _manager
    _manager = None
