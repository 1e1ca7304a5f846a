"""Training across processes (``num_processes > 1``): the fit launches its own workers.

:func:`launch` starts ``num_processes`` copies of ``python -m caikit_torch.distributed
JOB`` with the environment ``accelerate launch`` (torchrun) gives its workers:
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``. transformers' Trainer builds accelerate's ``PartialState`` from it, which
joins the process group (gloo on CPU, NCCL on CUDA, one GPU per ``LOCAL_RANK``), shards
every batch across the ranks and all-reduces the gradients (DDP). Each worker runs the
same fit on its shard; only rank 0 writes the artifact and the checkpoints.

Nothing is pickled: the job is a JSON file (the settings, the training rows and the
model *paths*; every worker loads the models itself) and rank 0 answers with a JSON
file of metrics and losses. A worker that raises writes its error to a JSON file and
exits 1; the launcher then stops the other workers and raises one error naming the
fit and the rank. Workers never outlive the launcher: it kills every worker it started
when it returns or raises (Ctrl-C included), and each worker exits by itself when its
parent process is gone (a SIGKILLed ``caikit run``).

accelerate's own Python launcher (``notebook_launcher``) forks the calling process,
which is unsafe in a process that has already started threads or CUDA, as ``caikit
run`` has; fresh interpreters avoid that.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caikit_core.errors import CaikitError, PluginError, TrainingStopped

__all__ = ["is_main_process", "launch", "main"]

#: Set in every worker: the pid of the process that launched it.
PARENT_ENV = "CAIKIT_TORCH_PARENT"
#: Seconds a worker is given to exit after SIGTERM before it is SIGKILLed.
GRACE_S = 5.0


def is_main_process() -> bool:
    """Whether this process writes artifacts: rank 0 of a launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _worker_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    # the workers import what this process imports, from the same places
    paths = [p for p in sys.path if p and Path(p).is_dir()]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if "OMP_NUM_THREADS" not in env:  # as accelerate launch does: share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            PARENT_ENV: str(os.getpid()),
        }
    )
    return env


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate every live worker, then kill the ones still there after the grace."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_error(scratch: Path) -> int:
    """The rank whose error report is the earliest."""
    reports = {
        int(path.stem.removeprefix("error-")): json.loads(path.read_text(encoding="utf-8"))
        for path in scratch.glob("error-*.json")
    }
    return min(reports, key=lambda rank: (reports[rank]["time_ns"], rank))


def _failure(who: str, fit: str, rank: int, world: int, code: int, scratch: Path) -> CaikitError:
    where = f"{who}: {fit} failed in worker rank {rank} of {world}"
    report = scratch / f"error-{rank}.json"
    if not report.is_file():
        how = f"signal {-code}" if code < 0 else f"status {code}"
        return PluginError(f"{where}: the worker exited with {how}")
    error = json.loads(report.read_text(encoding="utf-8"))
    message = f"{where}: {error['message']}"
    if error["kind"] == "stopped":
        return TrainingStopped(message)
    if error["kind"] == "caikit":
        return CaikitError(message)
    return PluginError(message)


def launch(
    entry: str,
    job: dict[str, Any],
    num_processes: int,
    *,
    fit: str,
    who: str,
) -> dict[str, Any]:
    """Run ``entry`` (``"module:function"``, taking the job and returning rank 0's
    JSON-able result) in ``num_processes`` workers and return rank 0's result.

    :param job: JSON-able settings, rows and model paths (see the module docstring).
    :param fit: the fit named in errors (``"sft"``, ``"dpo"``, ``"preference_model"``).
    :param who: the plugin named in errors.
    :raises TrainingStopped: a worker stopped on a training guard.
    :raises CaikitError: a worker raised a caikit error (bad data or settings).
    :raises PluginError: a worker raised anything else, or died.
    """
    with tempfile.TemporaryDirectory(prefix="caikit-ddp-") as tmp:
        scratch = Path(tmp)
        job_file = scratch / "job.json"
        level = logging.getLogger("caikit.torch").getEffectiveLevel()
        spec = {"entry": entry, "job": job, "log_level": level}
        job_file.write_text(json.dumps(spec), encoding="utf-8")
        port = _free_port()
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for rank in range(num_processes):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "caikit_torch.distributed", str(job_file)],
                        env=_worker_env(rank, num_processes, port),
                        stdin=subprocess.DEVNULL,
                    )
                )
            while True:
                codes = [proc.poll() for proc in procs]
                failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
                if failed:
                    # a rank that died without reporting (a signal, the OOM killer) is
                    # the cause; else the first to raise (the others lost their peer)
                    silent = [r for r in failed if not (scratch / f"error-{r}.json").is_file()]
                    _stop(procs)
                    rank = silent[0] if silent else _first_error(scratch)
                    code = procs[rank].returncode
                    raise _failure(who, fit, rank, num_processes, code, scratch)
                if all(code == 0 for code in codes):
                    break
                time.sleep(0.1)
        finally:
            _stop(procs)
        result: dict[str, Any] = json.loads((scratch / "result.json").read_text(encoding="utf-8"))
        return result


def _watch_parent(parent: int) -> None:
    """Exit this worker as soon as the process that launched it is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TrainingStopped):
        return "stopped"
    return "caikit" if isinstance(exc, CaikitError) else "other"


def main(argv: list[str] | None = None) -> int:
    """A worker: run the job file's entry on this rank; rank 0 writes ``result.json``."""
    args = sys.argv[1:] if argv is None else argv
    job_file = Path(args[0])
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if parent:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    rank = int(os.environ.get("RANK", "0"))
    try:
        spec = json.loads(job_file.read_text(encoding="utf-8"))
        _quiet_unless(int(spec.get("log_level", logging.WARNING)), rank)
        module, _, name = str(spec["entry"]).partition(":")
        entry: Callable[[dict[str, Any]], dict[str, Any]] = getattr(
            importlib.import_module(module), name
        )
        result = entry(spec["job"])
        if is_main_process():
            tmp = job_file.with_name("result.json.tmp")
            tmp.write_text(json.dumps(result), encoding="utf-8")
            os.replace(tmp, job_file.with_name("result.json"))
    except BaseException as exc:  # reported to the launcher, which names the rank
        message = str(exc) if isinstance(exc, CaikitError) else f"{type(exc).__name__}: {exc}"
        report = {"kind": _error_kind(exc), "message": message, "time_ns": time.time_ns()}
        tmp = job_file.with_name(f"error-{rank}.json.tmp")
        tmp.write_text(json.dumps(report), encoding="utf-8")
        os.replace(tmp, job_file.with_name(f"error-{rank}.json"))
        import traceback

        traceback.print_exc()
        return 1
    finally:
        _close_process_group()
    return 0


def _quiet_unless(level: int, rank: int) -> None:
    """Log as the launcher does (rank 0; the others warnings only), with progress bars
    only when it logs INFO (as :func:`caikit_torch.common.progress_bars` shows them)."""
    level = level if rank == 0 else max(level, logging.WARNING)
    logging.basicConfig(level=level, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if level > logging.INFO:
        datasets: Any = importlib.import_module("datasets")
        hf_logging: Any = importlib.import_module("transformers.utils.logging")
        datasets.utils.disable_progress_bars()
        hf_logging.disable_progress_bar()


def _close_process_group() -> None:
    torch = sys.modules.get("torch")
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
