"""RL-CAI with ``algorithm = "rloo"`` or ``"grpo"`` for the ``torch`` policy optimiser.

TRL's ``RLOOTrainer`` / ``GRPOTrainer`` sample ``num_generations`` responses to each
of ``rollout_batch_size`` prompts per rollout, rewarded by a Python reward function
(:func:`preference_reward_function`) that wraps the responses into
:class:`~caikit_core.records.Sample` records and calls the preference model's
``score``; ``beta`` weighs the KL to the reference, ``epsilon`` clips the ratio and
``iterations`` optimiser steps follow each rollout (``[policy_optimiser.rloo]`` or
``[policy_optimiser.grpo]``). With a rollout generator (``rl.rollouts =
"generator"``) the trainer's sampling step (``_generate_single_turn``, the one
method both TRL trainers route generation through) asks the generator instead, and
the policy is saved and loaded into it whenever an optimiser step has changed it.
``kl_bound`` stops training when the KL per response exceeds it (TRL logs a
per-token mean KL; it is compared as ``kl * completions/mean_length``), saving the
current policy to ``out`` and raising
:class:`~caikit_core.errors.TrainingStopped` with it as the checkpoint.

This module imports torch, transformers, TRL and datasets at import time. The
``jax`` backend has no counterpart.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import transformers

from caikit_core.errors import CaikitError, TrainingStopped
from caikit_core.interfaces import PreferenceModel, RolloutGenerator
from caikit_core.records import Prompt, RolloutRequest, Sample, stable_id
from caikit_torch.checkpoints import make_resumable
from caikit_torch.common import (
    WHO,
    KLGuard,
    LossLog,
    RLRun,
    add_report_callbacks,
    as_conversation,
    chat_turns,
    load_model,
    load_tokenizer,
    lora_config,
    precision,
    score_samples,
    scratch_or,
    sequence_kl,
    trainer_defaults,
)

__all__ = ["preference_reward_function", "train_group"]

log = logging.getLogger("caikit.torch")


def preference_reward_function(
    reward: PreferenceModel,
) -> Callable[..., list[float | None]]:
    """A TRL reward function (``RLOOTrainer``/``GRPOTrainer``) scoring with ``reward``.

    The function takes TRL's keyword arguments ``prompts`` (conversations, as lists
    of role/content dicts), ``completions`` (each a list holding one assistant
    turn) and the dataset's ``prompt_id`` column, wraps each response into a
    :class:`~caikit_core.records.Sample` and returns ``reward.score`` of them.

    :raises CaikitError: (when called) the preference model returns the wrong number
        of scores or a non-finite one.
    """

    def caikit_preference_model(
        prompts: Sequence[Any],
        completions: Sequence[Any],
        prompt_id: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        samples = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            messages = as_conversation(prompt)
            text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
            pid = (
                prompt_id[i] if prompt_id is not None else stable_id("prompt", chat_turns(messages))
            )
            samples.append(Sample(stable_id("rl-sample", pid, text), pid, messages, text))
        scores: list[float | None] = list(score_samples(reward, samples))
        return scores

    return caikit_preference_model


def with_rollouts(trainer_cls: Any, rollouts: RolloutGenerator, seed: int, push: Path) -> Any:
    """``trainer_cls`` (TRL's ``RLOOTrainer`` or ``GRPOTrainer``) sampling from
    ``rollouts``: each prompt's completion comes from the generator with a seed of
    its own (``seed``, the call, the row), and the policy's weights are saved to
    ``push`` and loaded into the generator first whenever the global step moved."""
    # GRPO's takes num_generations and returns (completion ids, log-probs); RLOO's the ids.
    returns_logprobs = (
        "num_generations" in inspect.signature(trainer_cls._generate_single_turn).parameters
    )

    class FromGenerator(trainer_cls):  # type: ignore[misc]
        _caikit_calls = 0
        _caikit_loaded_step = 0

        def _generate_single_turn(self, prompt_ids: Any, *args: Any, **kwargs: Any) -> Any:
            if self.state.global_step != self._caikit_loaded_step:
                self.accelerator.unwrap_model(self.model).save_pretrained(push)
                rollouts.load_weights(push)
                self._caikit_loaded_step = self.state.global_step
            call = self._caikit_calls
            self._caikit_calls += 1
            requests = [
                RolloutRequest(
                    id=f"{call}:{i}",
                    prompt_ids=tuple(int(t) for t in ids),
                    max_new_tokens=int(self.max_completion_length),
                    temperature=float(self.temperature),
                    seed=_row_seed(seed, call, i),
                    stop_token_ids=tuple(int(t) for t in self.eos_token_ids),
                )
                for i, ids in enumerate(prompt_ids)
            ]
            completions = [list(r.token_ids[0]) for r in rollouts.rollout(requests)]
            return (completions, None) if returns_logprobs else completions

    FromGenerator.__name__ = f"{trainer_cls.__name__}FromGenerator"
    return FromGenerator


def _row_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def train_group(run: RLRun, reward: PreferenceModel, prompts: Sequence[Prompt]) -> dict[str, float]:
    """RLOO or GRPO (``run.cfg.algorithm``) with TRL, rewarded by the preference model."""
    cfg = run.cfg
    table = cfg.rloo if cfg.algorithm == "rloo" else cfg.grpo
    if cfg.algorithm == "rloo":
        from trl.trainer.rloo_config import RLOOConfig as ConfigClass
        from trl.trainer.rloo_trainer import RLOOTrainer as TrainerClass
    else:
        from trl.trainer.grpo_config import GRPOConfig as ConfigClass  # type: ignore[assignment]
        from trl.trainer.grpo_trainer import GRPOTrainer as TrainerClass  # type: ignore[assignment]

    kept, too_long = run.fitting_prompts(prompts, table.max_length, table.max_new_tokens)
    if len(kept) < table.rollout_batch_size:
        raise CaikitError(
            f"{WHO}: {cfg.algorithm} samples rollout_batch_size = {table.rollout_batch_size} "
            f"prompts per rollout but has only {len(kept)} (of {len(prompts)} given, "
            f"{too_long} too long); lower rollout_batch_size"
        )
    sequences = table.rollout_batch_size * table.num_generations
    per_pass = min(table.mini_batch_size, sequences)
    if sequences % per_pass:
        raise CaikitError(
            f"{WHO}: {cfg.algorithm} needs rollout_batch_size * num_generations "
            f"(= {sequences}) to be a multiple of mini_batch_size (= {table.mini_batch_size})"
        )
    same = run.reference.resolve() == run.policy.resolve()
    if cfg.lora and run.rollouts is not None:
        raise CaikitError(
            f"{WHO}: {cfg.algorithm} with lora = true cannot push its weights into a rollout "
            'generator (the adapters are merged only at the end); set rl.rollouts = "optimiser" '
            "or lora = false"
        )
    if cfg.lora and not same:
        raise CaikitError(
            f"{WHO}: {cfg.algorithm} with lora = true takes the policy with its adapters "
            "switched off as the reference, so the reference must be the policy; set "
            "lora = false to use a different reference"
        )
    weights_dtype, mixed_bf16 = precision(cfg.dtype, run.device)
    transformers.set_seed(cfg.seed)
    tokenizer = load_tokenizer(run.policy)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # TRL's generation needs left padding
    model = load_model(run.policy, weights_dtype)
    use_cache = bool(getattr(model.config, "use_cache", False))
    # TRL loads the reference from the folder the policy's config names.
    model.config.name_or_path = str(run.reference)
    total = table.steps * table.iterations
    guard = KLGuard(table.kl_bound)
    log.info(
        "%s: %d prompts, %d rollouts of %d x %d responses, beta %g, on %s",
        cfg.algorithm,
        len(kept),
        table.steps,
        table.rollout_batch_size,
        table.num_generations,
        table.beta,
        run.device,
    )
    rows = [{"prompt": chat_turns(p.messages), "prompt_id": p.id} for p in kept]
    # a rollout generator's weights are not in the checkpoint: no resuming with one
    checkpoint_dir = run.checkpoint_dir if run.rollouts is None else None
    if run.checkpoint_dir is not None and checkpoint_dir is None:
        log.warning("%s: no resumable checkpoints with rl.rollouts = 'generator'", cfg.algorithm)
    with scratch_or(checkpoint_dir, f"caikit-{cfg.algorithm}-") as scratch:
        trainer_cls: Any = TrainerClass
        if run.rollouts is not None:
            push = Path(scratch) / "push"
            trainer_cls = with_rollouts(TrainerClass, run.rollouts, cfg.seed, push)
        args = ConfigClass(
            output_dir=scratch,
            learning_rate=table.learning_rate,
            max_steps=total,
            per_device_train_batch_size=per_pass,
            gradient_accumulation_steps=sequences // per_pass,
            num_generations=table.num_generations,
            max_completion_length=table.max_new_tokens,
            temperature=table.temperature,
            beta=table.beta,
            num_iterations=table.iterations,
            epsilon=table.epsilon,
            **trainer_defaults(
                checkpointing=cfg.gradient_checkpointing,
                seed=cfg.seed,
                device=run.device,
                bf16=mixed_bf16,
                logging_steps=1,
                report_to=cfg.report_to,
            ),
        )
        trainer = trainer_cls(
            model=model,
            reward_funcs=preference_reward_function(reward),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if cfg.lora else None,
            callbacks=[LossLog(total, cfg.algorithm), guard],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        add_report_callbacks(trainer, cfg.report_to, run.out / "logs")
        resume = make_resumable(
            trainer,
            checkpoint_dir,
            cfg.checkpoint_every_steps,
            cfg.checkpoint_every_minutes,
            fit=cfg.algorithm,
            per_step=table.iterations,
        )
        result = trainer.train(resume_from_checkpoint=resume)
    run.history = [dict(entry) for entry in trainer.state.log_history]
    # Every optimiser step logs its loss; rewards come with each rollout only.
    steps = [h for h in run.history if "loss" in h]
    rollouts = [h for h in run.history if "reward" in h]
    model.config.name_or_path = str(run.policy)
    tokenizer.padding_side = padding_side
    run.save(trainer.model, tokenizer, use_cache)
    del trainer, model
    run.release()
    if guard.tripped is not None:
        step, kl = guard.tripped
        message = (
            f"{cfg.algorithm}: stopped at step {step}: KL to the reference per response "
            f"{kl:.6g} exceeds kl_bound = {table.kl_bound:g}; the policy after this step is "
            f"saved to {run.out}"
        )
        raise TrainingStopped(message, checkpoint=str(run.out))
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "steps": float(len(steps)),
        "rollouts": float(len(rollouts)),
        "prompts": float(len(kept)),
        "too_long": float(too_long),
    }
    if rollouts:
        metrics["reward_first"] = float(rollouts[0]["reward"])
        metrics["reward_last"] = float(rollouts[-1]["reward"])
        kl_last = sequence_kl(rollouts[-1])
        if kl_last is not None:
            metrics["kl_last"] = kl_last
            metrics["kl_token_last"] = float(rollouts[-1]["kl"])
    return metrics
