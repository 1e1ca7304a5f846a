"""The ``caikit`` command.

Bad input (a run file, a plugin, a run directory) prints one clear error and
exits with status 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from caikit_core import __version__
from caikit_core.errors import CaikitError, StoreError

EXIT_BAD_INPUT = 2

log = logging.getLogger("caikit")


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO
    if args.quiet:
        level = logging.WARNING
    if args.verbose or args.debug:
        level = logging.DEBUG
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(file=sys.stderr)
    if not console.is_terminal:
        console = Console(file=sys.stderr, width=160)
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("caikit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for name in ("caikit_core", *_plugin_loggers()):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def _plugin_loggers() -> list[str]:
    return [
        "caikit_local",
        "caikit_hf",
        "caikit_feedback",
        "caikit_torch",
        "caikit_jax",
        "caikit_ray",
    ]


# --- plugins --------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    from caikit_core.plugins import get_registry

    specs = [s for s in get_registry().all() if args.all or not s.bundled]
    rows: list[dict[str, Any]] = [
        {
            "name": s.name,
            "role": s.role,
            "plugin": s.plugin,
            "distribution": s.distribution,
            "version": s.version,
            "capabilities": sorted(s.capabilities),
            "config": s.config_cls.__name__ if s.config_cls else None,
            "description": s.description,
        }
        for s in specs
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No third-party plugins installed (use --all to include the bundled ones).")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("role", "name", "distribution", "version", "capabilities", "description")
    for r in rows:
        table.add_row(
            r["role"],
            r["name"],
            r["distribution"],
            r["version"],
            ", ".join(r["capabilities"]) or "-",
            r["description"],
        )
    Console(width=160).print(table)
    return 0


# --- config ---------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    from caikit_core.config import load_run
    from caikit_core.plugins import get_registry

    run = load_run(args.config, get_registry())
    data = run.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
    return 0


# --- run --------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from caikit_core.config import check_run_data, read_file
    from caikit_core.pipeline import Pipeline
    from caikit_core.plugins import get_registry
    from caikit_core.store import RunStore

    registry = get_registry()
    if args.resume:
        if args.config is not None:
            raise CaikitError("caikit run: give a run file or --resume RUN_DIR, not both")
        store = RunStore(Path(args.resume).resolve())
        info = store.read_run()
        if not isinstance(info.get("config"), dict) or not isinstance(info.get("base_dir"), str):
            raise StoreError(f"{store.run_file}: has no recorded run file to resume from")
        source = f"{store.run_file} (recorded from {info.get('config_source', '?')})"
        run = check_run_data(info["config"], source, registry, Path(info["base_dir"]))
        if run.output_path() != store.root:
            # the run directory was moved: keep working where it is now
            log.info("run directory moved from %s to %s", run.output_path(), store.root)
    else:
        if args.config is None:
            raise CaikitError("caikit run: give a run file, or --resume RUN_DIR")
        path = Path(args.config)
        raw = read_file(path)
        run = check_run_data(raw, str(path), registry, path.resolve().parent)
        store = RunStore(run.output_path())
        try:
            recorded = json.loads(json.dumps(raw, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise CaikitError(f"{path}: the run file cannot be recorded as JSON: {exc}") from None
        with store.lock():
            info = store.read_run() if store.exists() else {}
            info.update(
                {
                    "config": recorded,
                    "config_source": str(path.resolve()),
                    "base_dir": str(run.base_dir),
                }
            )
            store.write_run(info)
    log.info("run directory: %s", store.root)
    summary = Pipeline(run, store=store).execute()
    _print_summary(summary)
    return 0


def _print_summary(summary: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("stage", "status", "rows", "seconds", "output")
    for s in summary.stages:
        where = s.artifact if s.artifact is not None else s.path
        table.add_row(s.name, s.status, str(s.rows), f"{s.seconds:.1f}", str(where))
    console = Console(file=sys.stdout, width=200)
    console.print(table)
    console.print(f"run directory: {summary.run_dir}")


# --- entry point -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_argument_group("output")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("--debug", action="store_true", help="debug logging and tracebacks")

    parser = argparse.ArgumentParser(
        prog="caikit", description="Constitutional AI as a plugin framework.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"caikit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", parents=[common], help="list installed plugins")
    p.add_argument("--all", action="store_true", help="include the bundled plugins")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("config", parents=[common], help="inspect run files")
    config_sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = config_sub.add_parser(
        "show", parents=[common], help="print the resolved run file with all defaults"
    )
    show.add_argument("config", help="run file (.toml, .yaml)")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("run", parents=[common], help="run the stages of a run file")
    p.add_argument("config", nargs="?", help="run file (.toml, .yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.set_defaults(func=cmd_run)

    for extra in _EXTRA_COMMANDS:
        extra(sub, common)
    return parser


#: functions that add sub-commands (other modules append to this)
_EXTRA_COMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    _setup_logging(args)
    try:
        result: int = args.func(args)
        return result
    except CaikitError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
