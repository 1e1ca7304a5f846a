"""The ``ray`` executor vs ``local`` on the map stages of one run file (issue 14, item 5).

The same run file (SmolLM2-135M-Instruct, red-team prompts from hh-rlhf's
harmless-base test split, phases SL and RL with ``sl.sft = false`` so the pairs come
from the same model, one critique-revision, one-step fits) runs through
``caikit run`` in a fresh subprocess per side, sides interleaved round by round:

- ``local``: the ``local`` executor, one process, torch with 2 threads;
- ``ray-1x2``: a local Ray with 2 CPUs, one actor reserving both (equal resources:
  the Ray overhead);
- ``ray-2x1``: the same Ray, two actors of one CPU each (Ray sets an actor's
  ``OMP_NUM_THREADS`` to its CPUs, so each torch has one thread).

Each stage's time is read from its manifest (``timings.seconds``: model loading
and every batch, as the runner measured it) and printed as a ratio to ``local``.
Then the driver's peak RSS (``ru_maxrss`` of the ``caikit`` process itself, not of
Ray's workers) with ``--prompts`` and ten times as many, SL phase only, on each
executor: flat means the driver streams shards instead of holding the stage.

    python benchmarks/ray_vs_local.py [--prompts 64] [--rounds 2] [--rss-prompts 16]

Run it on an otherwise idle machine; it prints one JSON line per run and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import ROOT, demo_model

PROMPTS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
MAP_STAGES = ("responses", "revisions", "pairs", "labels")
EXECUTORS: dict[str, str] = {
    "local": '[executor]\nplugin = "local"\n',
    "ray-1x2": (
        '[executor]\nplugin = "ray"\nnum_cpus = 2\nactors = 1\nactor_cpus = 2\nprogress = false\n'
    ),
    "ray-2x1": (
        '[executor]\nplugin = "ray"\nnum_cpus = 2\nactors = 2\nactor_cpus = 1\nprogress = false\n'
    ),
}

# The child: run the CLI in this process and report this process's own peak RSS.
CHILD = """
import json, resource, sys
from caikit_core.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as f:
    json.dump({"rc": code, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
"""


def run_file(model: str, out: Path, executor: str, prompts: int, phases: str) -> str:
    """The run file of one side; ``phases`` is ``"sl"`` or ``"sl", "rl"``."""
    return f"""
output_dir = "{out}"
phases = [{phases}]
seed = 0
batch_size = 16
shard_size = 16

[models]
policy = "{model}"

[data]
prompts = "{PROMPTS}"
limit = {prompts}

[sl]
sft = false

[sl.sampling]
max_new_tokens = 24
temperature = 0.7

[rl.sampling]
max_new_tokens = 24
temperature = 1.0

[generator]
plugin = "hf"
dtype = "float32"

[critic]
plugin = "constitutional"
revisions = 1
max_new_tokens = 24

[labeller]
plugin = "direct"
debias = true

[preference_model]
plugin = "torch"
max_steps = 1
batch_size = 4
max_length = 256

[policy_optimiser]
plugin = "torch"
algorithm = "dpo"

[policy_optimiser.dpo]
max_steps = 1
batch_size = 4
max_length = 256

{EXECUTORS[executor]}"""


def one_run(
    work: Path, name: str, model: str, executor: str, prompts: int, phases: str
) -> dict[str, Any]:
    """``caikit run`` of one side in a fresh process; its stage times and driver RSS."""
    out = work / name
    config = work / f"{name}.toml"
    config.write_text(run_file(model, out, executor, prompts, phases), encoding="utf-8")
    report = work / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    subprocess.run(
        [sys.executable, "-c", CHILD, str(report), "--quiet", "run", str(config)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    child = json.loads(report.read_text(encoding="utf-8"))
    if child["rc"] not in (0, None):
        raise SystemExit(f"{name}: caikit run exited {child['rc']}")
    stages: dict[str, float] = {}
    for manifest in out.glob("stages/*/*/manifest.json"):
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("complete"):
            stages[data["stage"]] = float(data["timings"]["seconds"])
    row = {
        "run": name,
        "executor": executor,
        "prompts": prompts,
        "maxrss_mib": child["maxrss_kib"] / 1024,
        "stages": stages,
    }
    print(json.dumps(row), flush=True)
    return row


def records(out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every map and source stage's rows of a run, by stage and record id."""
    import pyarrow.parquet as pq

    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for shard in sorted(out.glob("stages/*/*/shard-*.parquet")):
        stage = shard.parent.parent.name
        for row in pq.read_table(shard).to_pylist():
            rows.setdefault(stage, {})[row["id"]] = row
    return rows


def compare(base: Path, other: Path) -> str:
    """How many records of ``other`` equal ``base``'s, stage by stage."""
    a, b = records(base), records(other)
    cells = []
    for stage in ("prompts", *MAP_STAGES):
        same = sum(1 for i, row in a.get(stage, {}).items() if b.get(stage, {}).get(i) == row)
        cells.append(f"{stage} {same}/{len(a.get(stage, {}))}")
    return ", ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: demo model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rss-prompts", type=int, default=16)
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    model = demo_model(args.model)

    with tempfile.TemporaryDirectory(prefix="caikit-bench-ray-") as tmp:
        work = Path(tmp)
        times: dict[str, dict[str, list[float]]] = {e: {} for e in EXECUTORS}
        for r in range(args.rounds):
            order = list(EXECUTORS) if r % 2 == 0 else list(reversed(EXECUTORS))
            for executor in order:
                row = one_run(work, f"{executor}-r{r}", model, executor, args.prompts, '"sl", "rl"')
                for stage in MAP_STAGES:
                    times[executor].setdefault(stage, []).append(row["stages"][stage])

        print(f"\nmap stages, {args.prompts} prompts, median of {args.rounds} round(s):")
        others = [e for e in EXECUTORS if e != "local"]
        print(f"{'stage':<10} {'local s':>9} " + " ".join(f"{e:>16}" for e in others))
        for stage in MAP_STAGES:
            base = statistics.median(times["local"][stage])
            cells = []
            for executor in others:
                t = statistics.median(times[executor][stage])
                cells.append(f"{t:7.1f} s {t / base:5.2f}x")
            print(f"{stage:<10} {base:9.1f} " + " ".join(f"{c:>16}" for c in cells))

        print("\nrecords equal to local's (round 0), by id and content:")
        for executor in others:
            print(f"{executor:<8} {compare(work / 'local-r0', work / f'{executor}-r0')}")

        if args.skip_rss:
            return
        print("\ndriver peak RSS (SL phase only):")
        for executor in ("local", "ray-2x1"):
            small = one_run(work, f"rss-{executor}-1x", model, executor, args.rss_prompts, '"sl"')
            large = one_run(
                work, f"rss-{executor}-10x", model, executor, 10 * args.rss_prompts, '"sl"'
            )
            print(
                f"{executor:<8} {args.rss_prompts} prompts {small['maxrss_mib']:7.0f} MiB, "
                f"{10 * args.rss_prompts} prompts {large['maxrss_mib']:7.0f} MiB "
                f"({large['maxrss_mib'] / small['maxrss_mib']:.2f}x)"
            )


if __name__ == "__main__":
    main()
