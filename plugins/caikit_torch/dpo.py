"""RL-CAI with ``algorithm = "dpo"`` for the ``torch`` policy optimiser: TRL's
``DPOTrainer`` on the AI-labelled pairs (:func:`~caikit_core.training.data.dpo_pairs`).

The response with ``p_a >= 0.5`` is chosen (A when above, B when below); exact ties
(``p_a == 0.5``) and pairs of identical responses are dropped and counted. ``beta``
is ``[policy_optimiser.dpo] beta``. In TRL 1.16 only the ``robust`` and ``exo_pair``
losses read ``label_smoothing`` (its ``sigmoid`` loss no longer does, unlike
conservative DPO in older TRL), so the soft labels enter through it: by default it
is the mean of ``min(p_a, 1 - p_a)`` over the pairs, the probability the labeller
gives the other response (clipped to [0.001, 0.49]). The preference model is not used.

This module imports torch, transformers, TRL and datasets at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import transformers
from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from caikit_core.converter import converter
from caikit_core.records import LabelledComparison
from caikit_core.training.data import DPOPairs, require_dpo_pairs
from caikit_core.training.settings import SMOOTHED_DPO_LOSSES
from caikit_torch.checkpoints import make_resumable
from caikit_torch.common import (
    WHO,
    LossLog,
    RLRun,
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
from caikit_torch.distributed import launch

__all__ = ["derived_label_smoothing", "train_dpo", "train_dpo_launched", "worker"]

log = logging.getLogger("caikit.torch")

#: The bounds of the label smoothing derived from the soft labels.
SMOOTHING_RANGE = (1e-3, 0.49)


def derived_label_smoothing(pairs: DPOPairs) -> float:
    """The label smoothing implied by the soft labels: their mean minority probability,
    clipped to [0.001, 0.49] (TRL's robust loss needs it below 0.5, EXO above 0)."""
    low, high = SMOOTHING_RANGE
    return min(high, max(low, pairs.label_noise))


def train_dpo(run: RLRun, labelled: Sequence[LabelledComparison]) -> dict[str, float]:
    """DPO with TRL's ``DPOTrainer`` on the labelled pairs; returns the metrics."""
    cfg = run.cfg
    table = cfg.dpo
    pairs = require_dpo_pairs(labelled, who=WHO)
    if table.loss in SMOOTHED_DPO_LOSSES:
        smoothing = (
            table.label_smoothing
            if table.label_smoothing is not None
            else derived_label_smoothing(pairs)
        )
    else:
        smoothing = 0.0
    weights_dtype, mixed_bf16 = precision(cfg.dtype, run.device)
    transformers.set_seed(cfg.seed)
    tokenizer = load_tokenizer(run.policy)
    model = load_model(run.policy, weights_dtype)
    use_cache = bool(getattr(model.config, "use_cache", False))
    # With LoRA the adapters switched off give the policy itself: no second copy.
    same = run.reference.resolve() == run.policy.resolve()
    ref_model = None if cfg.lora and same else load_model(run.reference, weights_dtype)
    total = total_steps(len(pairs.examples), table, cfg.num_processes)
    log.info(
        "dpo: %d pairs (%d ties, %d identical left out), loss %s, beta %g, "
        "label_smoothing %g, %d steps on %s",
        len(pairs.examples),
        pairs.ties,
        pairs.identical,
        table.loss,
        table.beta,
        smoothing,
        total,
        run.device,
    )
    with scratch_or(run.checkpoint_dir, "caikit-dpo-") as scratch:
        args = DPOConfig(
            output_dir=scratch,
            learning_rate=table.learning_rate,
            num_train_epochs=table.epochs,
            max_steps=table.max_steps if table.max_steps is not None else -1,
            per_device_train_batch_size=table.batch_size,
            gradient_accumulation_steps=table.gradient_accumulation_steps,
            max_length=table.max_length,
            beta=table.beta,
            loss_type=[table.loss],
            label_smoothing=smoothing,
            **trainer_defaults(
                checkpointing=cfg.gradient_checkpointing,
                seed=cfg.seed,
                device=run.device,
                bf16=mixed_bf16,
                total=total,
                report_to=cfg.report_to,
            ),
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=datasets.Dataset.from_list(pairs.examples),
            processing_class=tokenizer,
            peft_config=lora_config(cfg) if cfg.lora else None,
            callbacks=[LossLog(total, "dpo")],
        )
        trainer.remove_callback(transformers.PrinterCallback)
        add_report_callbacks(trainer, cfg.report_to, run.out / "logs")
        prepared: Any = trainer.train_dataset  # TRL drops prompts that fill max_length
        kept = len(prepared)
        resume = make_resumable(
            trainer,
            run.checkpoint_dir,
            cfg.checkpoint_every_steps,
            cfg.checkpoint_every_minutes,
            fit="dpo",
        )
        result = trainer.train(resume_from_checkpoint=resume)
    run.history = [dict(entry) for entry in trainer.state.log_history]
    steps = [h for h in run.history if "loss" in h]
    run.save(trainer.model, tokenizer, use_cache)
    metrics: dict[str, float] = {
        "train_loss": float(result.training_loss),
        "loss_first": float(steps[0]["loss"]) if steps else float(result.training_loss),
        "loss_last": float(steps[-1]["loss"]) if steps else float(result.training_loss),
        "pairs": float(kept),
        "ties": float(pairs.ties),
        "identical": float(pairs.identical),
        "too_long": float(len(pairs.examples) - kept),
        "beta": float(table.beta),
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
    run.release()
    return metrics


def train_dpo_launched(run: RLRun, labelled: Sequence[LabelledComparison]) -> dict[str, float]:
    """:func:`train_dpo` data-parallel in ``num_processes`` worker processes
    (:func:`caikit_torch.distributed.launch`); rank 0 saves into ``run.out``."""
    job = {
        "config": converter.unstructure(run.cfg),
        "policy": str(run.policy),
        "reference": str(run.reference),
        "device": run.device,
        "out": str(run.out),
        "checkpoint_dir": None if run.checkpoint_dir is None else str(run.checkpoint_dir),
        "labelled": converter.unstructure(list(labelled)),
    }
    result = launch("caikit_torch.dpo:worker", job, run.cfg.num_processes, fit="dpo", who=WHO)
    run.history = list(result["history"])
    return {k: float(v) for k, v in result["metrics"].items()}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One worker of :func:`train_dpo_launched`: :func:`train_dpo` on this rank's shard."""
    run = RLRun(
        converter.structure(job["config"], TorchOptimiserConfig),
        Path(job["policy"]),
        Path(job["reference"]),
        job["device"],
        Path(job["out"]),
    )
    ckpt = job["checkpoint_dir"]
    run.checkpoint_dir = None if ckpt is None else Path(ckpt)
    labelled = converter.structure(job["labelled"], list[LabelledComparison])
    metrics = train_dpo(run, labelled)
    return {"metrics": metrics, "history": run.history}
