"""``caikit eval NAME``: run one instrument alone, on a run file's roles (``--config``)
or a run directory's (``--run``), and print its headline numbers with intervals.

The instrument's settings are the run file's ``[eval.NAME]`` table with each
``--set KEY=VALUE`` laid on top (``VALUE`` is read as a TOML value: ``3``, ``true``,
``"text"``, ``[1, 2]``; anything else is a string). Everything is checked before
any model loads: unknown instrument or setting, and the instrument's ``requires``
against what the run has (exit status 2 with one error line).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caikit_core.errors import CaikitError, ConfigError, StoreError
from caikit_core.evaluation import STANDALONE_FOLDER, format_estimate

if TYPE_CHECKING:
    from caikit_core.config import ResolvedRun

__all__ = ["add_eval_command", "cmd_eval", "parse_set"]

DEFAULT_OUT = "caikit-eval"


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["limit=5", "label=x"]`` -> ``{"limit": 5, "label": "x"}`` (dotted keys nest)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CaikitError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        *parents, last = key.strip().split(".")
        table = out
        for part in parents:
            table = table.setdefault(part, {})
        table[last] = value
    return out


def _load(args: argparse.Namespace) -> tuple[ResolvedRun, Path | None]:
    """The run (from ``--config`` or the run directory's record) and its directory."""
    from caikit_core.config import check_run_data, read_file
    from caikit_core.plugins import get_registry
    from caikit_core.store import RunStore

    registry = get_registry()
    if args.config is not None:
        path = Path(args.config)
        run = check_run_data(read_file(path), str(path), registry, path.resolve().parent)
        run_dir = Path(args.run).resolve() if args.run else run.output_path()
        return run, run_dir if (run_dir / "run.json").is_file() else None
    if args.run is None:
        raise CaikitError(f"caikit eval {args.name}: give --config RUN_FILE or --run RUN_DIR")
    store = RunStore(Path(args.run).resolve())
    info = store.read_run()
    if not isinstance(info.get("config"), dict) or not isinstance(info.get("base_dir"), str):
        raise StoreError(f"{store.run_file}: has no recorded run file to evaluate with")
    source = f"{store.run_file} (recorded from {info.get('config_source', '?')})"
    return check_run_data(info["config"], source, registry, Path(info["base_dir"])), store.root


def cmd_eval(args: argparse.Namespace) -> int:
    from caikit_core.config import resolve_instrument
    from caikit_core.eval_context import (
        RunEvalContext,
        build_instrument,
        check_requirements,
        run_artifacts,
        run_instrument,
    )
    from caikit_core.plugins import get_registry
    from caikit_core.stages.base import release_instances
    from caikit_core.store import RunStore

    run, run_dir = _load(args)
    table = dict(run.config.eval.settings.get(args.name, {})) if run.config.eval else {}
    table.update(parse_set(args.set or []))
    problems: list[str] = []
    resolved = resolve_instrument(args.name, table, get_registry(), problems)
    if resolved is None:
        raise ConfigError(f"caikit eval {args.name}", problems)
    artifacts = run_artifacts(RunStore(run_dir)) if run_dir is not None else {}
    pm = Path(args.preference_model).resolve() if args.preference_model else None
    ctx = RunEvalContext(run, run_dir=run_dir, artifacts=artifacts, preference_model=pm)
    instrument = build_instrument(resolved)
    check_requirements({args.name: instrument}, ctx)
    if args.out:
        out = Path(args.out)
    elif run_dir is not None:
        out = run_dir / STANDALONE_FOLDER
    else:
        out = Path(DEFAULT_OUT)
    try:
        result = run_instrument(args.name, instrument, resolved, ctx, out / args.name)
    finally:
        release_instances()
    print(f"{args.name}: {out / args.name / 'result.json'}")
    for key, estimate in result.metrics.items():
        print(f"  {key}: {format_estimate(estimate)}")
    for alarm in result.alarms:
        print(f"  alarm {alarm.name}: {alarm.message}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def add_eval_command(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``caikit eval NAME [--config RUN_FILE] [--run RUN_DIR] [--out DIR] [--set K=V]``."""
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="run one evaluation instrument",
        description=(
            "Run one evaluation instrument on a run file's roles (--config) or a run "
            "directory's (--run), write NAME/result.json and rows.parquet, and print its "
            "metrics with intervals. Settings: the run file's [eval.NAME] table, then "
            "each --set KEY=VALUE (VALUE read as TOML). See docs/evaluation.md."
        ),
    )
    p.add_argument("name", metavar="NAME", help="the instrument (caikit plugins --all lists them)")
    p.add_argument("--config", metavar="RUN_FILE", help="the run file naming the roles")
    p.add_argument("--run", metavar="RUN_DIR", help="a run directory (its checkpoints, its PM)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"write DIR/NAME/result.json (default: RUN_DIR/{STANDALONE_FOLDER}, "
        f"else ./{DEFAULT_OUT})",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="an instrument setting over [eval.NAME] (repeatable; VALUE as TOML)",
    )
    p.add_argument(
        "--preference-model", metavar="PATH", help="a trained preference model folder to use"
    )
    p.set_defaults(func=cmd_eval)
