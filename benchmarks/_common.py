"""Shared helpers for the benchmarks (not part of the package)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def demo_model(path: str | None) -> str:
    """The model to benchmark: ``path``, else the fetched demo model."""
    if path:
        return path
    from caikit_hf.models import fetched_model

    folder = fetched_model("smollm2-135m-instruct")
    if folder is None:
        raise SystemExit("fetch the demo model first: caikit models fetch smollm2-135m-instruct")
    return str(folder)


def prompts(count: int) -> list[str]:
    lines = (ROOT / "examples" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prompt"] for line in lines[:count]]


def status_mib(field: str, pid: int | str = "self") -> float | None:
    """``field`` of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in MiB; ``None`` when
    the process is gone or has no such line."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result
