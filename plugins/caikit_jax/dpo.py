"""RL-CAI with ``algorithm = "dpo"`` for the ``jax`` policy optimiser: Tunix's
``DPOTrainer`` (sigmoid loss, ``beta`` from ``[policy_optimiser.dpo]``, the reference
model frozen) on the pairs :func:`caikit_core.training.data.dpo_pairs` builds from
the soft labels (ties and identical responses left out).

This module imports JAX and optax at import time (Tunix when it runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optax

from caikit_core.errors import TrainingStopped
from caikit_core.records import LabelledComparison
from caikit_core.training.data import require_dpo_pairs
from caikit_jax.checkpoints import Checkpointer
from caikit_jax.common import WHO, bucket
from caikit_jax.config import JaxOptimiserConfig
from caikit_jax.model import load_model, make_mesh, param_dtype, read_tokenizer, save_checkpoint

__all__ = ["LossRecorder", "dpo_batches", "train_dpo"]


def train_dpo(
    cfg: JaxOptimiserConfig,
    policy: Path,
    reference: Path,
    labelled: Sequence[LabelledComparison],
    out: Path,
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """DPO with Tunix's ``DPOTrainer`` on the labelled pairs; the metrics and losses.

    With ``checkpoint_dir``: checkpoints of the policy, the optimiser and the losses at
    step boundaries (:class:`LossRecorder`), and a resume from the newest. The batches
    are a seeded list, so the data cursor is the step: Tunix's loop skips the batches
    of the steps already done (``_iter_steps``)."""
    from tunix.sft import hooks
    from tunix.sft.dpo import dpo_trainer

    dpo = cfg.dpo
    pairs = require_dpo_pairs(labelled, who=WHO)
    tokenizer = read_tokenizer(policy, who=WHO)
    pad = int(tokenizer.pad_token_id)
    encoded = []
    for example in pairs.examples:
        prompt = tokenizer.apply_chat_template(
            example["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        sides = []
        for key in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(
                example["prompt"] + example[key], tokenize=True, return_dict=True
            )["input_ids"]
            sides.append([int(t) for t in full[len(prompt) :]])
        encoded.append(([int(t) for t in prompt], sides[0], sides[1]))
    mesh = make_mesh()
    model = load_model(
        policy, mesh=mesh, dtype=param_dtype(cfg.dtype), remat=cfg.gradient_checkpointing
    )
    ref_model = load_model(reference, mesh=mesh, dtype=param_dtype(cfg.dtype))
    per_epoch = math.ceil(len(encoded) / (dpo.batch_size * dpo.gradient_accumulation_steps))
    steps = (
        dpo.max_steps if dpo.max_steps is not None else max(1, math.ceil(dpo.epochs * per_epoch))
    )
    saver = Checkpointer(checkpoint_dir, "dpo", cfg)
    recorder = LossRecorder(saver, steps)
    trainer = dpo_trainer.DPOTrainer(
        model=model,
        ref_model=ref_model,
        optimizer=optax.adamw(
            optax.linear_schedule(dpo.learning_rate, 0.0, steps), weight_decay=0.0
        ),
        training_config=dpo_trainer.DPOTrainingConfig(
            eval_every_n_steps=10**9,
            max_steps=steps,
            gradient_accumulation_steps=dpo.gradient_accumulation_steps,
            beta=dpo.beta,
            label_smoothing=0.0,
            pbar_description=None,
        ),
    )
    trainer.with_training_hooks(recorder)  # duck-typed Tunix hooks
    recorder.resume(trainer)
    batches = list(dpo_batches(cfg, encoded, pad, steps * dpo.gradient_accumulation_steps))
    tick = time.perf_counter()
    with mesh:
        trainer.train(batches)
    elapsed = time.perf_counter() - tick
    if not recorder.losses or not all(math.isfinite(x) for _, x in recorder.losses):
        raise TrainingStopped(f"{WHO}: the DPO loss became non-finite ({recorder.losses})")
    losses = recorder.losses
    save_checkpoint(model, out, source=policy)
    values = [loss for _, loss in losses]
    metrics: dict[str, float] = {
        "train_loss": float(np.mean(values)),
        "loss_first": values[0],
        "loss_last": values[-1],
        "pairs": float(len(encoded)),
        "ties": float(pairs.ties),
        "identical": float(pairs.identical),
        "beta": float(dpo.beta),
        "steps": float(len(values)),
        "train_seconds": elapsed,
    }
    logger = trainer.metrics_logger
    for name, key in (("rewards/margin", "margin_last"), ("rewards/accuracy", "accuracy_last")):
        if logger.metric_exists("", name, "train"):
            metrics[key] = float(logger.get_metric_history("", name, "train")[-1])
    trainer.close()
    _ = hooks  # the recorder subclasses hooks.TrainingHooks
    return metrics, losses


def dpo_batches(
    cfg: JaxOptimiserConfig,
    encoded: list[tuple[list[int], list[int], list[int]]],
    pad: int,
    count: int,
) -> Any:
    """``count`` seeded batches of Tunix's ``TrainingInput`` from the encoded pairs."""
    from tunix.sft.dpo import dpo_trainer

    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    for _ in range(count):
        if len(order) < cfg.dpo.batch_size:
            order.extend(rng.permutation(len(encoded)).tolist())
        chunk, order = order[: cfg.dpo.batch_size], order[cfg.dpo.batch_size :]
        budget = cfg.dpo.max_length
        prompts = [encoded[i][0][-(budget // 2) :] for i in chunk]
        p_width = bucket(max(len(p) for p in prompts), budget)
        left = budget - p_width
        chosen = [encoded[i][1][: max(1, left)] for i in chunk]
        rejected = [encoded[i][2][: max(1, left)] for i in chunk]
        c_width = bucket(max(len(x) for x in chosen + rejected), max(1, left))
        p_ids = np.full((len(chunk), p_width), pad, dtype=np.int32)
        p_mask = np.zeros_like(p_ids)
        for r, p in enumerate(prompts):
            p_ids[r, p_width - len(p) :] = p
            p_mask[r, p_width - len(p) :] = 1

        def right(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
            ids = np.full((len(rows), width), pad, dtype=np.int32)
            mask = np.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = row
                mask[r, : len(row)] = 1
            return ids, mask

        c_ids, c_mask = right(chosen, c_width)
        r_ids, r_mask = right(rejected, c_width)
        yield dpo_trainer.TrainingInput(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            chosen_ids=c_ids,
            chosen_mask=c_mask,
            rejected_ids=r_ids,
            rejected_mask=r_mask,
        )


class LossRecorder:
    """A Tunix training hook that keeps every step's loss and, with a
    :class:`~caikit_jax.checkpoints.Checkpointer`, saves checkpoints.

    Tunix reports a step's loss one step late (in the next step's metrics write), so a
    checkpoint is saved when step ``N + 1`` starts, with the loss of step ``N`` taken
    from the trainer's buffered metrics, exactly what the hook would be given.
    """

    def __init__(self, saver: Checkpointer | None = None, steps: int = 0) -> None:
        self.losses: list[tuple[int, float]] = []
        self.saver = saver
        self.steps = steps

    def resume(self, trainer: Any) -> None:
        """Restore the newest checkpoint into ``trainer`` (policy, optimiser, step)."""
        if self.saver is None:
            return
        loop = self.saver.restore({"model": trainer.model, "optimizer": trainer.optimizer})
        if loop is None:
            return
        done = int(loop["step"])
        self.losses = [(int(s), float(x)) for s, x in loop["losses"]]
        trainer._train_steps = done
        trainer._iter_steps = done * trainer.config.get_with_default(
            "gradient_accumulation_steps", 1
        )

    def on_train_start(self, train_ctx: Any) -> None:
        pass

    def on_train_end(self, train_ctx: Any) -> None:
        pass

    def on_train_step_start(self, train_ctx: Any) -> None:
        if self.saver is None:
            return
        done = int(train_ctx._train_steps)
        accumulate = train_ctx.config.get_with_default("gradient_accumulation_steps", 1)
        pending = train_ctx._prev_buffered_train_metrics
        if done == 0 or train_ctx._iter_steps % accumulate or pending is None:
            return
        if not self.saver.due(done, self.steps):
            return
        losses = [*self.losses, (done, float(pending.loss))]
        self.saver.save(
            done,
            {"model": train_ctx.model, "optimizer": train_ctx.optimizer},
            {"step": done, "losses": losses},
        )

    def on_train_step_end(self, train_ctx: Any, train_step: int, train_loss: float) -> None:
        self.losses.append((int(train_step), float(train_loss)))

    def on_eval_step_start(self, train_ctx: Any) -> None:
        pass

    def on_eval_step_end(self, train_ctx: Any, eval_loss: float) -> None:
        pass
