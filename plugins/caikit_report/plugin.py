"""``caikit report RUN_DIR [--out FILE] [--eval DIR ...]``: one self-contained HTML page
about a finished run (labels, training curves, provenance, evaluation results), with
each plot also as a PNG beside it.

This module is what the ``caikit`` entry point names. It imports neither matplotlib
nor the implementation modules (:mod:`caikit_report.rundir` reads the run,
:mod:`caikit_report.plots` draws, :mod:`caikit_report.page` writes the page) until
the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from caikit_core.hookspecs import RegisterCommand, hookimpl

__all__ = ["build_report", "register_commands"]

#: where the page goes by default, relative to the run directory
DEFAULT_OUT = Path("report") / "index.html"


def build_report(run_dir: Path, out: Path | None = None, evals: Sequence[Path] = ()) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report/index.html``)
    and its plots as PNG files beside it; returns the page's path.

    :raises caikit_core.errors.CaikitError: the run is missing or unfinished (every
        missing stage is named), or an evaluation folder has no readable result;
        nothing is written then.
    """
    from caikit_core.errors import CaikitError
    from caikit_report.page import write_report
    from caikit_report.rundir import read_run

    view = read_run(run_dir, evals)
    target = out if out is not None else run_dir / DEFAULT_OUT
    try:
        return write_report(view, target)
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, FileExistsError) else exc.strerror
        raise CaikitError(f"--out {target}: cannot write the report: {reason or exc}") from exc


def _cmd_report(args: argparse.Namespace) -> int:
    out = build_report(
        Path(args.run_dir), Path(args.out) if args.out else None, [Path(e) for e in args.eval]
    )
    print(out)
    return 0


@hookimpl
def register_commands(register: RegisterCommand) -> None:
    """Add ``caikit report``."""
    parser = register(
        "report",
        _cmd_report,
        help="write an HTML report of a finished run",
        description=(
            "Write one self-contained HTML page about a finished run (label distribution, "
            "training curves, plugins and fingerprints, evaluation results) and each plot "
            "as a PNG beside it; prints the page's path."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    parser.add_argument(
        "--out", metavar="FILE", help="the page to write (default: RUN_DIR/report/index.html)"
    )
    parser.add_argument(
        "--eval",
        metavar="DIR",
        action="append",
        default=[],
        help="also show the evaluation result in DIR (a folder with result.json); repeatable",
    )
