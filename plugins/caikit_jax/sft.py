"""SL-CAI for the ``jax`` policy optimiser: completion-only fine-tuning on revisions.

The examples are the ones the ``torch`` optimiser builds
(:func:`caikit_core.training.data.sft_examples`): the prompt is the chat-formatted
conversation with the assistant turn opened, the loss the mean negative
log-likelihood of the completion's tokens. AdamW (no weight decay, linear decay to
0), ``gradient_accumulation_steps`` through ``optax.MultiSteps``; the settings are
``[policy_optimiser.sft]``. The loop is caikit's: Tunix's ``PeftTrainer`` derives the
attention mask and the loss mask from one ``input_mask``, so it cannot train on
completions only without replacing both its loss and its input function.

This module imports JAX, Flax and optax at import time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from caikit_core.errors import CaikitError, TrainingStopped
from caikit_core.interfaces import FitReport
from caikit_core.records import RevisionTrace
from caikit_core.training.data import require_sft_examples
from caikit_jax.checkpoints import Checkpointer
from caikit_jax.common import SFT_RECORD, WHO, bucket, checkpoint_folder, write_record
from caikit_jax.compilation import COMPILE_METRIC, CompileClock, use_persistent_cache
from caikit_jax.config import JaxOptimiserConfig
from caikit_jax.model import (
    check_device,
    load_model,
    make_mesh,
    param_dtype,
    place_on_mesh,
    read_tokenizer,
    save_checkpoint,
    token_logprobs,
)

__all__ = ["fit_sft", "sft_step", "train_sft"]

log = logging.getLogger("caikit.jax")


@nnx.jit(donate_argnames=("model", "optimizer"))
def sft_step(
    model: Any,
    optimizer: nnx.Optimizer[Any],
    ids: jax.Array,
    mask: jax.Array,
    loss_mask: jax.Array,
) -> jax.Array:
    """One optimiser step on the completion tokens' mean negative log-likelihood.

    The model's and the optimiser's buffers are donated: XLA writes the new weights
    and moments over the old ones instead of holding both.
    """

    def loss_fn(m: Any) -> jax.Array:
        logp = token_logprobs(m, ids, mask)
        weights = loss_mask[:, 1:].astype(jnp.float32)
        return -(logp * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    loss: jax.Array
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train_sft(
    cfg: JaxOptimiserConfig,
    policy: str,
    examples: Sequence[RevisionTrace],
    out: Path,
    checkpoint_dir: Path | None = None,
) -> tuple[FitReport, list[tuple[int, float]]]:
    """Fine-tune ``policy`` on the revisions of ``examples`` and save it to ``out``;
    returns the report and the ``(step, loss)`` of every step. With ``checkpoint_dir``
    it saves checkpoints there (``checkpoint_every_*``) and resumes from the newest
    (:mod:`caikit_jax.checkpoints`).

    Metrics as the ``torch`` optimiser reports them (``train_loss``,
    ``loss_first``, ``loss_last``, ``examples``, ``traces``, ``skipped_empty``,
    ``skipped_marked``, ``too_long``, ``steps``, ``seconds``) and
    ``compile_seconds`` (the first step, which includes XLA compilation) and
    ``time/compile`` (the seconds JAX spent compiling, :mod:`caikit_jax.compilation`).
    """
    sft = cfg.sft
    started = time.perf_counter()
    data = require_sft_examples(examples, sft.target, who=WHO)
    check_device(cfg.device, WHO)
    folder = checkpoint_folder(policy, "policy")
    tokenizer = read_tokenizer(folder, who=WHO)
    rows: list[tuple[list[int], int]] = []
    too_long = 0
    for example in data.examples:
        prompt = tokenizer.apply_chat_template(
            example["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        full = tokenizer.apply_chat_template(
            example["prompt"] + example["completion"], tokenize=True, return_dict=True
        )["input_ids"]
        if len(prompt) >= sft.max_length:
            too_long += 1
            continue
        rows.append(([int(t) for t in full[: sft.max_length]], len(prompt)))
    if not rows:
        raise CaikitError(
            f"{WHO}: every prompt is at least max_length = {sft.max_length} tokens long"
        )
    mesh = make_mesh()
    use_persistent_cache()
    from caikit_jax.shims import tracer_sharding_without_origin  # imports Tunix

    with CompileClock() as clock, tracer_sharding_without_origin():
        model = load_model(
            folder, mesh=mesh, dtype=param_dtype(cfg.dtype), remat=cfg.gradient_checkpointing
        )
        metrics, losses = fit_sft(
            cfg, mesh, model, rows, int(tokenizer.pad_token_id), checkpoint_dir
        )
    metrics[COMPILE_METRIC] = clock.seconds
    out = Path(out)
    save_checkpoint(model, out, source=folder)
    metrics.update(
        examples=float(len(rows)),
        traces=float(data.traces),
        skipped_empty=float(data.empty),
        skipped_marked=float(data.marked_skipped),
        too_long=float(too_long),
        seconds=time.perf_counter() - started,
    )
    write_record(out / SFT_RECORD, folder, cfg, metrics, losses)
    log.info(
        "sft (jax): %d steps, loss %.4f -> %.4f",
        int(metrics["steps"]),
        metrics["loss_first"],
        metrics["loss_last"],
    )
    return FitReport(str(out), metrics), losses


def fit_sft(
    cfg: JaxOptimiserConfig,
    mesh: jax.sharding.Mesh,
    model: Any,
    rows: list[tuple[list[int], int]],
    pad: int,
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """The SFT loop over tokenised ``(ids, prompt length)`` rows; the metrics and losses.
    With ``checkpoint_dir``: checkpoints at step boundaries, resumed from the newest."""
    sft = cfg.sft
    accumulate = sft.gradient_accumulation_steps
    per_epoch = math.ceil(len(rows) / (sft.batch_size * accumulate))
    steps = (
        sft.max_steps if sft.max_steps is not None else max(1, math.ceil(sft.epochs * per_epoch))
    )
    tx: Any = optax.adamw(optax.linear_schedule(sft.learning_rate, 0.0, steps), weight_decay=0.0)
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    place_on_mesh(mesh, model, optimizer)
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    losses: list[tuple[int, float]] = []
    compile_seconds = 0.0
    saver = Checkpointer(checkpoint_dir, "sft", cfg)
    objects = {"model": model, "optimizer": optimizer}
    start = 0
    if (loop := saver.restore(objects)) is not None:
        rng.bit_generator.state = loop["rng"]
        order = loop["order"]
        losses = [(int(s), float(x)) for s, x in loop["losses"]]
        compile_seconds = float(loop["compile_seconds"])
        start = int(loop["step"]) * accumulate
        log.info("sft (jax): resuming after step %d from %s", loop["step"], checkpoint_dir)
    for micro in range(start, steps * accumulate):
        if len(order) < sft.batch_size:
            order.extend(rng.permutation(len(rows)).tolist())
        chunk, order = order[: sft.batch_size], order[sft.batch_size :]
        width = bucket(max(len(rows[i][0]) for i in chunk), sft.max_length)
        ids = np.full((len(chunk), width), pad, dtype=np.int32)
        mask = np.zeros((len(chunk), width), dtype=np.int32)
        loss_mask = np.zeros((len(chunk), width), dtype=np.int32)
        for r, i in enumerate(chunk):
            tokens, prompt_len = rows[i]
            ids[r, : len(tokens)] = tokens
            mask[r, : len(tokens)] = 1
            loss_mask[r, prompt_len : len(tokens)] = 1
        tick = time.perf_counter()
        loss = float(
            sft_step(model, optimizer, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask))
        )
        if micro == 0:
            compile_seconds = time.perf_counter() - tick
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"{WHO}: the SFT loss became {loss} at step {micro // accumulate + 1}; "
                "lower learning_rate"
            )
        if (micro + 1) % accumulate == 0:
            step = micro // accumulate + 1
            losses.append((step, loss))
            if saver.due(step, steps):
                loop = {
                    "step": step,
                    "rng": rng.bit_generator.state,
                    "order": order,
                    "losses": losses,
                    "compile_seconds": compile_seconds,
                }
                saver.save(step, objects, loop)
    values = [loss for _, loss in losses]
    return {
        "train_loss": float(np.mean(values)),
        "loss_first": values[0],
        "loss_last": values[-1],
        "steps": float(steps),
        "compile_seconds": compile_seconds,
    }, losses
