"""Fault injection for ``tests/test_faults.py``, loaded by Python's ``site`` at start-up
of the ``caikit run`` subprocesses those tests start (their PYTHONPATH alone names this
folder; nothing in caikit imports it).

An audit hook (:func:`sys.addaudithook`) watches the file operations under
``CAIKIT_FAULT_ROOT`` (the run directory): opening a file for writing, renaming,
removing, making a folder, removing a tree. It only observes: caikit runs its
ordinary code paths. Each operation is numbered; with ``CAIKIT_FAULT_LOG`` set, one
line per operation, ``<n>\\t<event>\\t<path relative to the root>``, is appended there.
With ``CAIKIT_FAULT_AT=<k>`` the process sends itself ``CAIKIT_FAULT_SIGNAL`` (``KILL``,
the default, or ``INT``) just before the ``k``-th operation whose path lies under
``CAIKIT_FAULT_UNDER`` (relative to the root, e.g. ``stages/labels``; default: anywhere),
so a SIGKILL lands between two steps of caikit's writes, e.g. after a temporary file
is written and before it is renamed into place.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_ROOT = (
    os.path.abspath(os.environ["CAIKIT_FAULT_ROOT"]) if os.environ.get("CAIKIT_FAULT_ROOT") else ""
)
_UNDER = os.path.join(_ROOT, os.environ.get("CAIKIT_FAULT_UNDER", "")).rstrip(os.sep)
_AT = int(os.environ.get("CAIKIT_FAULT_AT", "0") or 0)
_SIGNAL = getattr(signal, "SIG" + os.environ.get("CAIKIT_FAULT_SIGNAL", "KILL"))
_LOG = os.environ.get("CAIKIT_FAULT_LOG", "")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"}
_state = {"seen": 0, "matched": 0, "fired": 0}
_log_fd = os.open(_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if _LOG else -1


def _path(value: Any) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.path.abspath(os.fsdecode(value))
    return None


def _writes(args: tuple[Any, ...]) -> bool:
    mode, flags = args[1], args[2]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        if not _writes(args):
            return
    elif event not in _EVENTS:
        return
    path = _path(args[0])
    if path is None or not (path == _ROOT or path.startswith(_ROOT + os.sep)):
        return
    _state["seen"] += 1
    if _log_fd >= 0:
        line = f"{_state['seen']}\t{event}\t{os.path.relpath(path, _ROOT)}\n"
        os.write(_log_fd, line.encode())
    if _AT and not _state["fired"] and (path == _UNDER or path.startswith(_UNDER + os.sep)):
        _state["matched"] += 1
        if _state["matched"] == _AT:
            _state["fired"] = 1
            os.kill(os.getpid(), _SIGNAL)


if _ROOT:
    sys.addaudithook(_hook)
