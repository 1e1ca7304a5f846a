"""The TRL 1.12 side of ``ppo_step.py``: time PPO iterations of TRL 1.12's PPOTrainer.

Runs in its own virtual environment (TRL 1.12 with transformers, torch, accelerate
and datasets; see ``ppo_step.py`` for the commands) and imports nothing from
caikit. It prints one JSON line: ``{"side": "trl", "step_times": [...]}``, the
wall time of each PPO iteration (rollout + update), measured between TRL's
``on_step_end`` callbacks; model loading and trainer construction are not
included. ``ppo_step.py`` drops the first (warm-up) iteration. ``--no-gc`` turns
the trainer's per-iteration ``gc.collect()`` calls into no-ops, for a comparison of
the computation alone.

Settings mirror caikit's side: fp32, no gradient checkpointing, one response per
prompt of exactly ``--tokens`` tokens (no stop token), ``--batch`` prompts per
rollout in ``--batch / --mini-batch`` mini-batches, ``--epochs`` PPO epochs, the
policy, reference, value and reward models all loaded from ``--model`` (the
value and reward models as ``AutoModelForSequenceClassification`` with one label,
whose score head is seeded).

    python benchmarks/_trl112_ppo.py --model DIR --prompts FILE [--batch 8]
        [--mini-batch 4] [--tokens 32] [--epochs 2] [--steps 6] [--threads 1] [--no-gc]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
import types
import warnings
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="a JSON list of user prompts")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mini-batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-gc",
        action="store_true",
        help="skip the trainer's per-iteration gc.collect() calls (compute-only comparison)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import datasets
    import transformers
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo_module

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.disable_progress_bars()
    assert trl.__version__.startswith("1.12"), trl.__version__
    if args.no_gc:  # the trainer calls gc.collect() several times per iteration
        trl_ppo_module.gc = types.SimpleNamespace(collect=lambda *a: 0)

    tokenizer: Any = transformers.AutoTokenizer.from_pretrained(args.model)
    with open(args.prompts, encoding="utf-8") as fh:
        prompts = json.load(fh)
    rows = [
        {
            "input_ids": tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                ),
                add_special_tokens=False,
            )["input_ids"]
        }
        for p in prompts
    ]
    dataset = datasets.Dataset.from_list(rows)

    def load(kind: Any) -> Any:
        torch.manual_seed(args.seed)
        return kind.from_pretrained(args.model, dtype=torch.float32, num_labels=1)

    policy = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    value = load(transformers.AutoModelForSequenceClassification)
    reward = load(transformers.AutoModelForSequenceClassification)

    class Clock(transformers.TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1,
            num_mini_batches=args.batch // args.mini_batch,
            num_ppo_epochs=args.epochs,
            local_rollout_forward_batch_size=args.batch,
            response_length=args.tokens,
            stop_token=None,
            temperature=1.0,
            learning_rate=1e-5,
            kl_coef=0.05,
            total_episodes=args.batch * args.steps,
            num_sample_generations=0,
            gradient_checkpointing=False,
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=args.seed,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            eval_dataset=dataset,
            callbacks=[clock],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    times = [b - a for a, b in itertools.pairwise(clock.marks)]
    print(json.dumps({"side": "trl", "version": trl.__version__, "step_times": times}))


if __name__ == "__main__":
    main()
