"""SL-CAI for the ``torch`` policy optimiser: fine-tuning on revisions with TRL.

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
``AutoModelForCausalLM.from_pretrained`` loads. The settings are
``[policy_optimiser.sft]`` (:class:`~caikit_core.training.settings.SFTSettings`).

This module imports torch, transformers, TRL and datasets at import time;
:meth:`caikit_torch.optimiser.TorchOptimiser.sft` imports it when it runs.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from caikit_core.converter import converter
from caikit_core.errors import CaikitError
from caikit_core.training.data import SFTExamples
from caikit_torch.checkpoints import make_resumable
from caikit_torch.common import (
    WHO,
    LossLog,
    add_report_callbacks,
    load_model,
    load_tokenizer,
    lora_config,
    precision,
    scratch_or,
    total_steps,
    trainer_defaults,
)
from caikit_torch.config import TorchOptimiserConfig
from caikit_torch.distributed import is_main_process, launch

__all__ = ["SFT_RECORD", "fine_tune", "fine_tune_launched", "fitting_examples", "worker"]

log = logging.getLogger("caikit.torch")

#: The file in a saved checkpoint that records how it was fine-tuned.
SFT_RECORD = "caikit_sft.json"


def fine_tune(
    cfg: TorchOptimiserConfig,
    folder: Path,
    data: SFTExamples,
    out: Path,
    device: str,
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """Load, train and save; returns the metrics (all but ``seconds``) and the
    ``(step, loss)`` of each logged step. With ``checkpoint_dir``, resumable
    checkpoints are saved there (``cfg.checkpoint_every_*``) and training continues
    from the newest one (:func:`caikit_torch.checkpoints.make_resumable`)."""
    sft = cfg.sft
    weights_dtype, mixed_bf16 = precision(cfg.dtype, device)
    transformers.set_seed(cfg.seed)
    tokenizer = load_tokenizer(folder)
    rows, too_long = fitting_examples(data.examples, tokenizer, sft.max_length)
    if not rows:
        raise CaikitError(
            f"{WHO}: every prompt is at least max_length = {sft.max_length} tokens long, "
            "leaving no revision tokens to train on; raise max_length"
        )
    model = load_model(folder, weights_dtype)
    use_cache = bool(getattr(model.config, "use_cache", False))
    total = total_steps(len(rows), sft, cfg.num_processes)
    log.info(
        "sft: %d examples from %d traces (%s), %d steps on %s, %s",
        len(rows),
        data.traces,
        sft.target,
        total,
        device,
        f"LoRA r={cfg.lora_r}" if cfg.lora else "all weights",
    )
    with scratch_or(checkpoint_dir, "caikit-sft-") as scratch:
        args = SFTConfig(
            output_dir=scratch,
            learning_rate=sft.learning_rate,
            num_train_epochs=sft.epochs,
            max_steps=sft.max_steps if sft.max_steps is not None else -1,
            per_device_train_batch_size=sft.batch_size,
            gradient_accumulation_steps=sft.gradient_accumulation_steps,
            max_length=sft.max_length,
            completion_only_loss=True,
            assistant_only_loss=False,
            packing=False,
            **trainer_defaults(
                checkpointing=cfg.gradient_checkpointing,
                seed=cfg.seed,
                device=device,
                bf16=mixed_bf16,
                total=total,
                report_to=cfg.report_to,
            ),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if cfg.lora else None,
            callbacks=[LossLog(total)],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        add_report_callbacks(trainer, cfg.report_to, out / "logs")
        resume = make_resumable(
            trainer,
            checkpoint_dir,
            cfg.checkpoint_every_steps,
            cfg.checkpoint_every_minutes,
            fit="sft",
        )
        result = trainer.train(resume_from_checkpoint=resume)
    losses = [
        (int(entry["step"]), float(entry["loss"]))
        for entry in trainer.state.log_history
        if "loss" in entry and "step" in entry
    ]
    trained: Any = trainer.model
    if cfg.lora:
        trained = trained.merge_and_unload()
    if hasattr(trained.config, "use_cache"):
        trained.config.use_cache = use_cache
    if is_main_process():
        trained.save_pretrained(out)
        tokenizer.save_pretrained(out)
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "loss_first": losses[0][1] if losses else float("nan"),
        "loss_last": losses[-1][1] if losses else float("nan"),
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
    return metrics, losses


def fine_tune_launched(
    cfg: TorchOptimiserConfig,
    folder: Path,
    data: SFTExamples,
    out: Path,
    device: str,
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """:func:`fine_tune` data-parallel in ``cfg.num_processes`` worker processes
    (:func:`caikit_torch.distributed.launch`); rank 0 saves into ``out``."""
    job = {
        "config": converter.unstructure(cfg),
        "folder": str(folder),
        "data": converter.unstructure(data),
        "out": str(out),
        "device": device,
        "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
    }
    result = launch("caikit_torch.sft:worker", job, cfg.num_processes, fit="sft", who=WHO)
    losses = [(int(step), float(loss)) for step, loss in result["losses"]]
    return {k: float(v) for k, v in result["metrics"].items()}, losses


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One worker of :func:`fine_tune_launched`: :func:`fine_tune` on this rank's shard."""
    ckpt = job["checkpoint_dir"]
    metrics, losses = fine_tune(
        converter.structure(job["config"], TorchOptimiserConfig),
        Path(job["folder"]),
        converter.structure(job["data"], SFTExamples),
        Path(job["out"]),
        job["device"],
        None if ckpt is None else Path(ckpt),
    )
    return {"metrics": metrics, "losses": losses}


def fitting_examples(
    examples: list[dict[str, Any]], tokenizer: Any, limit: int
) -> tuple[list[dict[str, Any]], int]:
    """The examples whose prompt leaves room for revision tokens, and how many do not."""
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
