"""The ``direct`` labeller with 5 few-shot examples: the ``hf`` generator's prefix reuse on vs off.

Anthropic's feedback principles and few-shot comparisons (the paper's prompt files,
``../shared/data/anthropic-cai/prompts``). Their few-shot comparisons carry no
principle, so each is asked under the principle of the question it precedes: the
few-shot block is shared by the questions of one principle (both orders of a
comparison, and every comparison that drew the same principle), not by the whole
batch. ``prefix_reuse = false`` also turns off the single-token fast path, so the
baseline scores "A" and "B" on a row each. Same generator and pairs; the setting
is flipped between runs, which alternate; prints the ratio of medians and the
largest difference between the two runs' probabilities.

    python benchmarks/prefix_reuse.py [--model PATH] [--pairs 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _common import ROOT, demo_model, timed
from labeller_vs_judge import make_pairs

PROMPT_FILES = ROOT.parent / "shared" / "data" / "anthropic-cai" / "prompts"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: demo model)")
    parser.add_argument("--constitution", default=str(PROMPT_FILES), help="Anthropic prompt files")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--few-shot", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per sampled answer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    args = parser.parse_args()

    import attrs
    import torch
    from caikit_feedback.config import DirectLabellerConfig
    from caikit_feedback.plugin import build_direct_labeller
    from caikit_hf.plugin import HFGeneratorConfig, build_generator

    from caikit_core.constitutions import load_constitution

    torch.set_num_threads(args.threads)
    generator = build_generator(
        HFGeneratorConfig(device="cpu", dtype="float32", max_batch_size=args.max_batch_size),
        model=demo_model(args.model),
    )
    constitution = load_constitution(args.constitution)
    labeller = build_direct_labeller(
        DirectLabellerConfig(few_shot=args.few_shot),
        generator=generator,
        constitution=constitution,
    )
    pairs = make_pairs(generator, args.pairs, args.tokens)
    reuse = generator.config
    plain = attrs.evolve(reuse, prefix_reuse=False)

    def run(config: Any) -> list[Any]:
        generator.config = config
        labels: list[Any] = labeller.label(pairs, seed=0)
        return labels

    principles = {labeller.principles(c.id, 0)[0].id for c in pairs}
    lengths = [
        len(generator._encode(generator._context_texts([(q.messages, "")]))[0])
        for q in labeller.questions(pairs[:1], 0)
    ]
    print(
        f"{len(pairs)} pairs x 2 orders, {len(principles)} distinct principles, "
        f"few_shot={args.few_shot}, ~{lengths[0]} tokens per question"
    )
    run(reuse)  # warm up
    t_on, t_off = [], []
    on: list[Any] = []
    off: list[Any] = []
    for _ in range(args.repeats):
        t, on = timed(lambda: run(reuse))
        t_on.append(t)
        t, off = timed(lambda: run(plain))
        t_off.append(t)
        print(f"run: prefix_reuse on {t_on[-1]:.2f} s, off {t:.2f} s")
    generator.config = reuse
    a, b = statistics.median(t_on), statistics.median(t_off)
    gap = max(abs(x.p_a - y.p_a) for x, y in zip(on, off, strict=True))
    print(
        f"prefix_reuse on {a:.2f} s ({len(pairs) / a:.2f} pairs/s), off {b:.2f} s "
        f"({len(pairs) / b:.2f} pairs/s): speed-up {b / a:.2f}x; max |p_a difference| {gap:.2e}"
    )


if __name__ == "__main__":
    main()
