"""The ``hf`` generator vs raw ``model.generate`` on the same left-padded batch.

Greedy, end-of-sequence disabled in both so both produce exactly ``--tokens``
tokens per row. The generator's time includes chat templating, tokenising and
decoding; ``generate``'s does not. Runs alternate; prints the ratio of medians.

    python benchmarks/generator_overhead.py [--batch 16] [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

from _common import demo_model, prompts, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: demo model)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch
    from caikit_hf.plugin import HFGeneratorConfig, build_generator

    from caikit_core.records import GenerationRequest, SamplingParams, conversation

    model_path = demo_model(args.model)
    gen = build_generator(HFGeneratorConfig(device="cpu", dtype="float32"), model=model_path)
    model, tok = gen.model, gen.tokenizer
    texts = prompts(args.batch)
    requests = [
        GenerationRequest(f"p{i}", conversation(("user", t)), SamplingParams(args.tokens, 0.0))
        for i, t in enumerate(texts)
    ]
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in texts
    ]
    tok.padding_side = "left"
    batch = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # both run the full length

    def raw() -> object:
        with torch.no_grad():
            return model.generate(
                **batch,
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )

    def ours() -> object:
        return gen.generate(requests)

    gen.eos_ids = frozenset()  # the generator, too, runs the full length
    raw()
    ours()  # warm up both
    t_raw, t_ours = [], []
    for _ in range(args.repeats):
        t_raw.append(timed(raw)[0])
        t_ours.append(timed(ours)[0])
    model.generation_config.eos_token_id = eos
    r, o = statistics.median(t_raw), statistics.median(t_ours)
    print(
        f"batch {args.batch} x {args.tokens} tokens, greedy: model.generate {r:.2f} s, "
        f"hf generator {o:.2f} s, ratio {o / r:.3f} (overhead {100 * (o / r - 1):+.1f}%)"
    )


if __name__ == "__main__":
    main()
