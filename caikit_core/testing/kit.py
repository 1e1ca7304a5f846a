"""Run the conformance checks against a plugin: :func:`check_plugin`,
:func:`parametrize_with_checks` and the ``caikit check`` command.

A plugin is built through ``PluginSpec.build(config, **role_kwargs)`` with the
caller's config (layered over the plugin's quick settings), else the quick settings
the plugin registered (``register(..., check_settings={...})``, kept as
:attr:`PluginSpec.check_settings`), else ``config_cls()``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from caikit_core.errors import PluginError
from caikit_core.plugins import KINDS, PluginSpec
from caikit_core.testing import instrument_checks
from caikit_core.testing.checks import CHECKS, Check, CheckContext, CheckFailed, CheckSkipped

#: the instrument checks register themselves in CHECKS when imported
_ = instrument_checks

if TYPE_CHECKING:  # pytest is needed only by parametrize_with_checks
    import pytest

__all__ = [
    "CheckResult",
    "add_check_command",
    "check_plugin",
    "make_context",
    "parametrize_with_checks",
    "select_checks",
    "unmet_requirement",
]

Status = Literal["passed", "failed", "skipped", "xfail"]


@attrs.frozen
class CheckResult:
    """The outcome of one check: ``passed``, ``failed``, ``skipped`` or ``xfail``."""

    check: str
    status: Status
    reason: str = ""


def _spec(role: str, name: str) -> PluginSpec:
    if role not in KINDS:
        raise PluginError(f"unknown role '{role}' (roles: {', '.join(KINDS)})")
    from caikit_core.plugins import get_registry

    return get_registry().get(role, name)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top; nested tables are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _default_config(spec: PluginSpec, overrides: dict[str, Any] | None) -> Any:
    if spec.config_cls is None:
        return None
    values = _merged(spec.check_settings or {}, overrides or {})
    from caikit_core.converter import describe_error, structure
    from caikit_core.errors import ConfigError

    try:
        return structure(values, spec.config_cls)
    except Exception as exc:  # every bad setting, one line each, naming the key
        raise ConfigError(f"config of {spec.role} '{spec.name}'", describe_error(exc)) from None


def make_context(
    role: str,
    target: str | PluginSpec | object,
    *,
    config: Any = None,
    workdir: Path | None = None,
    role_kwargs_factory: Callable[[], dict[str, Any]] | None = None,
    model_factory: Callable[[], Path] | None = None,
    constitution_factory: Callable[[], Any] | None = None,
    eval_context_factory: Callable[[], Any] | None = None,
) -> CheckContext:
    """The context the checks run in, for a plugin name, a spec or an instance.

    ``config`` is a config object, or a dict of settings layered over the plugin's
    registered ``check_settings``; ``None`` uses those (or ``config_cls()``). The factories
    replace the kit's defaults for the factory's keyword arguments, the base model
    and the constitution, and (instruments) the EvalContext they are evaluated against
    (see :class:`~caikit_core.testing.checks.CheckContext`).
    """
    factories: dict[str, Any] = {
        "role_kwargs_factory": role_kwargs_factory,
        "model_factory": model_factory,
        "constitution_factory": constitution_factory,
        "eval_context_factory": eval_context_factory,
    }
    if role not in KINDS:
        raise PluginError(f"unknown role '{role}' (roles: {', '.join(KINDS)})")
    if isinstance(target, str):
        target = _spec(role, target)
    if isinstance(target, PluginSpec):
        if config is None or isinstance(config, dict):
            config = _default_config(target, config)
        folder = workdir or Path(tempfile.mkdtemp(prefix=f"caikit-check-{role}-"))
        return CheckContext(role, target.name, target, config, folder, **factories)
    folder = workdir or Path(tempfile.mkdtemp(prefix=f"caikit-check-{role}-"))
    name = type(target).__name__
    return CheckContext(role, name, None, config, folder, given_instance=target, **factories)


def select_checks(role: str, pattern: str | None = None) -> list[Check]:
    """The checks of ``role``, optionally those whose name contains/matches ``pattern``."""
    checks = CHECKS.get(role, [])
    if pattern:
        checks = [c for c in checks if pattern in c.name or fnmatch.fnmatch(c.name, pattern)]
    return checks


def unmet_requirement(check: Check, ctx: CheckContext) -> str | None:
    """Why ``check`` does not apply to the plugin (a capability it lacks), else ``None``."""
    missing = check.requires - ctx.capabilities
    if missing:
        return f"needs capability {', '.join(sorted(missing))}"
    return None


def _run_one(check: Check, ctx: CheckContext, expected: dict[str, str]) -> CheckResult:
    unmet = unmet_requirement(check, ctx)
    if unmet is not None:
        return CheckResult(check.name, "skipped", unmet)
    try:
        check.fn(ctx)
    except CheckSkipped as exc:
        return CheckResult(check.name, "skipped", str(exc))
    except Exception as exc:
        reason = str(exc) if isinstance(exc, CheckFailed) else f"{type(exc).__name__}: {exc}"
        if check.name in expected:
            return CheckResult(check.name, "xfail", f"{expected[check.name]} ({reason})")
        return CheckResult(check.name, "failed", reason)
    if check.name in expected:
        return CheckResult(
            check.name, "failed", f"expected to fail ({expected[check.name]}) but passed"
        )
    return CheckResult(check.name, "passed")


def check_plugin(
    role: str,
    target: str | PluginSpec | object,
    *,
    expected_failed_checks: dict[str, str] | None = None,
    context: CheckContext | None = None,
    config: Any = None,
    pattern: str | None = None,
) -> list[CheckResult]:
    """Run every check of ``role`` against a plugin (name, spec or built instance).

    :param expected_failed_checks: check name -> why it is expected to fail; such a
        failure is reported ``xfail``, and a pass is reported ``failed``.
    :param context: a ready context (else one is made with :func:`make_context`).
    :param config: a config object or a dict of settings (see :func:`make_context`).
    :param pattern: run only the checks whose name contains or glob-matches it.
    :raises caikit_core.errors.PluginError: unknown role or plugin.
    """
    ctx = context or make_context(role, target, config=config)
    expected = expected_failed_checks or {}
    unknown = set(expected) - {c.name for c in CHECKS.get(role, [])}
    if unknown:
        raise PluginError(f"expected_failed_checks names unknown checks: {sorted(unknown)}")
    return [_run_one(check, ctx, expected) for check in select_checks(role, pattern)]


class _BoundCheck:
    """One check of one plugin, run against a context shared by the plugin's checks."""

    def __init__(
        self, check: Check, make: Callable[[], CheckContext], expected: dict[str, str]
    ) -> None:
        self.check = check
        self.make = make
        self.expected = expected

    def __call__(self) -> None:
        import pytest

        result = _run_one(self.check, self.make(), {})
        if result.status == "skipped":
            pytest.skip(result.reason)
        if result.status == "failed":
            raise CheckFailed(f"{self.check.name}: {result.reason}")

    def __repr__(self) -> str:
        return f"<check {self.check.role}-{self.check.name}>"


def parametrize_with_checks(
    role: str,
    name: str,
    *,
    expected_failed_checks: dict[str, str] | None = None,
    config: Any = None,
) -> pytest.MarkDecorator:
    """A ``pytest.mark.parametrize`` over the checks of ``role`` for plugin ``name``.

    The test receives a callable ``check`` to call; ids are ``role-name-check``;
    expected failures are strict ``xfail`` with their reason. The plugin is built on
    the first check that runs and shared by the rest.
    """
    import pytest

    expected = expected_failed_checks or {}
    cache: dict[str, CheckContext] = {}

    def make() -> CheckContext:
        if "ctx" not in cache:
            cache["ctx"] = make_context(role, name, config=config)
        return cache["ctx"]

    params = []
    for check in select_checks(role):
        marks = []
        if check.name in expected:
            marks.append(pytest.mark.xfail(reason=expected[check.name], strict=True))
        params.append(
            pytest.param(
                _BoundCheck(check, make, expected), id=f"{role}-{name}-{check.name}", marks=marks
            )
        )
    return pytest.mark.parametrize("check", params)


# --- caikit check ----------------------------------------------------------------------


def format_report(role: str, name: str, results: list[CheckResult]) -> str:
    """One line per check, then a summary line."""
    lines = [f"caikit check {role} {name}"]
    width = max((len(r.check) for r in results), default=0)
    for r in results:
        reason = f"  {r.reason}" if r.reason else ""
        lines.append(f"  {r.status.upper():7} {r.check:{width}}{reason}".rstrip())
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "skipped")}
    counts["xfail"] = sum(r.status == "xfail" for r in results)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    lines.append(f"{summary or 'no checks'}")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    """Run the checks; 0 when none failed, 1 otherwise (bad input raises PluginError)."""
    config: Any = None
    if args.config:
        try:
            config = json.loads(args.config)
        except json.JSONDecodeError as exc:
            raise PluginError(f"--config is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise PluginError("--config must be a JSON object of config settings")
    try:
        import torch

        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix=f"caikit-check-{args.role}-") as workdir:
        ctx = make_context(args.role, args.name, config=config, workdir=Path(workdir))
        results = check_plugin(args.role, args.name, context=ctx, pattern=args.k)
    print(format_report(args.role, args.name, results))
    return 1 if any(r.status == "failed" for r in results) else 0


def add_check_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``caikit check ROLE NAME [--config JSON] [-k PATTERN]``."""
    p = sub.add_parser(
        "check", parents=[common], help="run the conformance checks against a plugin"
    )
    p.add_argument("role", help=f"the plugin's role ({', '.join(KINDS)})")
    p.add_argument("name", help="the plugin's registered name")
    p.add_argument("--config", metavar="JSON", help="config settings as a JSON object")
    p.add_argument("-k", metavar="PATTERN", help="only checks whose name matches PATTERN")
    p.set_defaults(func=cmd_check)
