"""vLLM vs hf: generation tokens/s and the labels stage, side by side on one model.

Runs in the vLLM environment (``make setup-vllm``; on a GPU machine
``make setup-vllm VLLM_EXTRA=vllm VLLM_CONSTRAINTS=/dev/null``), with the demo model
fetched (``caikit models fetch smollm2-135m-instruct``)::

    .venv-vllm/bin/python benchmarks/gpu/vllm_vs_hf.py --device cuda            # 256 x 128
    .venv-vllm/bin/python benchmarks/gpu/vllm_vs_hf.py --device cpu --prompts 16 --new-tokens 32

Both generators are built through caikit's registry exactly as a run builds them, get
the same requests (the prompts of examples/prompts.jsonl, repeated to ``--prompts``,
sampled at temperature 0.7 with per-request seeds), and run alternately
(``--rounds``, after one warm-up call each, which includes vLLM's compilation). Then the
``direct`` labeller labels the same pairs on each generator. Last, the torch PPO loop
runs ``--ppo-steps`` steps twice from the same model, with its rollouts sampled
in-process (HF ``generate``, the default ``rl.rollouts = "optimiser"``) and from the
vllm engine (``rl.rollouts = "generator"``, the updated weights pushed into it after
every step), rewarded by response length (the reward model's cost is the same both
ways and is not what is measured). Prints one table of medians and the vllm/hf ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import demo_model, prompts


def build(role: str, name: str, settings: dict[str, Any], **kwargs: Any) -> Any:
    from caikit_core.converter import structure
    from caikit_core.plugins import get_registry

    spec = get_registry().get(role, name)
    config = structure(settings, spec.config_cls) if spec.config_cls else None
    return spec.build(config, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the fetched demo model)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ppo-steps", type=int, default=4)
    parser.add_argument("--ppo-batch", type=int, default=64, help="PPO rollout batch size")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from caikit_core.records import Comparison, GenerationRequest, SamplingParams, conversation

    model = demo_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = prompts(24)
    questions = [texts[i % len(texts)] for i in range(args.prompts)]
    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7)
    requests = [
        GenerationRequest(f"r{i}", conversation(("user", q)), sampling, 1, seed=i)
        for i, q in enumerate(questions)
    ]
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    generators = {
        "hf": build(
            "generator",
            "hf",
            {"device": args.device, "dtype": dtype, "max_batch_size": 64},
            model=model,
        ),
        "vllm": build(
            "generator",
            "vllm",
            {
                "dtype": dtype,
                "gpu_memory_utilization": 0.3,
                "enforce_eager": args.device == "cpu",
            },
            model=model,
        ),
    }
    for gen in generators.values():  # warm-up: loads, compiles, captures graphs
        gen.generate(requests[:4])

    seconds: dict[str, list[float]] = {name: [] for name in generators}
    tokens: dict[str, int] = {}
    outputs: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, gen in generators.items():
            start = time.perf_counter()
            out = gen.generate(requests)
            seconds[name].append(time.perf_counter() - start)
            outputs[name] = [g.texts[0] for g in out]
            tokens[name] = sum(
                len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in outputs[name]
            )

    pairs = [
        Comparison(f"c{i}", f"p{i}", r.messages, a, b)
        for i, (r, a, b) in enumerate(
            zip(requests, outputs["hf"], outputs["vllm"][1:] + outputs["vllm"][:1], strict=True)
        )
    ]
    label_seconds: dict[str, list[float]] = {name: [] for name in generators}
    from caikit_core.constitutions import load_constitution

    constitution = load_constitution(None)
    for _ in range(args.rounds):
        for name, gen in generators.items():
            labeller = build("labeller", "direct", {}, generator=gen, constitution=constitution)
            start = time.perf_counter()
            labeller.label(pairs, seed=0)
            label_seconds[name].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in seconds.items()}
    lab = {k: statistics.median(v) for k, v in label_seconds.items()}
    print(
        f"model {model}, device {args.device}, {args.prompts} prompts x {args.new_tokens} "
        f"new tokens, {args.rounds} rounds (medians)"
    )
    print("| measure | hf | vllm | vllm / hf speed |")
    print("| --- | --- | --- | --- |")
    hf_tps, v_tps = tokens["hf"] / med["hf"], tokens["vllm"] / med["vllm"]
    print(f"| generation tokens/s | {hf_tps:.1f} | {v_tps:.1f} | {v_tps / hf_tps:.2f}x |")
    print(
        f"| labels stage, {len(pairs)} pairs (s) | {lab['hf']:.2f} | {lab['vllm']:.2f} | "
        f"{lab['hf'] / lab['vllm']:.2f}x |"
    )
    ppo = {
        name: ppo_seconds(args, model, rollouts)
        for name, rollouts in (("hf", None), ("vllm", generators["vllm"]))
    }
    print(
        f"| PPO step, {args.ppo_batch} rollouts x {args.new_tokens} tokens (s, median; "
        f"generation share) | {ppo['hf'][0]:.2f} ({ppo['hf'][1]:.0%}) | "
        f"{ppo['vllm'][0]:.2f} ({ppo['vllm'][1]:.0%}) | {ppo['hf'][0] / ppo['vllm'][0]:.2f}x |"
    )
    generators["vllm"].close()


def ppo_seconds(args: argparse.Namespace, model: str, rollouts: Any) -> tuple[float, float]:
    """The median seconds of a PPO step after the first, and the share spent sampling
    (with weight pushes, for a rollout generator)."""
    import tempfile

    from caikit_torch.ppo import PPOOptions, train_ppo

    from caikit_core.records import conversation
    from caikit_core.training.settings import PPOSettings

    settings = PPOSettings(
        steps=args.ppo_steps,
        rollout_batch_size=args.ppo_batch,
        mini_batch_size=min(args.ppo_batch, 16),
        epochs=1,
        max_new_tokens=args.new_tokens,
    )
    convs = [conversation(("user", q)) for q in prompts(24)]
    with tempfile.TemporaryDirectory() as out:
        history = train_ppo(
            model,
            model,
            lambda _convs, texts: [len(t) / 100 for t in texts],
            convs,
            settings,
            Path(out),
            options=PPOOptions(device=args.device),
            rollouts=rollouts,
        )
    steps = history[1:] or history
    totals = [sum(v for k, v in h.items() if k.startswith("time/")) for h in steps]
    sampling = [h["time/generate"] + h["time/push"] for h in steps]
    return statistics.median(totals), sum(sampling) / sum(totals)


if __name__ == "__main__":
    main()
