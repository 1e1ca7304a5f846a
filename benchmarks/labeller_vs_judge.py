"""The ``direct`` labeller vs a generate-and-parse pairwise judge, on the same model and pairs.

The judge does what TRL's former ``HfPairwiseJudge`` did with a local model: for
each pair, one ``model.generate`` call producing ONE token on the labeller's own
prompt (the same chat-formatted question, answer opened with "The answer is: ("),
parsed as "A" or "B". It sees one order of the options and returns a hard choice.
The labeller is timed with its defaults (both orders, so twice the questions, and
a probability rather than a choice) and, for reference, with ``debias = false``
(the judge's amount of work). Pairs are two sampled answers of the demo model to
the example prompts (made once, not timed). Runs alternate; prints pairs/s and the
ratio of medians.

    python benchmarks/labeller_vs_judge.py [--model PATH] [--pairs 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from _common import demo_model, prompts, timed


def make_pairs(generator: Any, count: int, tokens: int) -> list[Any]:
    """``count`` comparisons: two sampled answers per example prompt (cycled, re-seeded)."""
    from caikit_core.records import (
        Comparison,
        GenerationRequest,
        SamplingParams,
        conversation,
        stable_id,
    )

    texts = prompts(min(count, 24))
    requests = [
        GenerationRequest(
            f"p{i}",
            conversation(("user", texts[i % len(texts)])),
            SamplingParams(max_new_tokens=tokens, temperature=1.0),
            n=2,
            seed=i,
        )
        for i in range(count)
    ]
    pairs = []
    for request, generation in zip(requests, generator.generate(requests), strict=True):
        a, b = (text.strip() for text in generation.texts)
        pid = stable_id("prompt", request.id)
        pairs.append(Comparison(stable_id("pair", pid, a, b), pid, request.messages, a, b))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: demo model)")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per sampled answer")
    parser.add_argument("--few-shot", type=int, default=0, help="few-shot examples (both sides)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared CPU)"
    )
    args = parser.parse_args()

    import torch
    from caikit_feedback.config import DirectLabellerConfig
    from caikit_feedback.labeller import ANSWER_PREFIX
    from caikit_feedback.plugin import build_direct_labeller
    from caikit_hf.plugin import HFGeneratorConfig, build_generator

    from caikit_core.constitutions import load_constitution

    torch.set_num_threads(args.threads)
    generator = build_generator(
        HFGeneratorConfig(device="cpu", dtype="float32"), model=demo_model(args.model)
    )
    model, tok = generator.model, generator.tokenizer
    constitution = load_constitution(None)
    pairs = make_pairs(generator, args.pairs, args.tokens)

    def labeller(debias: bool) -> Any:
        config = DirectLabellerConfig(few_shot=args.few_shot, debias=debias)
        return build_direct_labeller(config, generator=generator, constitution=constitution)

    debiased, one_order = labeller(True), labeller(False)
    # The judge's prompts: the labeller's own questions, in order AB, same principles.
    texts = [
        str(
            tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in query.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        )
        + ANSWER_PREFIX
        for query in one_order.questions(pairs, 0)
    ]
    encoded = [tok(text, return_tensors="pt", add_special_tokens=False) for text in texts]
    pad = generator.pad_id

    def judge() -> list[float]:
        choices = []
        with torch.inference_mode():
            for batch in encoded:
                out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=pad)
                word = tok.decode(out[0, batch["input_ids"].shape[1] :]).strip()
                choices.append(
                    1.0 if word.startswith("A") else 0.0 if word.startswith("B") else 0.5
                )
        return choices

    judge()
    debiased.label(pairs, seed=0)  # warm up
    t_judge, t_label, t_one = [], [], []
    choices: list[float] = []
    labels: list[Any] = []
    for _ in range(args.repeats):
        t, choices = timed(judge)
        t_judge.append(t)
        t_label.append(timed(lambda: debiased.label(pairs, seed=0))[0])
        t, labels = timed(lambda: one_order.label(pairs, seed=0))
        t_one.append(t)
        print(f"run: judge {t_judge[-1]:.2f} s, direct {t_label[-1]:.2f} s, one order {t:.2f} s")
    j, d, o = (statistics.median(t) for t in (t_judge, t_label, t_one))
    n = len(pairs)
    unparsed = sum(c == 0.5 for c in choices)
    agree = sum(
        (c == 1.0) == (x.p_a > 0.5) for c, x in zip(choices, labels, strict=True) if c != 0.5
    )
    print(
        f"{n} pairs, few_shot={args.few_shot}: judge {n / j:.2f} pairs/s, "
        f"direct (debias) {n / d:.2f} pairs/s, direct (one order) {n / o:.2f} pairs/s"
    )
    print(
        f"speed-up of direct over the judge: {j / d:.2f}x with debias (2 questions per pair), "
        f"{j / o:.2f}x with one order; judge answers not A/B: {unparsed}/{n}; "
        f"one-order labeller agrees with the judge on {agree}/{n - unparsed}"
    )


if __name__ == "__main__":
    main()
