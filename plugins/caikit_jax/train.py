"""The ``jax`` policy optimiser: SFT on revisions, DPO and PPO on Tunix's Llama.

- :meth:`JaxOptimiser.sft`: completion-only fine-tuning, the same examples as the
  ``torch`` optimiser builds (:func:`caikit_core.training_data.sft_examples`): the prompt is
  the chat-formatted conversation with the assistant turn opened, the loss the mean
  negative log-likelihood of the completion's tokens. AdamW (no weight decay,
  linear decay to 0), ``gradient_accumulation_steps`` through ``optax.MultiSteps``.
  The loop is caikit's: Tunix's ``PeftTrainer`` derives the attention mask and the
  loss mask from one ``input_mask``, so it cannot train on completions only without
  replacing both its loss and its input function.
- ``algorithm = "dpo"``: Tunix's ``DPOTrainer`` (sigmoid loss, ``beta = kl_coef``,
  the reference model frozen) on the pairs :func:`caikit_core.training_data.dpo_pairs` builds
  from the soft labels (ties and identical responses left out).
- ``algorithm = "ppo"``: :func:`caikit_jax.ppo.train_ppo`.

Every result is a Hugging Face checkpoint (:func:`caikit_jax.model.save_checkpoint`)
that transformers and the ``hf`` generator load, plus a JSON record.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from caikit_core.errors import CaikitError, PluginError, TrainingStopped
from caikit_core.interfaces import FitReport, PreferenceModel
from caikit_core.records import LabelledComparison, Prompt, RevisionTrace
from caikit_core.training_data import require_dpo_pairs, require_sft_examples
from caikit_jax.model import (
    check_device,
    forward_inputs,
    load_model,
    make_mesh,
    param_dtype,
    place_on_mesh,
    read_tokenizer,
    save_checkpoint,
    token_logprobs,
    versions,
)
from caikit_jax.plugin import CAPABILITIES, JaxOptimiserConfig
from caikit_jax.reward import bucket

__all__ = ["RL_RECORD", "SFT_RECORD", "JaxOptimiser"]

log = logging.getLogger("caikit.jax")

#: The record written next to an SFT checkpoint.
SFT_RECORD = "caikit_sft.json"
#: The record written next to an RL checkpoint.
RL_RECORD = "caikit_rl.json"
_WHO = "jax policy optimiser"


def _folder(name: str, what: str) -> Path:
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise PluginError(
            f"{_WHO}: {what} folder {folder} is not a local Hugging Face checkpoint (no "
            "config.json)"
        )
    return folder


def _dtype(cfg: JaxOptimiserConfig) -> Any:
    return param_dtype(cfg.dtype)


def _check_device(cfg: JaxOptimiserConfig) -> None:
    check_device(cfg.device, _WHO)


@nnx.jit
def _sft_step(
    model: Any,
    optimizer: nnx.Optimizer[Any],
    ids: jax.Array,
    mask: jax.Array,
    loss_mask: jax.Array,
) -> jax.Array:
    def loss_fn(m: Any) -> jax.Array:
        logp = token_logprobs(m, ids, mask)
        weights = loss_mask[:, 1:].astype(jnp.float32)
        return -(logp * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    loss: jax.Array
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


class JaxOptimiser:
    """SFT, DPO and PPO on JAX (see the module docstring)."""

    capabilities: frozenset[str] = CAPABILITIES

    def __init__(self, config: JaxOptimiserConfig) -> None:
        self.config = config
        #: ``(step, loss)`` of every step of the last :meth:`sft` or DPO run.
        self.losses: list[tuple[int, float]] = []

    # SL-CAI -------------------------------------------------------------------------------
    def sft(self, policy: str, examples: Sequence[RevisionTrace], out: Path) -> FitReport:
        """Fine-tune ``policy`` on the revisions of ``examples`` and save it to ``out``.

        Metrics as the ``torch`` optimiser reports them (``train_loss``,
        ``loss_first``, ``loss_last``, ``examples``, ``traces``, ``skipped_empty``,
        ``skipped_marked``, ``too_long``, ``steps``, ``seconds``) and
        ``compile_seconds`` (the first step, which includes XLA compilation).
        """
        cfg = self.config
        started = time.perf_counter()
        data = require_sft_examples(examples, cfg.sft_target, who=_WHO)
        _check_device(cfg)
        folder = _folder(policy, "policy")
        tokenizer = read_tokenizer(folder, who=_WHO)
        rows: list[tuple[list[int], int]] = []
        too_long = 0
        for example in data.examples:
            prompt = tokenizer.apply_chat_template(
                example["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            full = tokenizer.apply_chat_template(
                example["prompt"] + example["completion"], tokenize=True, return_dict=True
            )["input_ids"]
            if len(prompt) >= cfg.max_length:
                too_long += 1
                continue
            rows.append(([int(t) for t in full[: cfg.max_length]], len(prompt)))
        if not rows:
            raise CaikitError(
                f"{_WHO}: every prompt is at least max_length = {cfg.max_length} tokens long"
            )
        mesh = make_mesh()
        model = load_model(folder, mesh=mesh, dtype=_dtype(cfg), remat=cfg.gradient_checkpointing)
        metrics = self._fit_sft(mesh, model, rows, int(tokenizer.pad_token_id))
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
        self._record(out / SFT_RECORD, folder, metrics)
        log.info(
            "sft (jax): %d steps, loss %.4f -> %.4f, saved to %s",
            int(metrics["steps"]),
            metrics["loss_first"],
            metrics["loss_last"],
            out,
        )
        return FitReport(str(out), metrics)

    def _fit_sft(
        self, mesh: jax.sharding.Mesh, model: Any, rows: list[tuple[list[int], int]], pad: int
    ) -> dict[str, float]:
        cfg = self.config
        accumulate = cfg.gradient_accumulation_steps
        per_epoch = math.ceil(len(rows) / (cfg.batch_size * accumulate))
        steps = (
            cfg.max_steps
            if cfg.max_steps is not None
            else max(1, math.ceil(cfg.epochs * per_epoch))
        )
        tx: Any = optax.adamw(
            optax.linear_schedule(cfg.learning_rate, 0.0, steps), weight_decay=0.0
        )
        if accumulate > 1:
            tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        place_on_mesh(mesh, model, optimizer)
        rng = np.random.default_rng(cfg.seed)
        order: list[int] = []
        self.losses = []
        compile_seconds = 0.0
        for micro in range(steps * accumulate):
            if len(order) < cfg.batch_size:
                order.extend(rng.permutation(len(rows)).tolist())
            chunk, order = order[: cfg.batch_size], order[cfg.batch_size :]
            width = bucket(max(len(rows[i][0]) for i in chunk), cfg.max_length)
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
                _sft_step(
                    model, optimizer, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask)
                )
            )
            if micro == 0:
                compile_seconds = time.perf_counter() - tick
            if not math.isfinite(loss):
                raise TrainingStopped(
                    f"{_WHO}: the SFT loss became {loss} at step {micro // accumulate + 1}; "
                    "lower learning_rate"
                )
            if (micro + 1) % accumulate == 0:
                self.losses.append((micro // accumulate + 1, loss))
        values = [loss for _, loss in self.losses]
        return {
            "train_loss": float(np.mean(values)),
            "loss_first": values[0],
            "loss_last": values[-1],
            "steps": float(steps),
            "compile_seconds": compile_seconds,
        }

    # RL-CAI -------------------------------------------------------------------------------
    def optimise(
        self,
        policy: str,
        reference: str,
        reward: PreferenceModel,
        prompts: Sequence[Prompt],
        labelled: Sequence[LabelledComparison],
        out: Path,
    ) -> FitReport:
        """Optimise ``policy`` with ``config.algorithm`` (``"ppo"`` or ``"dpo"``), keeping
        it close to ``reference``; save it to ``out``."""
        cfg = self.config
        started = time.perf_counter()
        _check_device(cfg)
        policy_folder = _folder(policy, "policy")
        reference_folder = _folder(reference, "reference")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.algorithm == "dpo":
            metrics = self._dpo(policy_folder, reference_folder, labelled, out)
        else:
            from caikit_jax.ppo import train_ppo

            metrics = train_ppo(
                cfg,
                policy=policy_folder,
                reference=reference_folder,
                reward=reward,
                prompts=prompts,
                out=out,
            )
        metrics["seconds"] = time.perf_counter() - started
        self._record(out / RL_RECORD, policy_folder, metrics)
        return FitReport(str(out), metrics)

    def _dpo(
        self, policy: Path, reference: Path, labelled: Sequence[LabelledComparison], out: Path
    ) -> dict[str, float]:
        from tunix.sft import hooks
        from tunix.sft.dpo import dpo_trainer

        cfg = self.config
        pairs = require_dpo_pairs(labelled, who=_WHO)
        tokenizer = read_tokenizer(policy, who=_WHO)
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
        model = load_model(policy, mesh=mesh, dtype=_dtype(cfg), remat=cfg.gradient_checkpointing)
        ref_model = load_model(reference, mesh=mesh, dtype=_dtype(cfg))
        per_epoch = math.ceil(len(encoded) / (cfg.batch_size * cfg.gradient_accumulation_steps))
        steps = (
            cfg.max_steps
            if cfg.max_steps is not None
            else max(1, math.ceil(cfg.epochs * per_epoch))
        )
        recorder = _LossRecorder()
        trainer = dpo_trainer.DPOTrainer(
            model=model,
            ref_model=ref_model,
            optimizer=optax.adamw(
                optax.linear_schedule(cfg.learning_rate, 0.0, steps), weight_decay=0.0
            ),
            training_config=dpo_trainer.DPOTrainingConfig(
                eval_every_n_steps=10**9,
                max_steps=steps,
                gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                beta=cfg.kl_coef,
                label_smoothing=0.0,
                pbar_description=None,
            ),
        )
        trainer.with_training_hooks(recorder)  # duck-typed Tunix hooks
        batches = list(self._dpo_batches(encoded, pad, steps * cfg.gradient_accumulation_steps))
        tick = time.perf_counter()
        with mesh:
            trainer.train(batches)
        elapsed = time.perf_counter() - tick
        if not recorder.losses or not all(math.isfinite(x) for _, x in recorder.losses):
            raise TrainingStopped(f"{_WHO}: the DPO loss became non-finite ({recorder.losses})")
        self.losses = recorder.losses
        save_checkpoint(model, out, source=policy)
        values = [loss for _, loss in self.losses]
        metrics: dict[str, float] = {
            "train_loss": float(np.mean(values)),
            "loss_first": values[0],
            "loss_last": values[-1],
            "pairs": float(len(encoded)),
            "ties": float(pairs.ties),
            "identical": float(pairs.identical),
            "beta": float(cfg.kl_coef),
            "steps": float(len(values)),
            "train_seconds": elapsed,
        }
        logger = trainer.metrics_logger
        for name, key in (("rewards/margin", "margin_last"), ("rewards/accuracy", "accuracy_last")):
            if logger.metric_exists("", name, "train"):
                metrics[key] = float(logger.get_metric_history("", name, "train")[-1])
        trainer.close()
        _ = hooks  # the recorder subclasses hooks.TrainingHooks
        return metrics

    def _dpo_batches(
        self, encoded: list[tuple[list[int], list[int], list[int]]], pad: int, count: int
    ) -> Any:
        from tunix.sft.dpo import dpo_trainer

        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        order: list[int] = []
        for _ in range(count):
            if len(order) < cfg.batch_size:
                order.extend(rng.permutation(len(encoded)).tolist())
            chunk, order = order[: cfg.batch_size], order[cfg.batch_size :]
            budget = cfg.max_length
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

    # records ------------------------------------------------------------------------------
    def _record(self, path: Path, base: Path, metrics: dict[str, float]) -> None:
        record = {
            "base": str(base),
            "backend": "jax",
            "config": attrs.asdict(self.config),
            "metrics": metrics,
            "losses": self.losses,
            "versions": versions(),
        }
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


class _LossRecorder:
    """A Tunix training hook that keeps every step's loss."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_train_start(self, train_ctx: Any) -> None:
        pass

    def on_train_end(self, train_ctx: Any) -> None:
        pass

    def on_train_step_start(self, train_ctx: Any) -> None:
        pass

    def on_train_step_end(self, train_ctx: Any, train_step: int, train_loss: float) -> None:
        self.losses.append((int(train_step), float(train_loss)))

    def on_eval_step_start(self, train_ctx: Any) -> None:
        pass

    def on_eval_step_end(self, train_ctx: Any, eval_loss: float) -> None:
        pass


_ = forward_inputs  # re-exported helpers stay importable from here for the benchmarks
