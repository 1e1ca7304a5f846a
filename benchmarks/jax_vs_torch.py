"""JAX vs PyTorch on the CPU: a preference-model training step and a DPO step, or
whole stages (``--stages``).

Both backends train the same tiny random Llama (``build_tiny_llama``, written once
to a temporary folder) on the same token ids (drawn once, from ``--seed``, and
handed to both sides in an ``.npz`` file)::

    python benchmarks/jax_vs_torch.py [--batch 8] [--seq 64] [--prompt 32]
        [--completion 32] [--rounds 5] [--steps 10] [--warmup 3] [--threads N]
        [--hidden 64] [--layers 2] [--heads 4] [--kv-heads 2] [--intermediate 128]

Run it with an interpreter that has caikit (editable), the ``jax`` extra (jax,
flax, optax, google-tunix) and torch + transformers.

1. **Preference model**: ``--batch`` comparisons = ``2 * --batch`` sequences of
   ``--seq`` tokens, right padded (real lengths drawn between half and all of
   ``--seq``), soft labels ``p_a``. JAX: ``caikit_jax.reward._train_step`` on a
   ``_RewardModel`` (the trunk from ``load_model(..., trunk_only=True)``, a bias-free
   ``nnx.Linear`` head, ``nnx.Optimizer`` over ``optax.adamw``), built and run as
   ``JaxPreferenceModel.fit`` does (the head's initial weights replaced by the
   shared ones). PyTorch:
   ``AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)``,
   the same soft-label loss ``-(p * logsigmoid(m) + (1 - p) * logsigmoid(-m))``,
   forward + backward + ``torch.optim.AdamW`` step. Both heads start from the same
   weights, so the two sides' first losses agree (printed as a check).
2. **DPO**: ``--batch`` pairs; prompts of ``--prompt`` tokens (left padded),
   chosen and rejected completions of ``--completion`` tokens (right padded).
   JAX: Tunix's ``dpo_trainer.dpo_loss_fn`` (sigmoid, beta 0.1) under
   ``nnx.value_and_grad`` + ``optimizer.update`` in one ``nnx.jit`` step on the
   policy (``caikit_jax.model.load_model``), with the inputs built as Tunix's
   ``DPOTrainer._prepare_inputs`` builds them: both halves concatenated,
   mask-derived positions, causal attention mask, and the frozen reference's
   log-probabilities from Tunix's ``compute_logps`` outside the gradient; as
   Tunix's ``PeftTrainer`` does, the optimizer state is put on the device mesh
   before the first step, the optimizer is donated to the jitted step and the step
   runs inside ``with mesh``. PyTorch: the same loss on ``AutoModelForCausalLM``
   (the same mask-derived ``position_ids``), the reference's log-probabilities
   under ``no_grad``, AdamW.
   On both sides a step includes the reference forward, as both Tunix's and TRL's
   DPO trainers compute it every step by default. Policy = reference at the start,
   so both first losses are log 2.

Every optimiser is AdamW with learning rate ``--lr``, no weight decay, no schedule;
everything is float32. Each backend runs each task in its own long-lived
subprocess (so peak RSS, ``ru_maxrss``, is per backend and task) and the parent
interleaves them: the first two steps of each (timed one by one), then
``--warmup`` discarded steps each, then ``--rounds`` rounds in which each side runs
``--steps`` steps, the side that goes first alternating between rounds. Every
step ends by reading the loss back as a Python float (JAX dispatches
asynchronously). Reported: the median step time of each side over all rounds,
the ratio JAX / torch of the medians (and the range of the per-round ratios), the
compile time (the first two steps' excess over the steady median; torch's
likewise), model loading time and peak RSS.

Two steps, because caikit's preference-model step compiles twice: ``fit`` creates
the head and the optimizer off the device mesh, so the state the first step
returns (head kernel, optimizer count and head moments, now placed on the mesh)
no longer matches the first trace and the second step traces and compiles again.
Tunix's ``PeftTrainer`` avoids this for its optimizer (``_shard_optimizer``: "if
not, the _train_step will be compiled 2 times"), which the DPO side copies.

Threads: ``--threads`` (default: the CPUs this process may run on) sets
``torch.set_num_threads`` and restricts both subprocesses to the same first
``--threads`` CPUs (``sched_setaffinity``, before either backend is imported).
JAX has no thread-count setting that works here (``XLA_FLAGS`` with
``intra_op_parallelism_threads=1`` changed nothing in jaxlib 0.10.2); XLA's CPU
runtime sizes its thread pool from the CPUs the process may use, so the affinity
is what gives both backends the same cores. On a machine other jobs share,
``--threads 1`` is the steadier comparison: with every core requested, torch's
steps slowed several-fold and erratically whenever another job ran (probably its
OpenMP threads waiting on a descheduled peer; not verified).

**Whole stages** (``--stages sft pm ppo``): each backend runs each stage through its
plugin's own entry point (``JaxOptimiser.sft`` / ``TorchOptimiser.sft``, the
preference model's ``fit``, the optimiser's ``optimise`` with PPO) on the tiny model
and caikit's toy data (``toy_traces``, ``toy_preferences``, three prompts; PPO is
rewarded by response length, so no preference model shares its process), each in a
fresh subprocess, one after another. Reported per side and stage: wall time, the
stage's ``time/compile`` (JAX's compilation, 0 for torch), the seconds per step
without it, and the peak RSS (``VmHWM``, and ``ru_maxrss`` of the parent's waited
children). To split the peak, a thread samples every 0.25 s the RSS and, on the JAX
side, the bytes of the live arrays (weights, moments, caches, batches; XLA's
temporaries inside a running step are not arrays): reported are the RSS before the
stage (the imported libraries), the live bytes at the sampled RSS peak and at their
own peak, and the RSS after the stage returned. ``--sides jax`` runs one side only
(e.g. under ``CAIKIT_JAX_MALLOC=keep``, to see what glibc's default allocator keeps)::

    python benchmarks/jax_vs_torch.py --stages sft pm ppo [--stage-steps 4] [--sides jax]

Tunix imports torch if it can (``tunix.sft`` -> ``metrax`` -> ``tensorboardX``);
the JAX subprocess blocks that import so that its RSS is JAX's alone, as in an
install without torch. RSS is what is measured, not allocator-internal peaks:
XLA's CPU client and torch's CPU allocator keep and return memory differently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import status_mib  # noqa: E402

ROOT = HERE.parent
TASKS = ("pm", "dpo")
SIDES = ("jax", "torch")
BETA = 0.1


# --- whole stages (each in its own subprocess) -----------------------------------------
STAGES = ("sft", "pm", "ppo")
#: the quickstart's steps per stage (``--run``): ``max_steps`` of SFT and the preference
#: model, PPO's ``steps``.
QUICKSTART_STEPS = {"sft": 8, "pm": 8, "ppo": 4}


class _LengthReward:
    """PPO's reward in ``--stages``: ``min(len, 40) / 40``, no model of its own."""

    capabilities: frozenset[str] = frozenset()

    def fit(self, labelled: Any, out: Path) -> Any:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        pass

    def score(self, samples: Any) -> list[float]:
        return [min(len(s.response), 40) / 40 for s in samples]


def _peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``), in MiB."""
    peak = status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    """This process's resident set now (``VmRSS``), in MiB."""
    return status_mib("VmRSS") or 0.0


class _Sampler(threading.Thread):
    """Every ``interval`` seconds while a stage runs: this process's RSS and, on the JAX
    side, the bytes of its live arrays (``caikit_jax.memory.live_bytes``: weights,
    optimiser moments, caches, batches; not XLA's temporaries inside a running step).
    Keeps the peak RSS, the live bytes at that moment, and the peak live bytes."""

    def __init__(self, live: Callable[[], int] | None, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.live, self.interval = live, interval
        self.rss_peak = self.live_at_rss_peak = self.live_peak = 0.0
        self._done = threading.Event()

    def sample(self) -> None:
        rss = _rss_mib()
        live = self.live() / 2**20 if self.live is not None else 0.0
        if rss > self.rss_peak:
            self.rss_peak, self.live_at_rss_peak = rss, live
        self.live_peak = max(self.live_peak, live)

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def _run_records(run: Path, stage: str) -> list[Any]:
    """The records of ``run``'s complete ``stage`` (``--run``), in shard order."""
    from caikit_core import records
    from caikit_core.store import RunStore

    store = RunStore(run)
    fp = store.read_run()["stages"][stage]
    manifest = store.read_manifest(stage, fp)
    if manifest is None or not manifest.complete:
        raise SystemExit(f"{run}: stage {stage!r} is not complete")
    cls = getattr(records, manifest.record_type)
    found: list[Any] = []
    for path in store.shard_paths(stage, fp):
        found.extend(records.from_arrow(store.read_shard(stage, fp, path.name), cls))
    return found


def stage_worker(args: argparse.Namespace) -> None:
    """Run one stage on one backend; print one JSON line with its measurements."""
    import importlib.util

    if importlib.util.find_spec("caikit_jax") is None:
        sys.path.insert(0, str(ROOT / "plugins"))
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[: args.threads])
    from caikit_core.records import Prompt, conversation
    from caikit_core.testing.checks import toy_preferences, toy_traces
    from caikit_core.training.settings import PPOSettings, SFTSettings

    if args.side == "jax":
        sys.modules["torch"] = None  # type: ignore[assignment]  # no torch in JAX's RSS
        from caikit_jax.optimiser import JaxOptimiser as Optimiser
        from caikit_jax.plugin import JaxOptimiserConfig as OptimiserConfig
        from caikit_jax.plugin import JaxPreferenceConfig as PreferenceConfig
        from caikit_jax.reward import JaxPreferenceModel as PreferenceModel
    else:
        import torch

        torch.set_num_threads(args.threads)
        from caikit_torch.optimiser import TorchOptimiser as Optimiser
        from caikit_torch.plugin import TorchOptimiserConfig as OptimiserConfig
        from caikit_torch.plugin import TorchPreferenceConfig as PreferenceConfig
        from caikit_torch.reward import TorchPreferenceModel as PreferenceModel
    model, out, steps = args.model, Path(args.out), args.stage_steps
    run = Path(args.run) if args.run else None
    live: Callable[[], int] | None = None
    if args.side == "jax":
        from caikit_jax.memory import live_bytes as live
    baseline = _rss_mib()
    sampler = _Sampler(live)
    sampler.start()
    started = time.perf_counter()
    if args.stage == "sft":
        traces = _run_records(run, "revisions") if run else toy_traces()
        config = OptimiserConfig(
            seed=0,
            sft=SFTSettings(
                max_steps=steps, batch_size=4, max_length=320 if run else 256, learning_rate=2e-5
            ),
        )
        metrics = Optimiser(config).sft(model, traces, out).metrics
    elif args.stage == "pm":
        if run:  # each label joined to its pair, as the labels stage hands them over
            from caikit_core.records import LabelledComparison

            pairs = {c.id: c for c in _run_records(run, "pairs")}
            labels = _run_records(run, "labels")
            labelled = [LabelledComparison(pairs[x.comparison_id], x) for x in labels]
        else:
            labelled = toy_preferences()
        settings = {"max_length": 320, "learning_rate": 2e-5} if run else {}
        pm = PreferenceModel(
            PreferenceConfig(max_steps=steps, batch_size=4, **settings), model=model
        )
        metrics = pm.fit(labelled, out).metrics
    else:
        reward: Any = _LengthReward()
        if run:  # the quickstart's: the SFT model, rewarded by this side's preference model
            prompts = _run_records(run, "prompts")[:16]
            pm_folder = Path(args.out).parent / "pm"
            reward = PreferenceModel(PreferenceConfig(max_length=320), model=model)
            reward.load(pm_folder)
            policy = str(Path(args.out).parent / "sft")
            ppo = PPOSettings(
                steps=steps,
                rollout_batch_size=8,
                mini_batch_size=4,
                epochs=1,
                max_new_tokens=32,
                max_length=320,
                kl_coef=0.05,
                learning_rate=2e-5,
            )
        else:
            questions = ("What is the capital of France?", "Why is the sky blue?", "Say hi.")
            prompts = [Prompt(f"p{i}", conversation(("user", q))) for i, q in enumerate(questions)]
            policy = model
            ppo = PPOSettings(
                steps=steps,
                rollout_batch_size=2,
                mini_batch_size=2,
                epochs=1,
                max_new_tokens=6,
                max_length=64,
            )
        config = OptimiserConfig(algorithm="ppo", seed=0, ppo=ppo)
        optimiser = Optimiser(config)
        metrics = optimiser.optimise(policy, policy, reward, prompts, [], out).metrics
    seconds = time.perf_counter() - started
    sampler.stop()
    compile_s = float(metrics.get("time/compile", 0.0))
    print(
        json.dumps(
            {
                "seconds": seconds,
                "compile_s": compile_s,
                "steps": steps,
                "step_s_after_compile": (seconds - compile_s) / steps,
                "peak_rss_mib": _peak_rss_mib(),
                "baseline_rss_mib": baseline,  # after the imports, before the stage
                "sampled_peak_rss_mib": sampler.rss_peak,
                "live_at_rss_peak_mib": sampler.live_at_rss_peak,
                "live_peak_mib": sampler.live_peak,
                "rss_after_mib": _rss_mib(),  # the stage returned and freed what it holds
            }
        ),
        flush=True,
    )


def run_stages(args: argparse.Namespace, model: Path, tmp: Path) -> dict[str, Any]:
    """Every stage on every side, each in a fresh subprocess; the measurements."""
    results: dict[str, Any] = {}
    for stage in args.stages:
        results[stage] = {}
        for side in args.sides:
            cmd = [sys.executable, __file__, "--stage-worker", "--side", side]
            cmd += ["--stage", stage, "--model", str(model), "--out", str(tmp / side / stage)]
            steps = QUICKSTART_STEPS[stage] if args.run else args.stage_steps
            cmd += ["--stage-steps", str(steps), "--threads", str(args.threads)]
            cmd += ["--run", str(args.run)] if args.run else []
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"{side} {stage}: exit {done.returncode}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            found["children_max_rss_mib"] = children
            results[stage][side] = found
            print(f"{stage} {side}: done", file=sys.stderr, flush=True)
    return results


def stages_main(args: argparse.Namespace) -> None:
    """``--stages``: build the tiny model, run the stages, print a table and a record."""
    from caikit_core.testing.tiny_models import build_tiny_llama

    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if args.model_folder:
            model = Path(args.model_folder)
        else:
            model = build_tiny_llama(tmp / "model", seed=args.seed)
        results = run_stages(args, model, tmp)
    head = (
        f"{'stage':5s} {'side':6s} {'wall s':>8s} {'compile s':>10s} "
        f"{'s/step w/o compile':>19s} {'peak RSS MiB':>13s} {'before MiB':>11s} "
        f"{'live at peak':>13s} {'live peak':>10s} {'after MiB':>10s}"
    )
    print(head)
    print("-" * len(head))
    for stage, found in results.items():
        for side in args.sides:
            r = found[side]
            print(
                f"{stage:5s} {side:6s} {r['seconds']:8.2f} {r['compile_s']:10.2f} "
                f"{r['step_s_after_compile']:19.3f} {r['peak_rss_mib']:13.0f} "
                f"{r['baseline_rss_mib']:11.0f} {r['live_at_rss_peak_mib']:13.0f} "
                f"{r['live_peak_mib']:10.0f} {r['rss_after_mib']:10.0f}"
            )
    record = {
        "benchmark": "jax_vs_torch_stages",
        "threads": args.threads,
        "stage_steps": args.stage_steps,
        "loadavg": os.getloadavg(),
        "results": results,
    }
    print(json.dumps(record))


# --- the batch ---------------------------------------------------------------------------
def make_batch(args: argparse.Namespace, model: Path, out: Path) -> None:
    """Draw the token ids both sides train on and write them to ``out`` (``.npz``)."""
    import numpy as np

    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    pad = int(config["pad_token_id"])
    special = [config.get(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
    low = max(int(x) for x in special if x is not None) + 1  # no special token in the text
    rng = np.random.default_rng(args.seed)

    def padded(rows: int, width: int, left: bool) -> tuple[Any, Any]:
        ids = np.full((rows, width), pad, dtype=np.int32)
        mask = np.zeros((rows, width), dtype=np.int32)
        for r in range(rows):
            n = int(rng.integers(max(1, width // 2), width + 1))
            span = slice(width - n, width) if left else slice(0, n)
            ids[r, span] = rng.integers(low, config["vocab_size"], size=n)
            mask[r, span] = 1
        return ids, mask

    b = args.batch
    pm_ids, pm_mask = padded(2 * b, args.seq, left=False)
    p_ids, p_mask = padded(b, args.prompt, left=True)
    c_ids, c_mask = padded(b, args.completion, left=False)
    r_ids, r_mask = padded(b, args.completion, left=False)
    np.savez(
        out,
        pad=np.int32(pad),
        pm_ids=pm_ids,
        pm_mask=pm_mask,
        pm_last=pm_mask.sum(axis=1).astype(np.int32) - 1,
        p_a=rng.uniform(0.0, 1.0, size=b).astype(np.float32),
        head=rng.normal(0.0, 0.02, size=config["hidden_size"]).astype(np.float32),
        prompt_ids=p_ids,
        prompt_mask=p_mask,
        chosen_ids=c_ids,
        chosen_mask=c_mask,
        rejected_ids=r_ids,
        rejected_mask=r_mask,
    )


# --- the two sides (each in its own subprocess) -------------------------------------------
def jax_step(task: str, folder: str, data: Any, lr: float) -> Callable[[], float]:
    """One JAX training step of ``task``, returning the loss (set-up done here)."""
    sys.modules["torch"] = None  # type: ignore[assignment]  # see the module docstring
    import jax
    import jax.numpy as jnp
    import optax
    from caikit_jax.model import load_model, make_mesh
    from flax import nnx

    mesh = make_mesh()
    if task == "pm":
        from caikit_jax.reward import _RewardModel, _train_step

        trunk = load_model(folder, mesh=mesh, trunk_only=True)
        head = nnx.Linear(trunk.config.embed_dim, 1, use_bias=False, rngs=nnx.Rngs(0))
        head.kernel.value = jnp.asarray(data["head"][:, None])
        model = _RewardModel(trunk, head)
        optimizer = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.0), wrt=nnx.Param)
        ids, mask = jnp.asarray(data["pm_ids"]), jnp.asarray(data["pm_mask"])
        last, p_a = jnp.asarray(data["pm_last"]), jnp.asarray(data["p_a"])
        return lambda: float(_train_step(model, optimizer, ids, mask, last, p_a))

    from tunix.rl import common
    from tunix.sft.dpo import dpo_trainer

    policy = load_model(folder, mesh=mesh)
    reference = load_model(folder, mesh=mesh)
    optimizer = nnx.Optimizer(policy, optax.adamw(lr, weight_decay=0.0), wrt=nnx.Param)
    batch = {k: jnp.asarray(data[k]) for k in data.files if k.endswith(("_ids", "_mask"))}
    # As PeftTrainer._shard_optimizer: put the optimizer state on the mesh before the
    # first step ("if not, the _train_step will be compiled 2 times").
    with mesh:
        state = nnx.state(optimizer, nnx.optimizer.OptState)
        specs = nnx.get_partition_spec(state)
        nnx.update(optimizer, jax.lax.with_sharding_constraint(state, specs))

    @nnx.jit(donate_argnames=("opt",))  # PeftTrainer donates the optimizer too
    def train_step(model: Any, opt: Any, example: Any) -> Any:
        def loss_fn(m: Any) -> Any:
            return dpo_trainer.dpo_loss_fn(m, example, algorithm="dpo", beta=BETA)

        (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss

    def step() -> float:
        # As DPOTrainer._prepare_inputs: chosen and rejected halves in one batch.
        prompt = jnp.concatenate([batch["prompt_ids"], batch["prompt_ids"]], axis=0)
        prompt_mask = jnp.concatenate([batch["prompt_mask"], batch["prompt_mask"]], axis=0)
        completion = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
        completion_mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        ids = jnp.concatenate([prompt, completion], axis=1)
        mask = jnp.concatenate([prompt_mask, completion_mask], axis=1)
        attention = common.make_causal_attn_mask(mask)
        positions = common.build_positions_from_mask(mask)
        keep = completion.shape[1]
        ref_chosen, ref_rejected = dpo_trainer.compute_logps(
            reference, ids, positions, attention, keep, completion_mask, images=None
        )
        example = dpo_trainer.TrainExample(
            input_ids=ids,
            positions=positions,
            attention_mask=attention,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            completion_mask=completion_mask,
            logits_to_keep=keep,
        )
        return float(train_step(policy, optimizer, example))

    def in_mesh() -> float:  # caikit runs DPOTrainer.train inside ``with mesh``
        with mesh:
            return step()

    return in_mesh


def torch_step(task: str, folder: str, data: Any, lr: float) -> Callable[[], float]:
    """One PyTorch training step of ``task``, returning the loss (set-up done here)."""
    import torch
    import torch.nn.functional as F
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t = {k: torch.from_numpy(data[k]) for k in data.files}
    if task == "pm":
        model: Any = transformers.AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=torch.float32
        )
        with torch.no_grad():
            model.score.weight.copy_(t["head"][None, :])
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        ids, mask, p_a = t["pm_ids"].long(), t["pm_mask"].long(), t["p_a"]
        half = p_a.shape[0]

        def pm_step() -> float:
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
            margin = scores[:half] - scores[half:]
            loss = -(p_a * F.logsigmoid(margin) + (1.0 - p_a) * F.logsigmoid(-margin)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss.item())

        return pm_step

    policy: Any = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference: Any = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    policy.train()
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)

    def logps(model: Any, ids: Any, mask: Any, positions: Any, completion_mask: Any) -> Any:
        keep = completion_mask.shape[1]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logp = torch.log_softmax(out[:, -keep - 1 : -1].float(), dim=-1)
        picked = logp.gather(-1, ids[:, -keep:, None])[..., 0]
        sums = (picked * completion_mask).sum(dim=-1)
        return sums[: sums.shape[0] // 2], sums[sums.shape[0] // 2 :]

    def dpo_step() -> float:
        prompt = torch.cat([t["prompt_ids"], t["prompt_ids"]]).long()
        prompt_mask = torch.cat([t["prompt_mask"], t["prompt_mask"]]).long()
        completion = torch.cat([t["chosen_ids"], t["rejected_ids"]]).long()
        completion_mask = torch.cat([t["chosen_mask"], t["rejected_mask"]]).long()
        ids = torch.cat([prompt, completion], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref_chosen, ref_rejected = logps(reference, ids, mask, positions, completion_mask)
        chosen, rejected = logps(policy, ids, mask, positions, completion_mask)
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -F.logsigmoid(BETA * delta).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    return dpo_step


def worker(args: argparse.Namespace) -> None:
    """Serve ``run N`` / ``quit`` commands on stdin; answer one JSON line each."""
    import importlib.util

    import numpy as np

    if importlib.util.find_spec("caikit_jax") is None:
        sys.path.insert(0, str(ROOT / "plugins"))
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[: args.threads])
    # Our protocol owns the real stdout; anything a library prints goes to stderr.
    channel: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")

    data = np.load(args.data)
    tick = time.perf_counter()  # load time: the backend's imports + the weights + set-up
    if args.side == "jax":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        step = jax_step(args.task, args.model, data, args.lr)
    else:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        step = torch_step(args.task, args.model, data, args.lr)
    say({"load_s": time.perf_counter() - tick})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            times, losses = [], []
            for _ in range(int(command[1])):
                tick = time.perf_counter()
                losses.append(step())
                times.append(time.perf_counter() - tick)
            say({"times": times, "losses": losses})
        else:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            say(
                {
                    "maxrss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
                    "torch_imported": sys.modules.get("torch") is not None,
                    "jax_imported": "jax" in sys.modules,
                }
            )
            return


# --- the parent ----------------------------------------------------------------------------
class Side:
    """A worker subprocess for one backend and task."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                cwd=ROOT, env=env, bufsize=1,
            )  # fmt: skip
        self.load_s = float(self._read()["load_s"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            sys.stderr.write(self.log.read_text(encoding="utf-8")[-4000:])
            raise SystemExit(f"the {self.name} worker failed (status {self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        answer = self.ask("quit")
        self.proc.wait()
        return answer


def measure(task: str, args: argparse.Namespace, model: Path, data: Path, tmp: Path) -> dict:
    """Interleave the two backends on ``task``; return each side's numbers and the ratios."""
    sides: dict[str, Side] = {}
    for name in SIDES:  # started one after the other, so loading is not contended
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", "--side", name,
            "--task", task, "--model", str(model), "--data", str(data),
            "--threads", str(args.threads), "--lr", str(args.lr), "--seed", str(args.seed),
        ]  # fmt: skip
        sides[name] = Side(f"{name} {task}", cmd, tmp / f"{name}-{task}.log")
    first = {name: side.ask("run 2") for name, side in sides.items()}
    if args.warmup:
        for side in sides.values():
            side.ask(f"run {args.warmup}")
    steady: dict[str, list[float]] = {name: [] for name in SIDES}
    per_round: dict[str, list[float]] = {name: [] for name in SIDES}
    last_loss: dict[str, float] = {}
    for round_ in range(args.rounds):
        order = list(SIDES) if round_ % 2 == 0 else list(reversed(SIDES))
        for name in order:
            answer = sides[name].ask(f"run {args.steps}")
            steady[name] += answer["times"]
            per_round[name].append(statistics.median(answer["times"]))
            last_loss[name] = answer["losses"][-1]
    result: dict[str, Any] = {}
    for name, side in sides.items():
        end = side.close()
        median = statistics.median(steady[name])
        first_s, second_s = first[name]["times"]
        result[name] = {
            "median_step_ms": 1e3 * median,
            "first_step_ms": 1e3 * first_s,
            "second_step_ms": 1e3 * second_s,
            # JAX compiles at the first step, and again at the second if the state the
            # first step returns is placed differently (see the module docstring).
            "compile_s": first_s + second_s - 2 * median,
            "load_s": side.load_s,
            "peak_rss_mib": end["maxrss_mib"],
            "torch_imported": end["torch_imported"],
            "first_loss": first[name]["losses"][0],
            "last_loss": last_loss[name],
            "steps": 2 + args.warmup + args.rounds * args.steps,
        }
    jx, pt = result["jax"], result["torch"]
    round_ratios = [a / b for a, b in zip(per_round["jax"], per_round["torch"], strict=True)]
    result["ratio_time"] = jx["median_step_ms"] / pt["median_step_ms"]
    result["ratio_time_rounds"] = [min(round_ratios), max(round_ratios)]
    result["ratio_rss"] = jx["peak_rss_mib"] / pt["peak_rss_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="comparisons (pm) / pairs (dpo)")
    parser.add_argument("--seq", type=int, default=64, help="pm sequence length (padded)")
    parser.add_argument("--prompt", type=int, default=32, help="dpo prompt length (padded)")
    parser.add_argument("--completion", type=int, default=32, help="dpo completion length")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per side per round")
    parser.add_argument("--warmup", type=int, default=3, help="discarded steps after the 2nd")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPUs (and torch threads) per side; default: all this process may use",
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--stages", nargs="+", choices=STAGES, help="run whole stages instead of steps"
    )
    parser.add_argument("--stage-steps", type=int, default=4, help="steps per whole stage")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="--stages")
    parser.add_argument(
        "--model-folder", help="--stages on this model instead of the tiny one (with --run)"
    )
    parser.add_argument(
        "--run", help="--stages on this run directory's revisions, labels and prompts"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.stage_worker:
        stage_worker(args)
        return
    if args.stages:
        stages_main(args)
        return

    from caikit_core.testing.tiny_models import build_tiny_llama

    versions = {
        p: version(p)
        for p in ("jax", "jaxlib", "flax", "optax", "google-tunix", "torch", "transformers")
    }
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = build_tiny_llama(
            tmp / "model",
            seed=args.seed,
            hidden_size=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate_size=args.intermediate,
            max_position_embeddings=max(512, args.seq, args.prompt + args.completion),
        )
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        data = tmp / "batch.npz"
        make_batch(args, model, data)
        for task in args.tasks:
            results[task] = measure(task, args, model, data, tmp)
            print(f"{task}: done", flush=True)
    shapes = {
        "pm": f"{2 * args.batch} x {args.seq} ({args.batch} comparisons)",
        "dpo": f"{2 * args.batch} x {args.prompt}+{args.completion} ({args.batch} pairs)",
    }
    print(
        f"\ntiny Llama: hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} kv), MLP {args.intermediate}, vocab {config['vocab_size']}; "
        f"{args.threads} thread(s) per side; {args.rounds} rounds x {args.steps} steps "
        f"(after 2 + {args.warmup} warm-up steps); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    head = (
        f"{'task':4s} {'batch':26s} {'side':6s} {'median ms':>10s} {'1st ms':>9s} "
        f"{'2nd ms':>9s} {'compile s':>10s} {'load s':>7s} {'RSS MiB':>8s} "
        f"{'loss 1st':>9s} {'loss last':>9s}"
    )
    print(head)
    print("-" * len(head))
    for task, found in results.items():
        for side in SIDES:
            r = found[side]
            print(
                f"{task:4s} {shapes[task]:26s} {side:6s} {r['median_step_ms']:10.2f} "
                f"{r['first_step_ms']:9.1f} {r['second_step_ms']:9.1f} "
                f"{r['compile_s']:10.2f} {r['load_s']:7.2f} "
                f"{r['peak_rss_mib']:8.0f} {r['first_loss']:9.5f} {r['last_loss']:9.5f}"
            )
        low, high = found["ratio_time_rounds"]
        print(
            f"{task:4s} JAX / torch: step time {found['ratio_time']:.3f} (per-round "
            f"{low:.3f}-{high:.3f}), peak RSS {found['ratio_rss']:.3f}"
        )
    record = {
        "benchmark": "jax_vs_torch",
        "model": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "intermediate": args.intermediate,
            "vocab": config["vocab_size"],
        },
        "shapes": shapes,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": args.lr,
        "versions": versions,
        "loadavg": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    if any(math.isnan(r[s]["first_loss"]) for r in results.values() for s in SIDES):
        print("warning: a NaN loss", file=sys.stderr)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
