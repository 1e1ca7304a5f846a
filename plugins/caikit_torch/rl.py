"""RL-CAI for the ``torch`` policy optimiser: PPO, DPO, RLOO and GRPO.

:func:`optimise` (what :meth:`caikit_torch.sft.TorchOptimiser.optimise` calls)
dispatches on ``config.algorithm``:

- ``"ppo"``: :func:`caikit_torch.ppo.train_ppo` (caikit's own PPO; TRL 1.16 has no
  PPO trainer) with the preference model's :meth:`score` as the reward and a KL
  penalty (``kl_coef``) to the reference.
- ``"dpo"``: TRL's ``DPOTrainer`` on the AI-labelled pairs (:func:`dpo_pairs`): the
  response with ``p_a >= 0.5`` is chosen (A when above, B when below), exact ties
  (``p_a == 0.5``) and pairs of identical responses are dropped and counted.
  ``beta`` is ``kl_coef``. In TRL 1.16 only the ``robust`` and ``exo_pair`` losses
  read ``label_smoothing`` (its ``sigmoid`` loss no longer does, unlike conservative
  DPO in older TRL), so the soft labels enter through it: by default it is the mean
  of ``min(p_a, 1 - p_a)`` over the pairs, the probability the labeller gives the
  other response (clipped to [0.001, 0.49]). The preference model is not used.
- ``"rloo"`` / ``"grpo"``: TRL's ``RLOOTrainer`` / ``GRPOTrainer`` sampling
  ``num_generations`` responses to each of ``rollout_batch_size`` prompts per
  rollout, rewarded by a Python reward function that wraps the responses into
  :class:`~caikit_core.records.Sample` records and calls the preference model's
  ``score``; ``beta = kl_coef`` (KL to the reference), ``epsilon = cliprange``,
  ``num_iterations = ppo_epochs`` optimiser steps per rollout.

Each saves a plain Hugging Face checkpoint (safetensors) and its tokenizer into
``out``, and :data:`RL_RECORD` with the algorithm, the settings, the final metrics
and every logged step. ``kl_bound`` stops PPO, RLOO and GRPO when the KL per
response exceeds it (RLOO and GRPO log a per-token mean KL; it is compared as
``kl * completions/mean_length``, the per-response sum PPO reports), saving the
current policy to ``out`` and raising :class:`~caikit_core.errors.TrainingStopped`
with it as the checkpoint.

This module imports torch, transformers, TRL and datasets at import time.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import datasets
import torch
import transformers
import trl

from caikit_core.errors import CaikitError, TrainingStopped
from caikit_core.interfaces import FitReport, PreferenceModel
from caikit_core.metrics import checked_scores
from caikit_core.records import Conversation, LabelledComparison, Message, Prompt, Sample, stable_id
from caikit_core.training_data import DPOPairs, dpo_pairs, require_dpo_pairs
from caikit_torch.plugin import SMOOTHED_DPO_LOSSES, TorchOptimiserConfig
from caikit_torch.sft import (
    _LossLog,
    _policy_folder,
    _precision,
    _progress_bars,
    _resolve_device,
    _total_steps,
    trainer_defaults,
)

if TYPE_CHECKING:
    from caikit_torch.sft import TorchOptimiser

__all__ = [
    "RL_RECORD",
    "DPOPairs",
    "derived_label_smoothing",
    "dpo_pairs",
    "optimise",
    "preference_reward_function",
]

log = logging.getLogger("caikit.torch")

#: The file in a saved checkpoint that records how it was optimised.
RL_RECORD = "caikit_rl.json"

_WHO = "torch policy optimiser"
#: The bounds of the label smoothing derived from the soft labels.
_SMOOTHING_RANGE = (1e-3, 0.49)


def derived_label_smoothing(pairs: DPOPairs) -> float:
    """The label smoothing implied by the soft labels: their mean minority probability,
    clipped to [0.001, 0.49] (TRL's robust loss needs it below 0.5, EXO above 0)."""
    low, high = _SMOOTHING_RANGE
    return min(high, max(low, pairs.label_noise))


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
            messages = _conversation(prompt)
            text = completion[-1]["content"] if isinstance(completion, list) else str(completion)
            pid = prompt_id[i] if prompt_id is not None else stable_id("prompt", _turns(messages))
            samples.append(Sample(stable_id("rl-sample", pid, text), pid, messages, text))
        scores: list[float | None] = list(_checked_scores(reward, samples))
        return scores

    return caikit_preference_model


def optimise(
    optimiser: TorchOptimiser,
    policy: str,
    reference: str,
    reward: PreferenceModel,
    prompts: Sequence[Prompt],
    labelled: Sequence[LabelledComparison],
    out: Path,
) -> FitReport:
    """Optimise ``policy`` with ``optimiser.config.algorithm``; save it and the record.

    See :meth:`caikit_torch.sft.TorchOptimiser.optimise` for the parameters.
    """
    cfg = optimiser.config
    started = time.perf_counter()
    policy_folder = _policy_folder(policy)
    reference_folder = _policy_folder(reference, _WHO, "reference")
    device = _resolve_device(cfg.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _Run(optimiser, policy_folder, reference_folder, device, out)
    with _progress_bars(log.isEnabledFor(logging.INFO)):
        try:
            if cfg.algorithm == "dpo":
                metrics = run.dpo(labelled)
            elif cfg.algorithm == "ppo":
                metrics = run.ppo(reward, prompts)
            else:
                metrics = run.online(reward, prompts)
        except TrainingStopped as stopped:
            run.write_record({}, stopped=str(stopped))
            raise
    metrics["seconds"] = time.perf_counter() - started
    run.write_record(metrics)
    log.info("%s: done in %.1fs, saved to %s", cfg.algorithm, metrics["seconds"], out)
    return FitReport(str(out), metrics)


# --- implementation ---------------------------------------------------------------------


def _turns(messages: Conversation) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _conversation(turns: Any) -> Conversation:
    if isinstance(turns, str):  # a plain-text prompt
        return (Message("user", turns),)
    return tuple(Message(str(t["role"]), str(t["content"])) for t in turns)


def _checked_scores(reward: PreferenceModel, samples: list[Sample]) -> list[float]:
    return checked_scores(reward.score, samples, _WHO)


def _sequence_kl(logs: dict[str, Any]) -> float | None:
    """Per-response KL from TRL's per-token mean ``kl`` and the mean completion length."""
    if "kl" not in logs or "completions/mean_length" not in logs:
        return None
    return float(logs["kl"]) * float(logs["completions/mean_length"])


class _KLGuard(transformers.TrainerCallback):
    """Stops a TRL trainer once the per-response KL (:func:`_sequence_kl`) exceeds ``bound``."""

    def __init__(self, bound: float | None) -> None:
        self.bound = bound
        #: ``(step, kl)`` of the step that went over the bound, if one did.
        self.tripped: tuple[int, float] | None = None

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        kl = _sequence_kl(logs or {})
        if self.bound is None or kl is None or self.tripped is not None:
            return
        if kl > self.bound:
            self.tripped = (int(state.global_step), kl)
            control.should_training_stop = True


class _Run:
    """One :func:`optimise` call: its folders, device and record."""

    def __init__(
        self,
        optimiser: TorchOptimiser,
        policy: Path,
        reference: Path,
        device: str,
        out: Path,
    ) -> None:
        self.optimiser = optimiser
        self.cfg: TorchOptimiserConfig = optimiser.config
        self.policy, self.reference, self.device, self.out = policy, reference, device, out
        #: every logged step (a TRL trainer's ``log_history``, or PPO's per-step metrics).
        self.history: list[dict[str, Any]] = []

    # records ---------------------------------------------------------------------------
    def write_record(self, metrics: dict[str, float], stopped: str | None = None) -> None:
        """Write :data:`RL_RECORD` into ``out``."""
        record = {
            "algorithm": self.cfg.algorithm,
            "base": str(self.policy),
            "reference": str(self.reference),
            "config": attrs.asdict(self.cfg),
            "metrics": metrics,
            "stopped": stopped,
            "history": self.history,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
        }
        (self.out / RL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    # PPO -------------------------------------------------------------------------------
    def ppo(self, reward: PreferenceModel, prompts: Sequence[Prompt]) -> dict[str, float]:
        """PPO with :func:`caikit_torch.ppo.train_ppo` (imported here)."""
        from caikit_torch.ppo import PPOSettings, train_ppo

        cfg = self.cfg
        if cfg.lora:
            log.warning("ppo: lora = true does not apply to PPO, which trains all weights")
        kept, too_long = self._fitting_prompts(prompts)
        ids = {p.messages: p.id for p in kept}

        def score(conversations: Sequence[Conversation], texts: Sequence[str]) -> list[float]:
            samples = []
            for messages, text in zip(conversations, texts, strict=True):
                pid = ids.get(messages) or stable_id("prompt", _turns(messages))
                samples.append(Sample(stable_id("rl-sample", pid, text), pid, messages, text))
            return _checked_scores(reward, samples)

        def on_step(metrics: dict[str, float]) -> None:
            self.history.append(dict(metrics))  # train_ppo logs each step itself

        settings = PPOSettings(
            steps=cfg.ppo_steps,
            rollout_batch_size=cfg.rollout_batch_size,
            mini_batch_size=cfg.mini_batch_size,
            ppo_epochs=cfg.ppo_epochs,
            learning_rate=cfg.learning_rate,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            kl_coef=cfg.kl_coef,
            adaptive_kl=cfg.adaptive_kl,
            target_kl=cfg.target_kl,
            kl_bound=cfg.kl_bound,
            gamma=cfg.gamma,
            lam=cfg.lam,
            cliprange=cfg.cliprange,
            vf_coef=cfg.vf_coef,
            seed=cfg.seed,
            device=self.device,
        )
        history = train_ppo(
            str(self.policy),
            str(self.reference),
            score,
            [p.messages for p in kept],
            settings,
            self.out,
            on_step=on_step,
        )
        self.history = [dict(h) for h in history]
        first, last = history[0], history[-1]
        return {
            "reward_first": float(first["objective/scores"]),
            "reward_last": float(last["objective/scores"]),
            "rlhf_reward_last": float(last["objective/rlhf_reward"]),
            "kl_last": float(last["objective/kl"]),
            "beta_last": float(last["beta"]),
            "steps": float(len(history)),
            "prompts": float(len(kept)),
            "too_long": float(too_long),
        }

    # DPO -------------------------------------------------------------------------------
    def dpo(self, labelled: Sequence[LabelledComparison]) -> dict[str, float]:
        """DPO with TRL's ``DPOTrainer`` on the labelled pairs."""
        from trl.trainer.dpo_config import DPOConfig
        from trl.trainer.dpo_trainer import DPOTrainer

        cfg = self.cfg
        pairs = require_dpo_pairs(labelled, who=_WHO)
        if cfg.dpo_loss in SMOOTHED_DPO_LOSSES:
            smoothing = (
                cfg.label_smoothing
                if cfg.label_smoothing is not None
                else derived_label_smoothing(pairs)
            )
        else:
            smoothing = 0.0
        weights_dtype, mixed_bf16 = _precision(cfg.dtype, self.device)
        transformers.set_seed(cfg.seed)
        tokenizer = self.optimiser._load_tokenizer(self.policy)
        model = self.optimiser._load_model(self.policy, weights_dtype)
        use_cache = bool(getattr(model.config, "use_cache", False))
        # With LoRA the adapters switched off give the policy itself: no second copy.
        same = self.reference.resolve() == self.policy.resolve()
        ref_model = (
            None if cfg.lora and same else self.optimiser._load_model(self.reference, weights_dtype)
        )
        total = _total_steps(len(pairs.examples), cfg)
        log.info(
            "dpo: %d pairs (%d ties, %d identical left out), loss %s, beta %g, "
            "label_smoothing %g, %d steps on %s",
            len(pairs.examples),
            pairs.ties,
            pairs.identical,
            cfg.dpo_loss,
            cfg.kl_coef,
            smoothing,
            total,
            self.device,
        )
        with tempfile.TemporaryDirectory(prefix="caikit-dpo-") as scratch:
            args = DPOConfig(
                output_dir=scratch,
                learning_rate=cfg.learning_rate,
                num_train_epochs=cfg.epochs,
                max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
                per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                max_length=cfg.max_length,
                beta=cfg.kl_coef,
                loss_type=[cfg.dpo_loss],
                label_smoothing=smoothing,
                **trainer_defaults(
                    checkpointing=cfg.gradient_checkpointing,
                    seed=cfg.seed,
                    device=self.device,
                    bf16=mixed_bf16,
                    total=total,
                ),
            )
            trainer = DPOTrainer(
                model=model,
                ref_model=ref_model,
                args=args,
                train_dataset=datasets.Dataset.from_list(pairs.examples),
                processing_class=tokenizer,
                peft_config=self.optimiser._lora_config() if cfg.lora else None,
                callbacks=[_LossLog(total, "dpo")],
            )
            trainer.remove_callback(transformers.PrinterCallback)
            prepared: Any = trainer.train_dataset  # TRL drops prompts that fill max_length
            kept = len(prepared)
            result = trainer.train()
        self.history = [dict(entry) for entry in trainer.state.log_history]
        steps = [h for h in self.history if "loss" in h]
        self._save(trainer.model, tokenizer, use_cache)
        metrics: dict[str, float] = {
            "train_loss": float(result.training_loss),
            "loss_first": float(steps[0]["loss"]) if steps else float(result.training_loss),
            "loss_last": float(steps[-1]["loss"]) if steps else float(result.training_loss),
            "pairs": float(kept),
            "ties": float(pairs.ties),
            "identical": float(pairs.identical),
            "too_long": float(len(pairs.examples) - kept),
            "beta": float(cfg.kl_coef),
            "label_smoothing": float(smoothing),
            "steps": float(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
        }
        for key, name in (
            ("rewards/margins", "margin_last"),
            ("rewards/accuracies", "accuracy_last"),
        ):
            if steps and key in steps[-1]:
                metrics[name] = float(steps[-1][key])
        del trainer, model, ref_model
        self._release()
        return metrics

    # RLOO and GRPO ---------------------------------------------------------------------
    def online(self, reward: PreferenceModel, prompts: Sequence[Prompt]) -> dict[str, float]:
        """RLOO or GRPO with TRL, rewarded by the preference model."""
        cfg = self.cfg
        if cfg.algorithm == "rloo":
            from trl.trainer.rloo_config import RLOOConfig as ConfigClass
            from trl.trainer.rloo_trainer import RLOOTrainer as TrainerClass
        else:
            from trl.trainer.grpo_config import GRPOConfig as ConfigClass  # type: ignore[assignment]
            from trl.trainer.grpo_trainer import GRPOTrainer as TrainerClass  # type: ignore[assignment]

        kept, too_long = self._fitting_prompts(prompts)
        if len(kept) < cfg.rollout_batch_size:
            raise CaikitError(
                f"{_WHO}: {cfg.algorithm} samples rollout_batch_size = {cfg.rollout_batch_size} "
                f"prompts per rollout but has only {len(kept)} (of {len(prompts)} given, "
                f"{too_long} too long); lower rollout_batch_size"
            )
        sequences = cfg.rollout_batch_size * cfg.num_generations
        per_pass = min(cfg.mini_batch_size, sequences)
        if sequences % per_pass:
            raise CaikitError(
                f"{_WHO}: {cfg.algorithm} needs rollout_batch_size * num_generations "
                f"(= {sequences}) to be a multiple of mini_batch_size (= {cfg.mini_batch_size})"
            )
        same = self.reference.resolve() == self.policy.resolve()
        if cfg.lora and not same:
            raise CaikitError(
                f"{_WHO}: {cfg.algorithm} with lora = true takes the policy with its adapters "
                "switched off as the reference, so the reference must be the policy; set "
                "lora = false to use a different reference"
            )
        weights_dtype, mixed_bf16 = _precision(cfg.dtype, self.device)
        transformers.set_seed(cfg.seed)
        tokenizer = self.optimiser._load_tokenizer(self.policy)
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # TRL's generation needs left padding
        model = self.optimiser._load_model(self.policy, weights_dtype)
        use_cache = bool(getattr(model.config, "use_cache", False))
        # TRL loads the reference from the folder the policy's config names.
        model.config.name_or_path = str(self.reference)
        total = cfg.ppo_steps * cfg.ppo_epochs
        guard = _KLGuard(cfg.kl_bound)
        log.info(
            "%s: %d prompts, %d rollouts of %d x %d responses, beta %g, on %s",
            cfg.algorithm,
            len(kept),
            cfg.ppo_steps,
            cfg.rollout_batch_size,
            cfg.num_generations,
            cfg.kl_coef,
            self.device,
        )
        rows = [{"prompt": _turns(p.messages), "prompt_id": p.id} for p in kept]
        with tempfile.TemporaryDirectory(prefix=f"caikit-{cfg.algorithm}-") as scratch:
            args = ConfigClass(
                output_dir=scratch,
                learning_rate=cfg.learning_rate,
                max_steps=total,
                per_device_train_batch_size=per_pass,
                gradient_accumulation_steps=sequences // per_pass,
                num_generations=cfg.num_generations,
                max_completion_length=cfg.max_new_tokens,
                temperature=cfg.temperature,
                beta=cfg.kl_coef,
                num_iterations=cfg.ppo_epochs,
                epsilon=cfg.cliprange,
                **trainer_defaults(
                    checkpointing=cfg.gradient_checkpointing,
                    seed=cfg.seed,
                    device=self.device,
                    bf16=mixed_bf16,
                    logging_steps=1,
                ),
            )
            trainer = TrainerClass(
                model=model,
                reward_funcs=preference_reward_function(reward),
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=self.optimiser._lora_config() if cfg.lora else None,
                callbacks=[_LossLog(total, cfg.algorithm), guard],
            )
            trainer.remove_callback(transformers.PrinterCallback)
            result = trainer.train()
        self.history = [dict(entry) for entry in trainer.state.log_history]
        # Every optimiser step logs its loss; rewards come with each rollout only.
        steps = [h for h in self.history if "loss" in h]
        rollouts = [h for h in self.history if "reward" in h]
        model.config.name_or_path = str(self.policy)
        tokenizer.padding_side = padding_side
        self._save(trainer.model, tokenizer, use_cache)
        del trainer, model
        self._release()
        if guard.tripped is not None:
            step, kl = guard.tripped
            message = (
                f"{cfg.algorithm}: stopped at step {step}: KL to the reference per response "
                f"{kl:.6g} exceeds kl_bound = {cfg.kl_bound:g}; the policy after this step is "
                f"saved to {self.out}"
            )
            raise TrainingStopped(message, checkpoint=str(self.out))
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
            kl_last = _sequence_kl(rollouts[-1])
            if kl_last is not None:
                metrics["kl_last"] = kl_last
                metrics["kl_token_last"] = float(rollouts[-1]["kl"])
        return metrics

    # helpers --------------------------------------------------------------------------
    def _fitting_prompts(self, prompts: Sequence[Prompt]) -> tuple[list[Prompt], int]:
        """The prompts whose chat-formatted tokens plus ``max_new_tokens`` fit ``max_length``.

        :raises CaikitError: no prompts, or none that fits.
        """
        cfg = self.cfg
        if not prompts:
            raise CaikitError(f"{_WHO}: {cfg.algorithm} was given no prompts to train on")
        tokenizer = self.optimiser._load_tokenizer(self.policy)
        room = cfg.max_length - cfg.max_new_tokens
        kept = []
        for p in prompts:
            ids = tokenizer.apply_chat_template(
                _turns(p.messages), add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            if len(ids) <= room:
                kept.append(p)
        too_long = len(prompts) - len(kept)
        if too_long:
            log.warning(
                "%s: left out %d of %d prompts longer than max_length - max_new_tokens = %d tokens",
                cfg.algorithm,
                too_long,
                len(prompts),
                room,
            )
        if not kept:
            raise CaikitError(
                f"{_WHO}: every one of the {len(prompts)} prompts is longer than max_length - "
                f"max_new_tokens = {room} tokens; raise max_length"
            )
        return kept, too_long

    def _save(self, trained: Any, tokenizer: Any, use_cache: bool) -> None:
        """Save a plain checkpoint (LoRA merged) and the tokenizer into ``out``."""
        if self.cfg.lora:
            trained = trained.merge_and_unload()
        if hasattr(trained.config, "use_cache"):
            trained.config.use_cache = use_cache
        trained.save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)

    def _release(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
