"""caikit's PPO iteration vs TRL 1.12's ``PPOTrainer`` on the same tiny model and batch.

TRL removed ``PPOTrainer`` after 1.12, so the baseline runs in a separate virtual
environment. Set it up once (``torch==2.13.0`` resolves to the CPU wheel on local
disk; never pull a CUDA build)::

    python3 -m venv /tmp/trl112-venv
    /tmp/trl112-venv/bin/pip install trl==1.12.0 transformers==5.24.0 torch==2.13.0 \\
        accelerate datasets

Then, from the repository root, with caikit's environment::

    .venv/bin/python benchmarks/ppo_step.py --trl-python /tmp/trl112-venv/bin/python \\
        [--batch 8] [--mini-batch 4] [--tokens 32] [--epochs 2] [--steps 6] [--repeats 3] \\
        [--threads 1] [--hidden 32] [--layers 2] [--trl-no-gc]

The script builds one tiny random Llama (``build_tiny_llama``) in a temporary
folder, then runs each side in its own subprocess, alternating the order, on
identical settings: fp32 on the CPU, ``--threads`` torch threads, the same 20
chat prompts, ``--batch`` prompts per rollout, exactly ``--tokens`` sampled
tokens per response (the end-of-sequence token is disabled on both sides),
``--batch / --mini-batch`` mini-batches, ``--epochs`` PPO epochs, the policy and
the reference loaded from the folder, and a reward model
(``AutoModelForSequenceClassification`` on the same folder, seeded score head)
scoring prompt + response. On TRL's side the reward model gets token ids; on
caikit's side the reward function re-tokenises the chat-formatted prompt and the
response text and runs the same model, as a caikit preference model would.

Each side times ``--steps`` PPO iterations (rollout + update; model loading and
set-up excluded) and the first one is dropped as warm-up. The script prints
each side's median iteration time per repeat, and the ratio caikit / TRL of the
medians over all repeats (target: <= 1.1).

What differs by design: TRL 1.12 trains a separate value model (a second
transformer: forward in the rollout, forward + backward in every mini-batch) and
calls ``gc.collect()`` several times per iteration; caikit's value function is a
linear head on the policy (one forward for log-probabilities and values), and
its rollout recomputes the policy's log-probabilities with a forward pass instead
of keeping the sampler's scores. ``--trl-no-gc`` turns TRL's ``gc.collect()``
calls into no-ops, to compare the computation alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def caikit_side(args: argparse.Namespace) -> None:
    """Time caikit's PPO iterations; print ``{"side": "caikit", "step_times": [...]}``."""
    import importlib.util
    import time
    import warnings

    if importlib.util.find_spec("caikit_torch") is None:
        sys.path.insert(0, str(ROOT / "plugins"))
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import caikit_torch.ppo as ppo

    from caikit_core.records import Conversation, conversation

    # Both sides sample exactly --tokens tokens: no end-of-sequence token here either.
    ppo._Trainer._eos_ids = lambda self, model: []  # type: ignore[method-assign]

    texts = json.loads(Path(args.prompts).read_text(encoding="utf-8"))
    prompts = [conversation(("user", text)) for text in texts]
    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    torch.manual_seed(args.seed)
    rm: Any = transformers.AutoModelForSequenceClassification.from_pretrained(
        args.model, dtype=torch.float32, num_labels=1
    ).eval()

    @torch.no_grad()
    def reward(convs: list[Conversation], responses: list[str]) -> list[float]:
        chats = [
            tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in conv],
                add_generation_prompt=True,
                tokenize=False,
            )
            + response
            for conv, response in zip(convs, responses, strict=True)
        ]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        scores = rm(**batch).logits  # [batch, 1], pooled at the last non-pad token
        return [float(x) for x in scores[:, 0]]

    marks: list[float] = []
    from caikit_core.training.settings import PPOSettings

    settings = PPOSettings(
        steps=args.steps,
        rollout_batch_size=args.batch,
        mini_batch_size=args.mini_batch,
        epochs=args.epochs,
        learning_rate=1e-5,
        max_new_tokens=args.tokens,
        temperature=1.0,
        kl_coef=0.05,
    )
    with tempfile.TemporaryDirectory() as out:
        ppo.train_ppo(
            args.model,
            args.model,
            reward,
            prompts,
            settings,
            Path(out),
            options=ppo.PPOOptions(seed=args.seed, device="cpu"),
            on_step=lambda m: marks.append(time.perf_counter()),
        )
    # Iteration k's time is marks[k] - marks[k - 1]; iteration 0 (warm-up) has none.
    times = [b - a for a, b in itertools.pairwise(marks)]
    print(json.dumps({"side": "caikit", "step_times": times}))


def run_side(cmd: list[str]) -> list[float]:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return [float(t) for t in json.loads(line)["step_times"]]
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"{cmd[1]} failed with status {proc.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trl-python", default="/tmp/trl112-venv/bin/python")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="PPO iterations per run (>= 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=32, help="tiny model width")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trl-no-gc", action="store_true", help="see the module docstring")
    parser.add_argument("--side", choices=["caikit"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "caikit":
        caikit_side(args)
        return
    if args.steps < 2 or args.batch % args.mini_batch:
        raise SystemExit("need --steps >= 2 and --mini-batch dividing --batch")
    if not Path(args.trl_python).exists():
        raise SystemExit(f"no TRL 1.12 interpreter at {args.trl_python}: see the docstring")

    from caikit_core.testing.tiny_models import TINY_CORPUS, build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llama(
            Path(tmp) / "model",
            hidden_size=args.hidden,
            layers=args.layers,
            intermediate_size=2 * args.hidden,
        )
        prompts = Path(tmp) / "prompts.json"
        prompts.write_text(json.dumps(list(TINY_CORPUS)), encoding="utf-8")
        common = [
            "--model", str(model), "--prompts", str(prompts),
            "--batch", str(args.batch), "--mini-batch", str(args.mini_batch),
            "--tokens", str(args.tokens), "--epochs", str(args.epochs),
            "--steps", str(args.steps), "--threads", str(args.threads),
            "--seed", str(args.seed),
        ]  # fmt: skip
        ours = [sys.executable, str(HERE / "ppo_step.py"), "--side", "caikit", *common]
        theirs = [args.trl_python, str(HERE / "_trl112_ppo.py"), *common]
        if args.trl_no_gc:
            theirs.append("--no-gc")
        per_run: dict[str, list[float]] = {"caikit": [], "trl": []}
        for repeat in range(args.repeats):
            order = [("caikit", ours), ("trl", theirs)]
            if repeat % 2:
                order.reverse()
            for name, cmd in order:
                times = run_side(cmd)
                if name == "trl":
                    times = times[1:]  # TRL's first interval is iteration 0 (warm-up)
                per_run[name].append(statistics.median(times))
                print(
                    f"repeat {repeat}: {name:6s} median {per_run[name][-1]:.3f} s/iteration "
                    f"over {len(times)} iterations",
                    flush=True,
                )
    ours_s, theirs_s = statistics.median(per_run["caikit"]), statistics.median(per_run["trl"])
    gc_note = ", TRL's gc.collect() disabled" if args.trl_no_gc else ""
    print(
        f"tiny Llama (hidden {args.hidden}, {args.layers} layers), batch {args.batch} x "
        f"{args.tokens} tokens, {args.batch // args.mini_batch} mini-batches, "
        f"{args.epochs} PPO epochs, {args.threads} thread(s){gc_note}: "
        f"caikit {ours_s:.3f} s/iteration, TRL 1.12 {theirs_s:.3f} s/iteration, "
        f"ratio caikit/TRL {ours_s / theirs_s:.3f} (target <= 1.1)"
    )


if __name__ == "__main__":
    main()
