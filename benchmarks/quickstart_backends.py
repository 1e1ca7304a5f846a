"""The quickstart on JAX vs the quickstart on PyTorch, whole runs side by side.

Runs ``caikit run`` twice in one invocation, once with ``examples/quickstart.toml`` as
it is (``plugin = "torch"`` for the preference model and the policy optimiser) and once
with those two lines set to ``"jax"``, and compares the stages that depend on the
backend: SFT, the answer pairs (sampled from the SFT checkpoint), the labels, the
preference model, the policy (PPO) and the evaluation::

    python benchmarks/quickstart_backends.py --base runs/quickstart [--out DIR]
        [--order torch jax]

``--base`` is a finished quickstart run folder (``make quickstart`` writes
``runs/quickstart``); each side starts from a copy of it with every stage from SFT on
removed (folders and ``metrics.jsonl`` lines), so both sides run the same stages on the
same prompts, responses and revisions, one after the other, each in a fresh
``caikit run`` process. Both sides' stage fingerprints are their own, so the copy
reruns nothing it should not. JAX compiles into a fresh persistent cache
(``CAIKIT_JAX_COMPILATION_CACHE`` in ``--out``), so its compile time is a cold one.

Reported per stage and side: the stage's seconds (``metrics.jsonl``), JAX's
``time/compile`` and the seconds without it; per side, the peak RSS of the
``caikit run`` process (``ru_maxrss`` from ``wait4``), the highest RSS sampled (every
0.5 s) during each stage, and the wall time; and the
stages' result metrics (preference-model accuracy, PPO's reward and KL), so a faster
side that learned nothing shows; and PPO's phases (``time/generate``, ``time/score``,
``time/train`` of each step's row in ``metrics.jsonl``) per step after the first, which
compiles on JAX. Written as JSON to ``--out``/result.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import status_mib  # noqa: E402

SIDES = ("torch", "jax")
#: The stages a backend change reruns, in the run's order.
RERUN = ("sft", "pairs", "labels", "preference_model", "policy", "eval")
#: The phases of a PPO step both backends time (``time/<phase>`` in each step's row).
PHASES = ("generate", "score", "train")
#: Result metrics printed per stage (when the stage reports them).
RESULTS = {
    "sft": ("loss_first", "loss_last"),
    "preference_model": ("accuracy", "train_accuracy", "eval_accuracy"),
    "policy": ("reward_first", "reward_last", "score_first", "score_last", "kl_last"),
}


def run_file(side: str, out: Path) -> str:
    """The quickstart run file for ``side``, with absolute paths."""
    text = (ROOT / "examples" / "quickstart.toml").read_text(encoding="utf-8")
    text = re.sub(r'^plugin = "torch"', f'plugin = "{side}"', text, flags=re.M)
    text = re.sub(r"^output_dir = .*$", f'output_dir = "{out}"', text, count=1, flags=re.M)
    prompts = ROOT / "examples" / "prompts.jsonl"
    return re.sub(r'^prompts = "prompts.jsonl"', f'prompts = "{prompts}"', text, flags=re.M)


def prepare(base: Path, folder: Path) -> None:
    """Copy ``base`` to ``folder`` without the stages a backend change reruns."""
    shutil.copytree(base, folder)
    for stage in RERUN:
        shutil.rmtree(folder / "stages" / stage, ignore_errors=True)
    metrics = folder / "metrics.jsonl"
    kept = [
        line
        for line in metrics.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["stage"] not in RERUN
    ]
    metrics.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


class RssSampler(threading.Thread):
    """Samples a process's RSS (``VmRSS``) every ``interval`` seconds, with the time."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            rss = status_mib("VmRSS", self.pid)
            if rss is None:
                return
            self.samples.append((time.time(), rss))

    def stop(self) -> None:
        self._done.set()
        self.join()

    def peak(self, start: float, end: float) -> float:
        """The highest RSS sampled between ``start`` and ``end`` (``time.time()``)."""
        return max((rss for t, rss in self.samples if start <= t <= end), default=0.0)


def run_side(side: str, base: Path, out: Path) -> dict[str, Any]:
    """Run the quickstart's backend-dependent stages on ``side``; its measurements."""
    work = out / side
    run_dir = work / "run"
    prepare(base, run_dir)
    toml = work / "quickstart.toml"
    toml.write_text(run_file(side, run_dir), encoding="utf-8")
    env = {**os.environ, "CAIKIT_JAX_COMPILATION_CACHE": str(out / f"xla-{side}")}
    log = work / "caikit.log"
    started = time.perf_counter()
    caikit = Path(sys.executable).with_name("caikit")
    with log.open("w", encoding="utf-8") as sink:
        child = subprocess.Popen(
            [str(caikit), "run", "--new-run", str(toml)], stdout=sink, stderr=sink, env=env
        )
        sampler = RssSampler(child.pid)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        sampler.stop()
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{side}: caikit run failed, see {log}")
    stages: dict[str, dict[str, Any]] = {}
    steps: list[dict[str, float]] = []  # the policy stage's step rows
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["type"] == "step" and row["stage"] == "policy":
            steps.append({k: float(row["metrics"].get(f"time/{k}", 0.0)) for k in PHASES})
        if row["type"] == "stage" and row["stage"] in RERUN:
            metrics = row["metrics"]
            compile_s = float(metrics.get("time/compile", 0.0))
            end = float(row["finished_at"])
            stages[row["stage"]] = {
                "peak_rss_mib": sampler.peak(end - float(row["seconds"]), end),
                "seconds": row["seconds"],
                "compile": compile_s,
                "without_compile": row["seconds"] - compile_s,
                "results": {k: metrics[k] for k in RESULTS.get(row["stage"], ()) if k in metrics},
            }
    later = steps[1:]  # after the first, which compiles on jax
    phases = {k: sum(r[k] for r in later) / len(later) if later else 0.0 for k in PHASES}
    return {
        "wall": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stages": stages,
        "ppo_phases_per_later_step": phases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--out", type=Path, default=Path("/tmp/caikit-quickstart-backends"))
    parser.add_argument("--order", nargs=2, choices=SIDES, default=list(SIDES))
    args = parser.parse_args()
    base: Path = args.base.resolve()
    if not (base / "stages" / "revisions").is_dir():
        raise SystemExit(f"{base} is not a finished quickstart run (make quickstart)")
    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    load = os.getloadavg()[0]
    sides = {side: run_side(side, base, out) for side in args.order}
    result = {"load_before": load, "load_after": os.getloadavg()[0], "sides": sides}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    torch_side, jax_side = sides["torch"], sides["jax"]
    print(f"load average before {load:.2f}, after {result['load_after']:.2f}")
    print(
        "| stage | torch s | jax s | jax compile s | jax / torch | without compile "
        "| peak RSS MiB torch / jax |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for stage in RERUN:
        t, j = torch_side["stages"].get(stage), jax_side["stages"].get(stage)
        if t is None or j is None:
            continue
        print(
            f"| {stage} | {t['seconds']:.1f} | {j['seconds']:.1f} | {j['compile']:.1f} | "
            f"{j['seconds'] / t['seconds']:.2f} | "
            f"{j['without_compile'] / t['without_compile']:.2f} | "
            f"{t['peak_rss_mib']:.0f} / {j['peak_rss_mib']:.0f} |"
        )
    print(
        f"| whole run | {torch_side['wall']:.1f} | {jax_side['wall']:.1f} | | "
        f"{jax_side['wall'] / torch_side['wall']:.2f} | |"
    )
    peak_t, peak_j = torch_side["peak_rss_mib"], jax_side["peak_rss_mib"]
    print(f"| peak RSS MiB | {peak_t:.0f} | {peak_j:.0f} | | {peak_j / peak_t:.2f} | |")
    print("| PPO, per step after the first | " + " | ".join(f"{k} s" for k in PHASES) + " | sum |")
    print("| --- |" + " --- |" * (len(PHASES) + 1))
    for side in SIDES:
        phases = sides[side]["ppo_phases_per_later_step"]
        cells = " | ".join(f"{phases[k]:.2f}" for k in PHASES)
        print(f"| {side} | {cells} | {sum(phases.values()):.2f} |")
    for stage in RESULTS:
        for side in SIDES:
            values = sides[side]["stages"].get(stage, {}).get("results")
            if values:
                print(f"{stage} ({side}): {json.dumps(values)}")


if __name__ == "__main__":
    main()
