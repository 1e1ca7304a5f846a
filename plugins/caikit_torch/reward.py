"""The ``torch`` preference model: a scalar head on a causal LM, trained on soft labels.

The model is the trunk loaded as ``AutoModelForSequenceClassification`` with one
label: the causal LM's transformer plus a linear ``score`` head (no bias) that
reads the hidden state of each sequence's last non-padding token. A sequence is
the chat template of the comparison's prompt messages followed by the response as
an assistant turn, exactly as the policy sees it.

Training (Bai et al. 2022 train their preference model on the feedback model's
probabilities, not on hard labels) minimises the cross-entropy between the soft
label ``P(A) = p_a`` and the model's ``sigmoid(r_A - r_B)``::

    loss = -[p_a * log sigmoid(r_A - r_B) + (1 - p_a) * log sigmoid(r_B - r_A)]

which is TRL's pairwise (Bradley-Terry) loss when ``p_a`` is 0 or 1. TRL 1.16's
``RewardTrainer`` trains on hard chosen/rejected pairs only (with an optional
margin), so :class:`SoftRewardTrainer` extends it: the comparisons go in as
``chosen_ids`` = response A and ``rejected_ids`` = response B (pre-tokenised, so
TRL's own tokenisation and length filter are skipped), :class:`SoftPreferenceCollator`
adds each pair's ``p_a`` and row index to the batch, and ``compute_loss`` computes
the soft loss. A non-finite loss stops training with
:class:`~caikit_core.errors.TrainingStopped` naming the step and the batch's
comparison ids, before the bad gradient is applied.

Metrics (:func:`preference_metrics`), over the training comparisons after training
and, with ``eval_fraction > 0``, over the held-out ones (``eval_`` prefix):

- ``loss``: the mean soft-label cross-entropy above.
- ``accuracy``: the share of comparisons whose majority label (A when
  ``p_a > 0.5``, B when ``p_a < 0.5``) the model ranks strictly higher; ties
  (``p_a = 0.5``) are left out (and counted in ``ties``). Absent when every
  comparison is a tie.
- ``calibration``: the expected calibration error of ``q = sigmoid(r_A - r_B)``
  against ``p_a`` over 5 equal-width bins of ``q``:
  ``sum_b n_b / n * |mean_b(q) - mean_b(p_a)|`` (0 is perfectly calibrated).
- ``brier``: the mean of ``(q - p_a) ** 2``.
- ``examples``: how many comparisons.

The saved folder is a plain Hugging Face sequence-classification checkpoint
(``model.safetensors``, ``config.json`` with ``num_labels = 1``, the tokenizer)
and ``caikit_pm.json`` recording the trunk, the settings and the metrics.

This module imports torch, transformers, TRL and datasets at import time;
:mod:`caikit_torch.plugin` imports it only when the factory runs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import datasets
import torch
import transformers
import trl
from torch.nn import functional
from trl.trainer.reward_config import RewardConfig
from trl.trainer.reward_trainer import (
    DataCollatorForPreference,
    RewardTrainer,
    suppress_seqcls_warning,
)

from caikit_core.converter import converter
from caikit_core.errors import CaikitError, PluginError, TrainingStopped
from caikit_core.interfaces import FitReport
from caikit_core.records import Conversation, LabelledComparison, Sample
from caikit_core.training.metrics import (
    CALIBRATION_BINS,
    check_soft_labels,
    comparison_metrics,
    held_out_split,
    preference_metrics,
)
from caikit_torch.checkpoints import make_resumable
from caikit_torch.common import (
    LossLog,
    add_report_callbacks,
    policy_folder,
    precision,
    progress_bars,
    resolve_device,
    scratch_or,
    trainer_defaults,
)
from caikit_torch.config import PM_CAPABILITIES, TorchPreferenceConfig
from caikit_torch.distributed import is_main_process, launch

__all__ = [
    "CALIBRATION_BINS",
    "PM_RECORD",
    "SoftPreferenceCollator",
    "SoftRewardTrainer",
    "TorchPreferenceModel",
    "preference_metrics",
    "soft_label_loss",
    "worker",
]

log = logging.getLogger("caikit.torch")

#: The file in a saved preference model that records how it was trained.
PM_RECORD = "caikit_pm.json"

_WHO = "torch preference model"


def soft_label_loss(margin: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Per-comparison cross-entropy between ``p_a`` and ``sigmoid(margin)``.

    :param margin: ``r_A - r_B`` per comparison.
    :param p_a: P(A is preferred) per comparison, in [0, 1].
    :returns: ``-(p_a * log sigmoid(margin) + (1 - p_a) * log sigmoid(-margin))``,
        computed stably (``logsigmoid``), one value per comparison.
    """
    return -(p_a * functional.logsigmoid(margin) + (1.0 - p_a) * functional.logsigmoid(-margin))


@dataclass
class SoftPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus each pair's soft label and row index.

    Examples hold ``chosen_ids`` (response A), ``rejected_ids`` (response B), ``p_a``
    and ``row``; the batch gets ``input_ids`` and ``attention_mask`` (all A
    sequences, then all B sequences, right padded) as TRL builds them, ``p_a``
    (float) and ``row`` (long).
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Collate ``examples`` into one batch (see the class docstring)."""
        output: dict[str, Any] = super().torch_call(examples)
        output["p_a"] = torch.tensor([float(e["p_a"]) for e in examples], dtype=torch.float32)
        output["row"] = torch.tensor([int(e["row"]) for e in examples], dtype=torch.long)
        return output


class SoftRewardTrainer(RewardTrainer):
    """TRL's ``RewardTrainer`` with the soft-label loss (:func:`soft_label_loss`).

    :param comparison_ids: the comparison id of each training row (``row`` indexes
        it), named when a loss is not finite.
    :param kwargs: as ``RewardTrainer`` takes them; the dataset must be
        pre-tokenised with ``chosen_ids``, ``rejected_ids``, ``p_a`` and ``row``, and
        ``data_collator`` a :class:`SoftPreferenceCollator`.
    """

    def __init__(self, *args: Any, comparison_ids: Sequence[str], **kwargs: Any) -> None:
        self.comparison_ids = list(comparison_ids)
        super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        # ``remove_unused_columns`` keeps only these; TRL's list lacks the soft label.
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "p_a", "row"]  # type: ignore[assignment]

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The mean soft-label loss of the batch; also logs reward statistics.

        :raises TrainingStopped: the loss is not finite (before any backward pass).
        """
        mode = "train" if model.training else "eval"
        p_a = inputs.pop("p_a")
        rows = inputs.pop("row")
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        rewards_a, rewards_b = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
        margin = rewards_a - rewards_b
        loss = soft_label_loss(margin, p_a.to(margin.dtype)).mean()
        if not bool(torch.isfinite(loss)):
            ids = [self.comparison_ids[int(r)] for r in rows.tolist()]
            step = self.state.global_step + 1
            raise TrainingStopped(
                f"{_WHO}: non-finite loss ({float(loss.detach())}) at step {step} "
                f"on the batch of comparisons {', '.join(ids)}; check their labels "
                "(p_a must be finite numbers in [0, 1]) or lower learning_rate"
            )
        with torch.no_grad():
            metrics = self._metrics[mode]
            metrics["mean_reward"].append(float(torch.cat([rewards_a, rewards_b]).mean()))
            metrics["margin"].append(float(margin.mean()))
            decided = p_a != 0.5
            if bool(decided.any()):
                right = (margin > 0) == (p_a.to(margin.device) > 0.5)
                metrics["accuracy"].append(float(right[decided].float().mean()))
        return (loss, outputs) if return_outputs else loss


class TorchPreferenceModel:
    """A preference model trained with :class:`SoftRewardTrainer` (see the module).

    :param config: the plugin's settings.
    :param model: the trunk: a local causal-LM checkpoint folder with a chat template
        (loaded only by :meth:`fit`).
    """

    capabilities: frozenset[str] = PM_CAPABILITIES

    def __init__(self, config: TorchPreferenceConfig, model: str) -> None:
        self.config = config
        self.trunk = model
        #: the metrics of the last :meth:`fit` (or those recorded with a loaded model).
        self.metrics: dict[str, float] = {}
        #: ``(step, loss)`` of each logged step of the last :meth:`fit`.
        self.losses: list[tuple[int, float]] = []
        self._model: Any = None
        self._tokenizer: Any = None
        self._device = "cpu"
        self._autocast = False

    # fit -------------------------------------------------------------------------------
    def fit(
        self,
        labelled: Sequence[LabelledComparison],
        out: Path,
        *,
        checkpoint_dir: Path | None = None,
    ) -> FitReport:
        """Train the head and trunk on ``labelled`` and save the model to ``out``.

        :param labelled: comparisons with their soft labels; a ``p_a`` outside
            [0, 1] is refused, a non-finite one stops training at its batch.
        :param out: the folder to save into (created if missing).
        :param checkpoint_dir: where to keep resumable checkpoints (``checkpoint_every_*``)
            and resume from the newest one; ``None``: none.
        :returns: ``out`` and the metrics ``loss``, ``accuracy``, ``calibration``,
            ``brier``, ``examples`` (training comparisons, after training),
            ``eval_*`` (held-out ones, with ``eval_fraction``), ``ties``,
            ``truncated``, ``train_loss``, ``loss_first``, ``loss_last``, ``steps``,
            ``epochs`` and ``seconds``.
        :raises CaikitError: no comparisons, or a label outside [0, 1].
        :raises PluginError: the trunk is missing or cannot be loaded.
        :raises TrainingStopped: a non-finite loss.
        """
        cfg = self.config
        started = time.perf_counter()
        if not labelled:
            raise CaikitError(f"{_WHO}: fit was given no labelled comparisons")
        check_soft_labels(labelled, _WHO)
        train, held = held_out_split(labelled, cfg.eval_fraction, cfg.seed)
        if not train:
            raise CaikitError(
                f"{_WHO}: eval_fraction = {cfg.eval_fraction} held out all {len(labelled)} "
                "comparisons; lower it or label more pairs"
            )
        folder = policy_folder(self.trunk, _WHO, "trunk", **self._pickle())
        self._device = resolve_device(cfg.device, _WHO)
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with progress_bars(log.isEnabledFor(logging.INFO)):
            if cfg.num_processes == 1:
                metrics = self._train(folder, train, out / "logs", checkpoint_dir)
                self.save(out, base=str(folder))
            else:  # rank 0 of the workers saves
                metrics = self._train_launched(folder, train, out, checkpoint_dir)
            # Score with the weights as saved and as a later ``load`` gives them: the
            # trained tensors' memory alignment can change float32 results in the last bit.
            self.load(out)
        metrics.update(comparison_metrics(self.score, train))
        if held:
            metrics.update(comparison_metrics(self.score, held, "eval_"))
        metrics["ties"] = float(sum(1 for lc in labelled if lc.label.p_a == 0.5))
        metrics["seconds"] = time.perf_counter() - started
        self.metrics = metrics
        self._write_record(out, str(folder))
        log.info(
            "preference model: %d comparisons, loss %.4f, accuracy %s",
            len(train),
            metrics.get("loss", float("nan")),
            f"{metrics['accuracy']:.3f}" if "accuracy" in metrics else "n/a",
        )
        # the training loss per logged step: the manifest's history, the report's curve
        history = [{"step": float(step), "loss": loss} for step, loss in self.losses]
        return FitReport(str(out), metrics, history=history)

    def _train(
        self,
        folder: Path,
        labelled: list[LabelledComparison],
        logs: Path,
        checkpoint_dir: Path | None = None,
    ) -> dict[str, float]:
        """Load the trunk, train, keep the model; returns the training metrics
        (TensorBoard's event files, with ``report_to``, go into ``logs``)."""
        cfg = self.config
        weights_dtype, mixed_bf16 = precision(cfg.dtype, self._device, _WHO)
        self._autocast = mixed_bf16
        transformers.set_seed(cfg.seed)
        tokenizer = self._load_tokenizer(folder, need_template=True)
        rows: list[dict[str, Any]] = []
        truncated = 0
        for i, lc in enumerate(labelled):
            c = lc.comparison
            ids_a, cut_a = self._encode(tokenizer, c.messages, c.response_a)
            ids_b, cut_b = self._encode(tokenizer, c.messages, c.response_b)
            truncated += cut_a + cut_b
            rows.append(
                {"chosen_ids": ids_a, "rejected_ids": ids_b, "p_a": float(lc.label.p_a), "row": i}
            )
        if truncated:
            log.warning(
                "preference model: %d sequences longer than max_length = %d keep their last "
                "%d tokens",
                truncated,
                cfg.max_length,
                cfg.max_length,
            )
        model = self._load_trunk(folder, weights_dtype, tokenizer)
        total = self._total_steps(len(rows))
        with scratch_or(checkpoint_dir, "caikit-pm-") as scratch:
            args = RewardConfig(
                output_dir=scratch,
                learning_rate=cfg.learning_rate,
                num_train_epochs=cfg.epochs,
                max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
                per_device_train_batch_size=cfg.batch_size,
                max_length=None,  # sequences are truncated above, never dropped
                **trainer_defaults(
                    seed=cfg.seed,
                    device=self._device,
                    bf16=mixed_bf16,
                    total=total,
                    report_to=cfg.report_to,
                ),
            )
            trainer = SoftRewardTrainer(
                model=model,
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                data_collator=SoftPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
                callbacks=[LossLog(total, "preference model")],
                comparison_ids=[lc.comparison.id for lc in labelled],
            )
            trainer.remove_callback(transformers.PrinterCallback)
            add_report_callbacks(trainer, cfg.report_to, logs)
            resume = make_resumable(
                trainer,
                checkpoint_dir,
                cfg.checkpoint_every_steps,
                cfg.checkpoint_every_minutes,
                fit="preference_model",
            )
            result = trainer.train(resume_from_checkpoint=resume)
        self.losses = [
            (int(entry["step"]), float(entry["loss"]))
            for entry in trainer.state.log_history
            if "loss" in entry and "step" in entry
        ]
        trained: Any = trainer.model
        trained.eval()
        self._model, self._tokenizer = trained, tokenizer
        metrics: dict[str, float] = {
            "train_loss": float(result.training_loss),
            "loss_first": self.losses[0][1] if self.losses else float(result.training_loss),
            "loss_last": self.losses[-1][1] if self.losses else float(result.training_loss),
            "truncated": float(truncated),
            "steps": float(trainer.state.global_step),
            "epochs": float(trainer.state.epoch or 0.0),
        }
        del trainer
        gc.collect()
        return metrics

    def _train_launched(
        self,
        folder: Path,
        labelled: list[LabelledComparison],
        out: Path,
        checkpoint_dir: Path | None,
    ) -> dict[str, float]:
        """:meth:`_train` and :meth:`save` data-parallel in ``num_processes`` worker
        processes (:func:`caikit_torch.distributed.launch`); rank 0 saves into ``out``."""
        job = {
            "config": converter.unstructure(self.config),
            "trunk": self.trunk,
            "folder": str(folder),
            "device": self._device,
            "out": str(out),
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
            "labelled": converter.unstructure(labelled),
        }
        result = launch(
            "caikit_torch.reward:worker",
            job,
            self.config.num_processes,
            fit="preference_model",
            who=_WHO,
        )
        self.losses = [(int(step), float(loss)) for step, loss in result["losses"]]
        return {k: float(v) for k, v in result["metrics"].items()}

    def _total_steps(self, examples: int) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        batches = math.ceil(examples / (cfg.batch_size * cfg.num_processes))
        return max(1, math.ceil(cfg.epochs * batches))

    # evaluate, save, load, score ------------------------------------------------------------
    def evaluate(self, labelled: Sequence[LabelledComparison]) -> dict[str, float]:
        """:func:`preference_metrics` of the current model on ``labelled``.

        :raises CaikitError: the model is neither fitted nor loaded.
        """
        return comparison_metrics(self.score, labelled)

    def save(self, path: Path, *, base: str | None = None) -> None:
        """Write the model (safetensors), its tokenizer and :data:`PM_RECORD` to ``path``.

        :param base: the trunk it was trained from, recorded (default: the trunk
            this object was built with).
        :raises CaikitError: the model is neither fitted nor loaded.
        """
        model, tokenizer = self._require()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        self._write_record(path, base if base is not None else self.trunk)

    def _write_record(self, path: Path, base: str) -> None:
        record = {
            "base": base,
            "config": attrs.asdict(self.config),
            "metrics": self.metrics,
            "losses": self.losses,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
        }
        (path / PM_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def load(self, path: Path) -> None:
        """Load a saved preference model (any one-label sequence-classification folder).

        :raises PluginError: the folder is missing, not a checkpoint, or not a
            one-label sequence classifier.
        """
        folder = policy_folder(str(path), _WHO, "preference model", **self._pickle())
        self._device = resolve_device(self.config.device, _WHO)
        weights_dtype, self._autocast = precision(self.config.dtype, self._device, _WHO)
        tokenizer = self._load_tokenizer(folder, need_template=True)
        try:
            model: Any = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=weights_dtype, local_files_only=True
            )
        except CaikitError:
            raise
        except Exception as exc:  # corrupt weights raise safetensors' own error type
            raise PluginError(f"{_WHO}: cannot load the preference model {folder}: {exc}") from exc
        if int(model.config.num_labels) != 1:
            raise PluginError(
                f"{_WHO}: {folder} is a classifier with {model.config.num_labels} labels, not a "
                "scalar (one-label) preference model"
            )
        self._set_padding(model, tokenizer)
        model.to(self._device)
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        record = folder / PM_RECORD
        if record.is_file():
            recorded = json.loads(record.read_text(encoding="utf-8")).get("metrics", {})
            self.metrics = {str(k): float(v) for k, v in recorded.items()}

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """The scalar reward of each (prompt messages, response), in order.

        Sequences are scored in batches of ``batch_size`` (sorted by length, right
        padded) without gradients; the same samples give the same scores.

        :raises CaikitError: the model is neither fitted nor loaded.
        """
        if not samples:
            return []
        model, tokenizer = self._require()
        encoded = [self._encode(tokenizer, s.messages, s.response)[0] for s in samples]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        scores = [0.0] * len(encoded)
        size = self.config.batch_size
        pad = int(tokenizer.pad_token_id)
        device = torch.device(self._device)
        with torch.no_grad(), self._autocast_context():
            for start in range(0, len(order), size):
                chunk = order[start : start + size]
                width = max(len(encoded[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    mask[row, : len(encoded[i])] = 1
                logits = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
                ).logits
                for row, value in enumerate(logits[:, 0].float().cpu().tolist()):
                    scores[chunk[row]] = float(value)
        return scores

    # helpers --------------------------------------------------------------------------
    def _require(self) -> tuple[Any, Any]:
        if self._model is None or self._tokenizer is None:
            raise CaikitError(f"{_WHO}: the model is neither fitted nor loaded; call fit or load")
        return self._model, self._tokenizer

    @contextlib.contextmanager
    def _autocast_context(self) -> Iterator[None]:
        if self._autocast:
            with torch.autocast(device_type=self._device, dtype=torch.bfloat16):
                yield
        else:
            yield

    def _encode(
        self, tokenizer: Any, messages: Conversation, response: str
    ) -> tuple[list[int], int]:
        """Token ids of the chat-formatted conversation and response, and 1 if truncated."""
        turns = [{"role": m.role, "content": m.content} for m in messages]
        turns.append({"role": "assistant", "content": response})
        encoded = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)
        ids = [int(t) for t in encoded["input_ids"]]
        limit = self.config.max_length
        if len(ids) > limit:
            return ids[-limit:], 1
        return ids, 0

    def _pickle(self) -> dict[str, Any]:
        """What :func:`policy_folder` needs to honour this model's ``allow_pickle``."""
        return {"allow_pickle": self.config.allow_pickle, "key": "preference_model.allow_pickle"}

    def _load_tokenizer(self, folder: Path, *, need_template: bool) -> Any:
        try:
            tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
                folder, local_files_only=True
            )
        except CaikitError:
            raise
        except Exception as exc:
            raise PluginError(f"{_WHO}: cannot load the tokenizer of {folder}: {exc}") from exc
        if need_template and not getattr(tokenizer, "chat_template", None):
            raise PluginError(
                f"{_WHO}: the tokenizer of {folder} has no chat template; scoring conversations "
                "needs one"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_trunk(self, folder: Path, dtype: torch.dtype, tokenizer: Any) -> Any:
        """The trunk with a new, seeded one-label head (TRL's loading-warning filter on)."""
        try:
            with suppress_seqcls_warning():
                model: Any = transformers.AutoModelForSequenceClassification.from_pretrained(
                    folder, num_labels=1, dtype=dtype, local_files_only=True
                )
        except CaikitError:
            raise
        except Exception as exc:  # corrupt weights raise safetensors' own error type
            raise PluginError(f"{_WHO}: cannot load the trunk {folder}: {exc}") from exc
        self._set_padding(model, tokenizer)
        return model

    @staticmethod
    def _set_padding(model: Any, tokenizer: Any) -> None:
        # The head reads the last token that is not padding, found by the pad id.
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One worker of :meth:`TorchPreferenceModel._train_launched`: train on this rank's
    shard; rank 0 saves the model into ``out``."""
    model = TorchPreferenceModel(
        converter.structure(job["config"], TorchPreferenceConfig), job["trunk"]
    )
    model._device = job["device"]
    ckpt = job["checkpoint_dir"]
    out = Path(job["out"])
    metrics = model._train(
        Path(job["folder"]),
        converter.structure(job["labelled"], list[LabelledComparison]),
        out / "logs",
        None if ckpt is None else Path(ckpt),
    )
    if is_main_process():
        model.save(out, base=job["folder"])
    return {"metrics": metrics, "losses": model.losses}
