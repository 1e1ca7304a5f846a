"""The ``constitutional`` critic batched across prompts vs one prompt at a time.

Same model, same settings, same initial responses; the candidate revises all
prompts in one ``revise`` call (each step one generator call over every prompt),
the baseline calls ``revise`` once per prompt. Runs alternate; prints the ratio.

    python benchmarks/critique_batching.py [--prompts 16] [--revisions 1] [--tokens 48]
"""

from __future__ import annotations

import argparse
import statistics

from _common import demo_model, prompts, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: demo model)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--revisions", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48, help="max_new_tokens per call")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from caikit_feedback.config import ConstitutionalCriticConfig
    from caikit_feedback.plugin import build_constitutional_critic
    from caikit_hf.plugin import HFGeneratorConfig, build_generator

    from caikit_core.constitutions import load_constitution
    from caikit_core.records import GenerationRequest, Sample, SamplingParams, conversation

    model = demo_model(args.model)
    generator = build_generator(HFGeneratorConfig(device="cpu", dtype="float32"), model=model)
    texts = prompts(args.prompts)
    requests = [
        GenerationRequest(f"p{i}", conversation(("user", t)), SamplingParams(args.tokens, 0.0))
        for i, t in enumerate(texts)
    ]
    initial = generator.generate(requests)
    samples = [
        Sample(f"s{i}", f"p{i}", r.messages, g.texts[0])
        for i, (r, g) in enumerate(zip(requests, initial, strict=True))
    ]
    critic = build_constitutional_critic(
        ConstitutionalCriticConfig(
            revisions=args.revisions, max_new_tokens=args.tokens, temperature=0.7
        ),
        generator=generator,
        constitution=load_constitution(None),
    )
    batched, sequential = [], []
    for _ in range(args.repeats):
        t_batched, together = timed(lambda: critic.revise(samples, seed=0))
        t_seq, alone = timed(lambda: [critic.revise([s], seed=0)[0] for s in samples])
        batched.append(t_batched)
        sequential.append(t_seq)
        same = sum(a == b for a, b in zip(alone, together, strict=True))
        print(
            f"run: batched {t_batched:.1f} s, sequential {t_seq:.1f} s; "
            f"{same}/{len(samples)} traces identical"
        )
    b, s = statistics.median(batched), statistics.median(sequential)
    print(
        f"{args.prompts} prompts, {args.revisions} revision(s), {args.tokens} tokens/call: "
        f"batched {b:.1f} s, per-prompt {s:.1f} s, speed-up {s / b:.2f}x"
    )


if __name__ == "__main__":
    main()
