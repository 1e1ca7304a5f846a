"""The ``torch`` policy optimiser's implementation: SFT on revisions with TRL.

RL-CAI (:meth:`TorchOptimiser.optimise`) lives in :mod:`caikit_torch.rl`, imported
when it is called.

Every revision trace becomes a conversational *prompt-completion* example::

    {"prompt": [...the prompt's messages],
     "completion": [{"role": "assistant", "content": <revision>}]}

TRL's ``SFTTrainer`` renders both with the tokenizer's chat template and computes
the loss on the completion's tokens only (``completion_only_loss``), masking the
prompt. That works with any chat template, unlike ``assistant_only_loss``, which
needs ``{% generation %}`` markers that most templates lack.

With ``lora = true`` the adapters are merged into the base weights after
training, so the saved folder is always a plain Hugging Face checkpoint (weights
as ``model.safetensors``, the tokenizer, and ``caikit_sft.json`` recording the
base model, the settings, the metrics and the loss curve) that
``AutoModelForCausalLM.from_pretrained`` loads.

This module imports torch, transformers, TRL and datasets at import time;
:mod:`caikit_torch.plugin` imports it only when the factory runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import datasets
import torch
import transformers
import trl
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from caikit_core.errors import CaikitError, PluginError
from caikit_core.interfaces import FitReport, PreferenceModel
from caikit_core.records import LabelledComparison, Prompt, RevisionTrace
from caikit_core.training_data import SFTExamples, require_sft_examples, sft_examples
from caikit_torch.plugin import CAPABILITIES, TorchOptimiserConfig

__all__ = ["SFT_RECORD", "SFTExamples", "TorchOptimiser", "sft_examples"]

log = logging.getLogger("caikit.torch")

#: The file in a saved checkpoint that records how it was fine-tuned.
SFT_RECORD = "caikit_sft.json"

_WHO = "torch policy optimiser"


def _policy_folder(policy: str, who: str = _WHO, what: str = "policy") -> Path:
    """The checkpoint folder of ``policy``, or a :class:`PluginError` naming the path.

    :param who: the plugin named in errors.
    :param what: what the folder is for (``"policy"``, ``"reference"``, ``"trunk"``).
    """
    path = Path(policy).expanduser()
    if not path.exists():
        raise PluginError(
            f"{who}: {what} folder {path} does not exist (the {what} must be a local "
            "Hugging Face checkpoint folder)"
        )
    if not path.is_dir():
        raise PluginError(f"{who}: {what} {path} is not a folder")
    if not (path / "config.json").is_file():
        raise PluginError(
            f"{who}: {what} folder {path} is not a Hugging Face checkpoint (no config.json)"
        )
    return path


def _resolve_device(device: str, who: str = _WHO) -> str:
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PluginError(f"{who}: device = 'cuda' but torch sees no CUDA device")
    return "cuda" if device in ("auto", "cuda") and cuda else "cpu"


def _precision(dtype: str, device: str, who: str = _WHO) -> tuple[torch.dtype, bool]:
    """The weights' dtype and whether to train with bfloat16 mixed precision."""
    bf16_ok = device == "cpu" or torch.cuda.is_bf16_supported()
    if dtype == "bfloat16":
        if not bf16_ok:
            raise PluginError(f"{who}: dtype = 'bfloat16' but this GPU does not support it")
        return torch.bfloat16, False
    if dtype == "float32":
        return torch.float32, False
    return torch.float32, device == "cuda" and bf16_ok


def _total_steps(examples: int, cfg: TorchOptimiserConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(examples / cfg.batch_size) / cfg.gradient_accumulation_steps)
    return max(1, math.ceil(cfg.epochs * per_epoch))


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Show or hide datasets' and transformers' progress bars for the duration.

    Both libraries keep the setting in a global; it is restored afterwards.
    """
    hf_logging: Any = transformers.utils.logging
    datasets_shown = not datasets.utils.are_progress_bars_disabled()
    transformers_shown = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():  # an environment variable may overrule us: fine
        warnings.simplefilter("ignore")
        if show:
            datasets.utils.enable_progress_bars()
            hf_logging.enable_progress_bar()
        else:
            datasets.utils.disable_progress_bars()
            hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if datasets_shown:
                datasets.utils.enable_progress_bars()
            else:
                datasets.utils.disable_progress_bars()
            if transformers_shown:
                hf_logging.enable_progress_bar()
            else:
                hf_logging.disable_progress_bar()


class _LossLog(transformers.TrainerCallback):
    """Logs the training loss: every logged step at DEBUG, about every tenth at INFO.

    :param total: the number of optimiser steps.
    :param label: what the log lines start with (``"sft"``, ``"dpo"``, ...).
    """

    def __init__(self, total: int, label: str = "sft") -> None:
        self.total = total
        self.label = label
        self.every = max(1, total // 10)

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:
            return
        step = int(state.global_step)
        level = logging.INFO if step % self.every == 0 or step == self.total else logging.DEBUG
        log.log(level, "%s: step %d/%d, loss %.4f", self.label, step, self.total, logs["loss"])


def _checkpointing_argument() -> str:
    """The TrainingArguments field that turns on activation recomputation.

    transformers 5.24 calls it ``activation_checkpointing`` (keeping
    ``gradient_checkpointing`` as an older spelling); 5.12, the release the ``jax``
    extra resolves to (see docs/jax.md), knows only ``gradient_checkpointing``.
    """
    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def trainer_defaults(
    *,
    seed: int,
    device: str,
    bf16: bool,
    total: int = 100,
    logging_steps: int | None = None,
    checkpointing: bool = False,
) -> dict[str, Any]:
    """The TrainingArguments every caikit trainer shares: seeded, offline, nothing saved
    by the trainer itself (caikit saves the checkpoint), no hub, no reporting, no tqdm;
    ``checkpointing`` recomputes activations in the backward pass."""
    return {
        _checkpointing_argument(): checkpointing,
        "bf16": bf16,
        "fp16": False,
        "use_cpu": device == "cpu",
        "seed": seed,
        "data_seed": seed,
        "logging_steps": logging_steps if logging_steps is not None else max(1, total // 100),
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "push_to_hub": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


class TorchOptimiser:
    """Fine-tunes a local checkpoint on revisions with TRL (see the module docstring)."""

    capabilities: frozenset[str] = CAPABILITIES

    def __init__(self, config: TorchOptimiserConfig) -> None:
        self.config = config
        #: ``(step, loss)`` of each logged step of the last :meth:`sft` call.
        self.losses: list[tuple[int, float]] = []

    # SL-CAI ---------------------------------------------------------------------------
    def sft(self, policy: str, examples: Sequence[RevisionTrace], out: Path) -> FitReport:
        """Fine-tune ``policy`` on the revisions of ``examples`` and save it to ``out``.

        :param policy: a local Hugging Face checkpoint folder with a chat template.
        :param examples: revision traces; skipped ones and ones with an empty final
            response are left out (and counted in the metrics).
        :param out: the folder to save the fine-tuned checkpoint in (created if
            missing).
        :returns: ``out`` and the metrics ``train_loss`` (mean over steps),
            ``loss_first``, ``loss_last``, ``examples``, ``traces``,
            ``skipped_empty``, ``skipped_marked``, ``too_long``, ``steps``,
            ``epochs`` and ``seconds``.
        :raises CaikitError: no traces, or none with a response to train on.
        :raises PluginError: the policy folder is missing or cannot be loaded.
        """
        cfg = self.config
        started = time.perf_counter()
        data = require_sft_examples(examples, cfg.sft_target, who=_WHO)
        folder = _policy_folder(policy)
        device = _resolve_device(cfg.device)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with _progress_bars(log.isEnabledFor(logging.INFO)):
            metrics = self._train(folder, data, out, device)
        metrics["seconds"] = time.perf_counter() - started
        record = {
            "base": str(folder),
            "config": attrs.asdict(cfg),
            "metrics": metrics,
            "losses": self.losses,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
        }
        (out / SFT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        log.info(
            "sft: %d steps, loss %.4f -> %.4f, saved to %s",
            int(metrics["steps"]),
            metrics["loss_first"],
            metrics["loss_last"],
            out,
        )
        return FitReport(str(out), metrics)

    def _train(self, folder: Path, data: SFTExamples, out: Path, device: str) -> dict[str, float]:
        """Load, train and save; returns the metrics (all but ``seconds``)."""
        cfg = self.config
        weights_dtype, mixed_bf16 = _precision(cfg.dtype, device)
        transformers.set_seed(cfg.seed)
        tokenizer = self._load_tokenizer(folder)
        rows, too_long = self._fitting(data.examples, tokenizer)
        if not rows:
            raise CaikitError(
                f"{_WHO}: every prompt is at least max_length = {cfg.max_length} tokens long, "
                "leaving no revision tokens to train on; raise max_length"
            )
        model = self._load_model(folder, weights_dtype)
        use_cache = bool(getattr(model.config, "use_cache", False))
        total = _total_steps(len(rows), cfg)
        log.info(
            "sft: %d examples from %d traces (%s), %d steps on %s, %s",
            len(rows),
            data.traces,
            cfg.sft_target,
            total,
            device,
            f"LoRA r={cfg.lora_r}" if cfg.lora else "all weights",
        )
        with tempfile.TemporaryDirectory(prefix="caikit-sft-") as scratch:
            args = SFTConfig(
                output_dir=scratch,
                learning_rate=cfg.learning_rate,
                num_train_epochs=cfg.epochs,
                max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
                per_device_train_batch_size=cfg.batch_size,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                max_length=cfg.max_length,
                completion_only_loss=True,
                assistant_only_loss=False,
                packing=False,
                **trainer_defaults(
                    checkpointing=cfg.gradient_checkpointing,
                    seed=cfg.seed,
                    device=device,
                    bf16=mixed_bf16,
                    total=total,
                ),
            )
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=self._lora_config() if cfg.lora else None,
                callbacks=[_LossLog(total)],
            )
            trainer.remove_callback(transformers.PrinterCallback)
            result = trainer.train()
        self.losses = [
            (int(entry["step"]), float(entry["loss"]))
            for entry in trainer.state.log_history
            if "loss" in entry and "step" in entry
        ]
        trained: Any = trainer.model
        if cfg.lora:
            trained = trained.merge_and_unload()
        if hasattr(trained.config, "use_cache"):
            trained.config.use_cache = use_cache
        trained.save_pretrained(out)
        tokenizer.save_pretrained(out)
        metrics: dict[str, float] = {
            "train_loss": float(result.training_loss),
            "loss_first": self.losses[0][1] if self.losses else float("nan"),
            "loss_last": self.losses[-1][1] if self.losses else float("nan"),
            "examples": float(len(rows)),
            "traces": float(data.traces),
            "skipped_empty": float(data.empty),
            "skipped_marked": float(data.marked_skipped),
            "too_long": float(too_long),
            "steps": float(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
        }
        del trainer, trained, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return metrics

    # RL-CAI ---------------------------------------------------------------------------
    def optimise(
        self,
        policy: str,
        reference: str,
        reward: PreferenceModel,
        prompts: Sequence[Prompt],
        labelled: Sequence[LabelledComparison],
        out: Path,
    ) -> FitReport:
        """RL-CAI: optimise ``policy`` with the configured ``algorithm`` and save it to ``out``.

        ``"ppo"``, ``"rloo"`` and ``"grpo"`` sample responses to ``prompts`` and reward
        them with ``reward.score``, penalising the KL divergence to ``reference``;
        ``"dpo"`` trains on the ``labelled`` pairs directly. See :mod:`caikit_torch.rl`.

        :param policy: a local Hugging Face checkpoint folder (the SFT model).
        :param reference: the checkpoint the KL penalty refers to (usually ``policy``).
        :param reward: a fitted (or loaded) preference model.
        :param prompts: the RL prompts (``ppo``, ``rloo``, ``grpo``).
        :param labelled: the AI-labelled comparisons (``dpo``).
        :param out: the folder to save the optimised checkpoint in (created if missing);
            ``caikit_rl.json`` beside it records the settings and per-step metrics.
        :returns: ``out`` and the final metrics.
        :raises CaikitError: nothing to train on, or settings that cannot work together.
        :raises PluginError: a model folder is missing or cannot be loaded.
        :raises TrainingStopped: the KL to the reference went above ``kl_bound``.
        """
        from caikit_torch.rl import optimise

        return optimise(self, policy, reference, reward, prompts, labelled, Path(out))

    # helpers --------------------------------------------------------------------------
    def _load_tokenizer(self, folder: Path) -> Any:
        try:
            tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
                folder, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise PluginError(f"{_WHO}: cannot load the tokenizer of {folder}: {exc}") from exc
        if not getattr(tokenizer, "chat_template", None):
            raise PluginError(
                f"{_WHO}: the tokenizer of {folder} has no chat template; SFT on conversations "
                "needs one"
            )
        return tokenizer

    def _load_model(self, folder: Path, dtype: torch.dtype) -> Any:
        try:
            return transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, local_files_only=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise PluginError(f"{_WHO}: cannot load the policy model {folder}: {exc}") from exc

    def _fitting(
        self, examples: list[dict[str, Any]], tokenizer: Any
    ) -> tuple[list[dict[str, Any]], int]:
        """The examples whose prompt leaves room for revision tokens, and how many do not."""
        limit = self.config.max_length
        kept: list[dict[str, Any]] = []
        for example in examples:
            text = tokenizer.apply_chat_template(
                example["prompt"], add_generation_prompt=True, tokenize=False
            )
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < limit:
                kept.append(example)
        too_long = len(examples) - len(kept)
        if too_long:
            log.warning(
                "sft: left out %d of %d examples whose prompt fills max_length = %d tokens",
                too_long,
                len(examples),
                limit,
            )
        return kept, too_long

    def _lora_config(self) -> Any:
        import peft

        cfg = self.config
        targets: str | list[str] = (
            "all-linear"
            if cfg.lora_target_modules == ("all-linear",)
            else list(cfg.lora_target_modules)
        )
        return peft.LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
        )
