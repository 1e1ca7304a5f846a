"""What ``caikit_jax.allocator`` costs torch: HF ``generate`` on the demo model with
glibc's default ``malloc``, with the allocator as a jax stage sets it (``tuned``: a
fixed 128 KiB mmap threshold, 2 arenas), and as a jax stage leaves it when it ends
(``restored``: ``tune`` then ``restore``), side by side.

In a run with ``plugin = "jax"`` the torch stages after a jax one (pairs, labels,
eval on the ``hf`` generator) run in the same process, with what the jax stage left.
Each arm runs in a fresh subprocess (glibc's settings are per process), the arms
alternate for ``--rounds`` rounds (order reversed every other round), and each
subprocess loads the model, warms up with one call, then times ``--calls`` calls of
``generate`` on ``--prompts`` prompts x ``--new-tokens`` greedy tokens::

    python benchmarks/malloc_tuning.py [--rounds 3] [--calls 3] [--prompts 8]
        [--new-tokens 32] [--model FOLDER]

Reported: the median call time of each arm, its ratio to ``default``, and each arm's
peak RSS (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import demo_model, prompts, status_mib  # noqa: E402

ARMS = ("default", "tuned", "restored")


def worker(args: argparse.Namespace) -> None:
    if args.arm != "default":
        sys.path.insert(0, str(HERE.parent / "plugins"))
        from caikit_jax import allocator

        assert allocator.tune()
        if args.arm == "restored":
            allocator.restore()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts(args.prompts)
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)

    def call() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                **batch,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return time.perf_counter() - start

    call()  # warm-up
    times = [call() for _ in range(args.calls)]
    print(json.dumps({"times": times, "peak_rss_mib": status_mib("VmHWM")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = demo_model(args.model)
    if args.arm:
        worker(args)
        return
    found: dict[str, list[float]] = {arm: [] for arm in ARMS}
    peaks: dict[str, float] = {arm: 0.0 for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
            cmd = [sys.executable, __file__, "--arm", arm, "--model", args.model]
            cmd += ["--calls", str(args.calls), "--prompts", str(args.prompts)]
            cmd += ["--new-tokens", str(args.new_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            found[arm].extend(result["times"])
            peaks[arm] = max(peaks[arm], result["peak_rss_mib"])
    medians = {arm: statistics.median(found[arm]) for arm in ARMS}
    for arm in ARMS:
        print(f"{arm:8s} median {medians[arm]:.2f} s per call, peak RSS {peaks[arm]:.0f} MiB")
    for arm in ARMS[1:]:
        print(f"{arm} / default: {medians[arm] / medians['default']:.3f}")


if __name__ == "__main__":
    main()
