"""The ``jax`` preference model: a scalar head on a Llama trunk, trained on soft labels.

The same model and loss as the ``torch`` preference model, in JAX: the trunk is
Tunix's Llama (:func:`caikit_jax.model.load_model`), the head a bias-free
``[D, 1]`` projection of the hidden state at the last token that is not padding
(as transformers' ``LlamaForSequenceClassification`` reads it), and the loss the
cross-entropy between each comparison's soft label ``p_a`` and
``sigmoid(r_A - r_B)``, optimised with AdamW (no weight decay, linear decay to 0,
no warm-up) over shuffled batches of ``batch_size`` comparisons.

A saved model is a Hugging Face ``LlamaForSequenceClassification`` folder
(``model.safetensors`` with ``score.weight``, ``config.json`` with one label, the
tokenizer) plus ``caikit_pm.json``: the ``torch`` preference model loads it, and
this one loads the ``torch`` model's folders, so either backend can score the
other's model.

Sequences are right padded to a length bucket (:func:`caikit_jax.common.bucket`: four
widths per octave, at least 16, at most ``max_length``) so that XLA compiles a handful
of shapes, not one per batch.
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
from caikit_core.interfaces import FitReport
from caikit_core.records import Conversation, LabelledComparison, Sample
from caikit_core.training.metrics import check_soft_labels, comparison_metrics, held_out_split
from caikit_jax import allocator
from caikit_jax.checkpoints import Checkpointer
from caikit_jax.common import bucket
from caikit_jax.compilation import COMPILE_METRIC, CompileClock, use_persistent_cache
from caikit_jax.config import PM_CAPABILITIES, JaxPreferenceConfig
from caikit_jax.memory import release
from caikit_jax.model import (
    check_device,
    hidden_states,
    load_model,
    make_mesh,
    param_dtype,
    place_on_mesh,
    read_tokenizer,
    save_tensors,
    versions,
)

__all__ = ["PM_ARCHITECTURE", "PM_RECORD", "JaxPreferenceModel", "bucket"]

log = logging.getLogger("caikit.jax")

#: The file in a saved preference model that records how it was trained.
PM_RECORD = "caikit_pm.json"
#: The Hugging Face architecture a saved preference model declares.
PM_ARCHITECTURE = "LlamaForSequenceClassification"
_WHO = "jax preference model"


class _RewardModel(nnx.Module):
    """Trunk + scalar head; ``__call__`` returns one score per row."""

    def __init__(self, trunk: Any, head: nnx.Linear) -> None:
        self.trunk = trunk
        self.head = head

    def __call__(self, ids: jax.Array, mask: jax.Array, last: jax.Array) -> jax.Array:
        hidden = hidden_states(self.trunk, ids, mask)
        picked = hidden[jnp.arange(ids.shape[0]), last]
        return self.head(picked.astype(jnp.float32))[:, 0]


def _soft_loss(scores: jax.Array, p_a: jax.Array) -> jax.Array:
    half = p_a.shape[0]
    margin = scores[:half] - scores[half:]
    return -(p_a * jax.nn.log_sigmoid(margin) + (1.0 - p_a) * jax.nn.log_sigmoid(-margin))


@nnx.jit(donate_argnames=("model", "optimizer"))  # new weights over the old ones
def _train_step(
    model: _RewardModel,
    optimizer: nnx.Optimizer[_RewardModel],
    ids: jax.Array,
    mask: jax.Array,
    last: jax.Array,
    p_a: jax.Array,
) -> jax.Array:
    def loss_fn(m: _RewardModel) -> jax.Array:
        return _soft_loss(m(ids, mask, last), p_a).mean()

    loss: jax.Array
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def _score(model: _RewardModel, ids: jax.Array, mask: jax.Array, last: jax.Array) -> jax.Array:
    return model(ids, mask, last)


class JaxPreferenceModel:
    """Fits, saves, loads and scores (see the module docstring)."""

    capabilities: frozenset[str] = PM_CAPABILITIES

    def __init__(self, config: JaxPreferenceConfig, model: str) -> None:
        self.config = config
        self.trunk = model
        #: the metrics of the last :meth:`fit` (or those recorded with a loaded model).
        self.metrics: dict[str, float] = {}
        #: ``(step, loss)`` of every step of the last :meth:`fit`.
        self.losses: list[tuple[int, float]] = []
        self._model: _RewardModel | None = None
        self._tokenizer: Any = None
        self._source: Path | None = None
        self._mesh: jax.sharding.Mesh | None = None

    # fit --------------------------------------------------------------------------------
    @allocator.tuned
    def fit(
        self,
        labelled: Sequence[LabelledComparison],
        out: Path,
        *,
        checkpoint_dir: Path | None = None,
    ) -> FitReport:
        """Train the head and trunk on ``labelled`` and save the model to ``out``; with
        ``checkpoint_dir``, save checkpoints there (``checkpoint_every_*``) and resume
        from the newest (:mod:`caikit_jax.checkpoints`).

        Metrics as the ``torch`` preference model reports them: ``loss``,
        ``accuracy``, ``calibration``, ``brier``, ``examples``, ``eval_*`` (with
        ``eval_fraction``), ``ties``, ``truncated``, ``train_loss``, ``loss_first``,
        ``loss_last``, ``steps``, ``compile_seconds``, ``time/compile`` (the seconds JAX
        spent compiling in the stage, the training and the scoring of the comparisons
        after it, :mod:`caikit_jax.compilation`) and ``seconds``.
        The optimiser's state is freed before this returns; the model is kept for
        :meth:`score`.

        :raises CaikitError: no comparisons, or a label outside [0, 1].
        :raises TrainingStopped: a non-finite loss (naming the step and comparisons).
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
        check_device(cfg.device, _WHO)
        folder = _folder(self.trunk, "trunk")
        self._tokenizer = read_tokenizer(folder, who=_WHO)
        self._mesh = make_mesh()
        use_persistent_cache()
        from caikit_jax.shims import tracer_sharding_without_origin  # imports Tunix

        with CompileClock() as clock, tracer_sharding_without_origin():
            trunk = load_model(
                folder, mesh=self._mesh, dtype=param_dtype(cfg.dtype), trunk_only=True
            )
            head = nnx.Linear(
                trunk.config.embed_dim,
                1,
                use_bias=False,
                kernel_init=nnx.initializers.normal(stddev=0.02),
                rngs=nnx.Rngs(cfg.seed),
            )
            self._model = _RewardModel(trunk, head)
            self._source = folder
            metrics = self._train(train, checkpoint_dir)
            release(compiled=False)  # the optimiser's moments; scoring keeps its compiled step
            out = Path(out)
            self.save(out, base=str(folder))
            # scoring compiles a forward pass per batch width: counted too (it was 6-13 s
            # of the quickstart's preference-model stage, outside time/compile before)
            metrics.update(comparison_metrics(self.score, train))
            if held:
                metrics.update(comparison_metrics(self.score, held, "eval_"))
        metrics[COMPILE_METRIC] = clock.seconds
        metrics["ties"] = float(sum(1 for lc in labelled if lc.label.p_a == 0.5))
        metrics["seconds"] = time.perf_counter() - started
        self.metrics = metrics
        self._write_record(out, str(folder))
        log.info(
            "preference model (jax): %d comparisons, loss %.4f",
            len(train),
            metrics.get("loss", float("nan")),
        )
        # the training loss per logged step: the manifest's history, the report's curve
        history = [{"step": float(step), "loss": loss} for step, loss in self.losses]
        return FitReport(str(out), metrics, history=history)

    def _train(
        self, labelled: list[LabelledComparison], checkpoint_dir: Path | None
    ) -> dict[str, float]:
        cfg = self.config
        assert self._model is not None
        encoded_a, encoded_b, truncated = [], [], 0
        for lc in labelled:
            ids_a, cut_a = self._encode(lc.comparison.messages, lc.comparison.response_a)
            ids_b, cut_b = self._encode(lc.comparison.messages, lc.comparison.response_b)
            encoded_a.append(ids_a)
            encoded_b.append(ids_b)
            truncated += cut_a + cut_b
        per_epoch = math.ceil(len(labelled) / cfg.batch_size)
        steps = (
            cfg.max_steps
            if cfg.max_steps is not None
            else max(1, math.ceil(cfg.epochs * per_epoch))
        )
        schedule = optax.linear_schedule(cfg.learning_rate, 0.0, steps)
        optimizer = nnx.Optimizer(
            self._model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param
        )
        assert self._mesh is not None
        place_on_mesh(self._mesh, self._model, optimizer)
        rng = np.random.default_rng(cfg.seed)
        order: list[int] = []
        self.losses = []
        compile_seconds = 0.0
        saver = Checkpointer(checkpoint_dir, "preference_model", cfg)
        objects = {"model": self._model, "optimizer": optimizer}
        start = 1
        if (loop := saver.restore(objects)) is not None:
            rng.bit_generator.state = loop["rng"]
            order = loop["order"]
            self.losses = [(int(s), float(x)) for s, x in loop["losses"]]
            compile_seconds = float(loop["compile_seconds"])
            start = int(loop["step"]) + 1
            log.info("preference model (jax): resuming after step %d", start - 1)
        for step in range(start, steps + 1):
            if len(order) < cfg.batch_size:
                order.extend(rng.permutation(len(labelled)).tolist())
            chunk, order = order[: cfg.batch_size], order[cfg.batch_size :]
            ids, mask, last = self._pad(
                [encoded_a[i] for i in chunk] + [encoded_b[i] for i in chunk]
            )
            p_a = jnp.asarray([labelled[i].label.p_a for i in chunk], dtype=jnp.float32)
            tick = time.perf_counter()
            loss = float(_train_step(self._model, optimizer, ids, mask, last, p_a))
            if step == 1:
                compile_seconds = time.perf_counter() - tick
            if not math.isfinite(loss):
                names = ", ".join(labelled[i].comparison.id for i in chunk)
                raise TrainingStopped(
                    f"{_WHO}: the loss became {loss} at step {step} (comparisons {names}); "
                    "lower learning_rate or check the labels"
                )
            self.losses.append((step, loss))
            if saver.due(step, steps):
                loop = {
                    "step": step,
                    "rng": rng.bit_generator.state,
                    "order": order,
                    "losses": self.losses,
                    "compile_seconds": compile_seconds,
                }
                saver.save(step, objects, loop)
        values = [loss for _, loss in self.losses]
        return {
            "train_loss": float(np.mean(values)),
            "loss_first": values[0],
            "loss_last": values[-1],
            "steps": float(steps),
            "truncated": float(truncated),
            "compile_seconds": compile_seconds,
        }

    # evaluate, save, load, score ----------------------------------------------------------
    def save(self, path: Path, *, base: str | None = None) -> None:
        """Write the model as a ``LlamaForSequenceClassification`` folder and the record."""
        model, tokenizer = self._require()
        assert self._source is not None
        path = Path(path)
        score = np.asarray(jax.device_get(model.head.kernel.value), dtype=np.float32).T
        save_tensors(
            model.trunk,
            path,
            source=self._source,
            extra={"score.weight": np.ascontiguousarray(score)},
            config_updates={
                "architectures": [PM_ARCHITECTURE],
                "num_labels": 1,
                "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0},
                "pad_token_id": int(tokenizer.pad_token_id),
            },
            with_lm_head=False,
        )
        self._write_record(path, base if base is not None else self.trunk)

    def _write_record(self, path: Path, base: str) -> None:
        record = {
            "base": base,
            "backend": "jax",
            "config": attrs.asdict(self.config),
            "metrics": self.metrics,
            "losses": self.losses,
            "versions": versions(),
        }
        (path / PM_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def load(self, path: Path) -> None:
        """Load a saved preference model (this backend's or the ``torch`` one's).

        :raises PluginError: the folder is missing or not a one-label Llama classifier.
        """
        from safetensors.numpy import load_file

        folder = _folder(str(path), "preference model")
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        labels = config.get("num_labels", len(config.get("id2label") or {}) or None)
        if PM_ARCHITECTURE not in (config.get("architectures") or []) or labels not in (1, None):
            raise PluginError(
                f"{_WHO}: {folder} is not a one-label {PM_ARCHITECTURE} checkpoint "
                f"(architectures {config.get('architectures')}, num_labels {labels})"
            )
        self._tokenizer = read_tokenizer(folder, who=_WHO)
        check_device(self.config.device, _WHO)
        trunk = load_model(
            folder,
            mesh=make_mesh(),
            dtype=param_dtype(self.config.dtype),
            trunk_only=True,
            architectures=(PM_ARCHITECTURE,),
        )
        weight = None
        for file in sorted(folder.glob("*.safetensors")):
            tensors = load_file(str(file))
            if "score.weight" in tensors:
                weight = tensors["score.weight"]
        if weight is None or weight.shape != (1, trunk.config.embed_dim):
            raise PluginError(f"{_WHO}: {folder} has no [1, hidden] score.weight")
        head = nnx.Linear(trunk.config.embed_dim, 1, use_bias=False, rngs=nnx.Rngs(0))
        head.kernel.value = jnp.asarray(weight.T, dtype=jnp.float32)
        self._model = _RewardModel(trunk, head)
        self._source = folder
        record = folder / PM_RECORD
        if record.is_file():
            recorded = json.loads(record.read_text(encoding="utf-8")).get("metrics", {})
            self.metrics = {str(k): float(v) for k, v in recorded.items()}

    def score(self, samples: Sequence[Sample]) -> list[float]:
        """The scalar reward of each (prompt messages, response), in order; batches of
        ``batch_size`` sequences sorted by length, so the same samples give the same
        scores."""
        if not samples:
            return []
        model, _ = self._require()
        encoded = [self._encode(s.messages, s.response)[0] for s in samples]
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
        scores = [0.0] * len(encoded)
        size = self.config.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            ids, mask, last = self._pad([encoded[i] for i in chunk])
            values = np.asarray(jax.device_get(_score(model, ids, mask, last)), dtype=np.float64)
            for row, i in enumerate(chunk):
                scores[i] = float(values[row])
        return scores

    # helpers ----------------------------------------------------------------------------
    def _require(self) -> tuple[_RewardModel, Any]:
        if self._model is None or self._tokenizer is None:
            raise CaikitError(f"{_WHO}: the model is neither fitted nor loaded; call fit or load")
        return self._model, self._tokenizer

    def _encode(self, messages: Conversation, response: str) -> tuple[list[int], int]:
        turns = [{"role": m.role, "content": m.content} for m in messages]
        turns.append({"role": "assistant", "content": response})
        encoded = self._tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)
        ids = [int(t) for t in encoded["input_ids"]]
        limit = self.config.max_length
        if len(ids) > limit:
            return ids[-limit:], 1
        return ids, 0

    def _pad(self, rows: list[list[int]]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Right-padded ids, mask and the index of each row's last non-padding token
        (found by the pad id, as transformers' sequence classifier finds it)."""
        pad = int(self._tokenizer.pad_token_id)
        width = bucket(max(len(r) for r in rows), self.config.max_length)
        ids = np.full((len(rows), width), pad, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        positions = np.arange(width)[None, :]
        last = np.max(np.where(ids != pad, positions, -1), axis=1).clip(0)
        return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(last)


def _folder(name: str, what: str) -> Path:
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise PluginError(f"{_WHO}: the {what} {name} is not a local checkpoint folder")
    return folder
