"""The ``caikit`` command.

Bad input (a run file, a plugin, a run directory) prints one clear error and
exits with status 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caikit_core import __version__
from caikit_core.errors import CaikitError, PluginError, StoreError
from caikit_core.hookspecs import CommandHandler, RegisterCommand

if TYPE_CHECKING:
    from caikit_core.config import ResolvedRun
    from caikit_core.plugins import PluginManager
    from caikit_core.store import RunStore

EXIT_BAD_INPUT = 2

log = logging.getLogger("caikit")


def _setup_logging(args: argparse.Namespace) -> None:
    """Send the records of the ``caikit`` logger, and so of every ``caikit.<name>``
    logger the core and the plugins use, to stderr at the level the options ask."""
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
    if not (args.verbose or args.debug):
        # transformers' weight-loading bars and tokenizer warnings would interleave with
        # caikit's progress display: errors only (read when transformers is imported, in
        # this process and in workers; a value the user set is kept)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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
    from caikit_core.config import check_inputs, check_run_data, read_file
    from caikit_core.plugins import get_registry
    from caikit_core.store import RunStore

    registry = get_registry()
    if args.resume:
        if args.config is not None:
            raise CaikitError("caikit run: give a run file or --resume RUN_DIR, not both")
        store = RunStore(Path(args.resume).resolve())
        store.read_run()  # not a run directory: say so before creating a lock file in it
        with _storage_errors(store), store.lock():  # one lock from reading the run file to the end
            info = store.read_run()
            if not isinstance(info.get("config"), dict) or not isinstance(
                info.get("base_dir"), str
            ):
                raise StoreError(f"{store.run_file}: has no recorded run file to resume from")
            source = f"{store.run_file} (recorded from {info.get('config_source', '?')})"
            run = check_run_data(info["config"], source, registry, Path(info["base_dir"]))
            check_inputs(run)
            _show_enabled(run, store)
            if run.output_path() != store.root:
                # the run directory was moved: keep working where it is now
                log.info("run directory moved from %s to %s", run.output_path(), store.root)
            return _execute(run, store, args)
    if args.config is None:
        raise CaikitError("caikit run: give a run file, or --resume RUN_DIR")
    path = Path(args.config)
    raw = read_file(path)
    run = check_run_data(raw, str(path), registry, path.resolve().parent)
    check_inputs(run)
    from caikit_core.security import risky_settings

    for note in risky_settings(run):
        log.warning("%s: %s", path, note)
    store = RunStore(_usable_output_dir(run, path))
    try:
        recorded = json.loads(json.dumps(raw, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise CaikitError(f"{path}: the run file cannot be recorded as JSON: {exc}") from None
    with _storage_errors(store), store.lock():  # one lock from recording the run file to the end
        info = store.read_run() if store.exists() else {}
        if info and not args.new_run:
            _check_same_run_file(info, path, store)
        info.update(
            {
                "config": recorded,
                "config_source": str(path.resolve()),
                "base_dir": str(run.base_dir),
            }
        )
        store.write_run(info)
        return _execute(run, store, args)


@contextlib.contextmanager
def _storage_errors(store: RunStore) -> Iterator[None]:
    """A full disk or a read-only run directory as a one-line :class:`StoreError`."""
    from caikit_core.store import storage_error

    try:
        yield
    except OSError as exc:
        error = storage_error(exc, store.root)
        if error is None:
            raise
        raise error from exc


def _usable_output_dir(run: ResolvedRun, path: Path) -> Path:
    """The run's output folder, created if missing and checked to take a file; any
    reason it cannot (a file there, a read-only or unreachable folder, a name too
    long) is a :class:`StoreError` naming ``output_dir`` and the run file."""
    import tempfile

    root = run.output_path()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            reason = "it is a file, not a folder"
        else:
            reason = exc.strerror or str(exc)
        raise StoreError(f"{path}: output_dir: cannot write the run into {root}: {reason}") from exc
    return root


def _show_enabled(run: ResolvedRun, store: RunStore) -> None:
    """Warn what a recorded run file enables before ``--resume`` re-runs it."""
    from caikit_core.security import enabled

    notes = enabled(run, store.root)
    if notes:
        log.warning(
            "resuming %s: %s enables:\n%s",
            store.root,
            run.source,
            "\n".join(f"  - {note}" for note in notes),
        )


def _check_same_run_file(info: dict[str, Any], path: Path, store: RunStore) -> None:
    """Refuse a run directory whose run.json records another run file.

    The same run file is the same path (its settings may have changed), or one at the
    same place relative to the run directory as the recorded one (a folder moved or
    copied together with its run file).
    """
    import os

    from caikit_core.config import resolve_path

    source = info.get("config_source")
    here = path.resolve()
    if not isinstance(source, str) or Path(source) == here:
        return
    config, base = info.get("config"), info.get("base_dir")
    if isinstance(config, dict) and isinstance(base, str):
        recorded_dir = resolve_path(Path(base), str(config.get("output_dir", "")))
        if os.path.relpath(source, recorded_dir) == os.path.relpath(here, store.root):
            return
    raise CaikitError(
        f"{store.root} holds the run of {source}, not of {here}; give --new-run to "
        f"record {path} there instead (results already there are kept, and reused where "
        "fingerprints match), or choose another output_dir"
    )


def _execute(run: ResolvedRun, store: RunStore, args: argparse.Namespace) -> int:
    """Run the stages (the caller holds the run directory's lock) and print the summary."""
    from caikit_core.runner import Runner

    log.info("run directory: %s", store.root)
    summary = Runner(run, store=store).execute()
    _print_summary(summary, args.show_traces)
    return 0


def _print_summary(summary: Any, show_traces: int = 0) -> None:
    """The stage table, then each stage's own summary lines (and example traces)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from caikit_core.stages.base import warnings_line

    table = Table("stage", "status", "rows", "seconds", "output")
    for s in summary.stages:
        where = s.artifact if s.artifact is not None else s.path
        table.add_row(s.name, s.status, str(s.rows), f"{s.seconds:.1f}", str(where))
    console = Console(file=sys.stdout, width=200)
    console.print(table)
    console.print(f"run directory: {summary.run_dir}")
    for s in summary.stages:
        if s.warnings:
            line = f"{s.name}: {warnings_line(s.rows, s.warnings)}"
            console.print(
                f"{line} (all in {s.path / 'manifest.json'})",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        if s.skipped:
            console.print(
                f'{s.name}: {s.skipped} record(s) skipped on error (on_error = "skip"), '
                f"listed in {s.path / 'skipped.parquet'}",
                markup=False,
                highlight=False,
            )
    ctx = summary.context
    for s in summary.stages:
        for line in ctx.stages[s.name]().summary(ctx, s):
            console.print(line, markup=False, highlight=False)
    if show_traces:
        for s in summary.stages:
            for title, lines in ctx.stages[s.name]().examples(ctx, s, show_traces):
                console.print(Panel("\n".join(lines), title=title, expand=False))


# --- constitution ------------------------------------------------------------------


def cmd_constitution_convert(args: argparse.Namespace) -> int:
    from caikit_core.constitutions import convert_constitution

    constitution = convert_constitution(
        args.src, args.dst, args.src_format, args.dst_format, lossy=args.lossy
    )
    print(
        f"wrote {args.dst}: {len(constitution.critique_revision)} critique/revision pairs, "
        f"{len(constitution.feedback)} feedback principles, "
        f"{len(constitution.critique_few_shot) + len(constitution.feedback_few_shot)} "
        f"few-shot examples (content hash {constitution.content_hash()[:16]})"
    )
    return 0


def cmd_constitution_show(args: argparse.Namespace) -> int:
    from caikit_core.constitutions import load_constitution

    c = load_constitution(args.path, args.format)
    if args.json:
        print(json.dumps({"content_hash": c.content_hash(), **c.to_dict()}, indent=2))
        return 0
    print(f"{c.name}  (content hash {c.content_hash()})")
    print(f"critique/revision pairs: {len(c.critique_revision)}")
    for p in c.critique_revision:
        print(f"  {p.id}: {p.critique}")
    print(f"feedback principles: {len(c.feedback)}")
    for f in c.feedback:
        print(f"  {f.id}: {f.text}")
    print(
        f"few-shot examples: {len(c.critique_few_shot)} critique, "
        f"{len(c.feedback_few_shot)} feedback"
    )
    return 0


def _add_constitution_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    from caikit_core.constitutions import FORMATS

    formats = ["auto", *FORMATS]
    p = sub.add_parser("constitution", parents=[common], help="inspect and convert constitutions")
    csub = p.add_subparsers(dest="constitution_command", metavar="SUBCOMMAND", required=True)
    conv = csub.add_parser(
        "convert", parents=[common], help="convert between caikit, anthropic and llm-swarm formats"
    )
    conv.add_argument("src", help="file or folder to read")
    conv.add_argument("dst", help="file or folder to write (format from its suffix by default)")
    conv.add_argument("--from", dest="src_format", choices=formats, default="auto")
    conv.add_argument("--to", dest="dst_format", choices=formats, default="auto")
    conv.add_argument(
        "--lossy", action="store_true", help="allow dropping what the target format cannot hold"
    )
    conv.set_defaults(func=cmd_constitution_convert)
    show = csub.add_parser("show", parents=[common], help="print a constitution and its hash")
    show.add_argument("path", nargs="?", default=None, help="file or folder (default: caikit's)")
    show.add_argument("--format", choices=formats, default="auto")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_constitution_show)


# --- export --------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from caikit_core.io.export import export_run

    for path in export_run(Path(args.run_dir), Path(args.out), format=args.format):
        print(path)
    return 0


def _add_export_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="export a run's revisions as a Hugging Face CAI dataset",
        description=(
            "Write a run's revision traces in the schema of HuggingFaceH4/"
            "cai-conversation-harmless (init_prompt, init_response, critic_prompt, "
            "critic_response, revision_prompt, revision_response, prompt, messages, "
            "chosen, rejected)."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="the output file; the format's suffix is added when missing",
    )
    p.add_argument(
        "--format",
        choices=("parquet", "jsonl", "both"),
        default="parquet",
        help="file format (default: parquet)",
    )
    p.set_defaults(func=cmd_export)


# --- entry point -----------------------------------------------------------------------


def _output_options(default: Any) -> argparse.ArgumentParser:
    """The output options, on ``caikit`` itself (``default`` False) and on every
    subcommand (``default`` SUPPRESS, so that ``caikit --debug run`` keeps ``--debug``)."""
    common = argparse.ArgumentParser(add_help=False)
    verbosity = common.add_argument_group("output")
    for flags, help in (
        (("-q", "--quiet"), "warnings and errors only"),
        (("-v", "--verbose"), "debug logging"),
        (("--debug",), "debug logging and tracebacks"),
    ):
        verbosity.add_argument(*flags, action="store_true", default=default, help=help)
    return common


def build_parser(manager: PluginManager | None = None) -> argparse.ArgumentParser:
    """The ``caikit`` parser: the built-in commands and those the plugins register.

    :param manager: the plugin manager whose ``register_commands`` hooks add
        commands (default: the process-wide one, loading the entry points).
    """
    from caikit_core.plugins import get_plugin_manager

    common = _output_options(argparse.SUPPRESS)  # a subcommand's copy keeps what came before
    parser = argparse.ArgumentParser(
        prog="caikit",
        description="Constitutional AI as a plugin framework.",
        parents=[_output_options(False)],
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
    p.add_argument(
        "--new-run",
        action="store_true",
        help="record this run file in an output_dir whose run.json names another one",
    )
    p.add_argument(
        "--show-traces", type=int, default=2, metavar="N", help="print N revision traces at the end"
    )
    p.set_defaults(func=cmd_run)

    for extra in _EXTRA_COMMANDS:
        extra(sub, common)
    (manager or get_plugin_manager()).register_commands(
        lambda where: _command_register(sub, common, where)
    )
    return parser


def _command_register(sub: Any, common: argparse.ArgumentParser, where: str) -> RegisterCommand:
    """The ``register`` that one plugin's ``register_commands`` hook receives.

    :param sub: the ``caikit`` parser's sub-parsers action.
    :param common: the parent parser holding the output options.
    :param where: names the plugin in errors.
    """
    groups: dict[int, Any] = {}  # id of a parser returned here -> its sub-parsers action
    returned: set[int] = set()

    def register(
        name: str,
        handler: CommandHandler | None = None,
        *,
        help: str,
        description: str | None = None,
        parent: argparse.ArgumentParser | None = None,
    ) -> argparse.ArgumentParser:
        action, prog = sub, "caikit"
        if parent is not None:
            if id(parent) not in returned:
                raise PluginError(f"{where}: parent= of command '{name}' is not one it registered")
            if id(parent) not in groups:
                groups[id(parent)] = parent.add_subparsers(
                    dest=f"{parent.prog.split()[-1]}_command", metavar="SUBCOMMAND", required=True
                )
            action, prog = groups[id(parent)], parent.prog
        if not isinstance(name, str) or not name or name.startswith("-"):
            raise PluginError(f"{where}: a command name must be a word, got {name!r}")
        if name in action.choices:
            raise PluginError(f"{where}: adds the command '{prog} {name}', which exists already")
        parser: argparse.ArgumentParser = action.add_parser(
            name, parents=[common], help=help, description=description or help
        )
        if handler is not None:
            parser.set_defaults(func=handler)
        returned.add(id(parser))
        return parser

    return register


def _add_check_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``caikit check`` (the conformance kit, imported only here)."""
    from caikit_core.testing.kit import add_check_command

    add_check_command(sub, common)


def _add_eval_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``caikit eval`` (imported only here)."""
    from caikit_core.eval_command import add_eval_command

    add_eval_command(sub, common)


#: functions that add the built-in commands besides plugins, config and run (a plugin adds
#: its commands through the register_commands hook instead)
_EXTRA_COMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    _add_constitution_commands,
    _add_export_command,
    _add_check_command,
    _add_eval_command,
]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CaikitError as exc:  # a plugin that fails to load or to add its commands
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
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
    except KeyboardInterrupt as exc:  # Ctrl-C; the runner's names the stage
        if args.debug:
            traceback.print_exc()
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
