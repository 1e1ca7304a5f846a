"""PPO on JAX: Tunix's ``PPOLearner`` on an ``RLCluster``, rewarded by a preference model.

:func:`train_ppo` is the jax optimiser's ``algorithm = "ppo"``: RL-CAI's policy
step, as :mod:`caikit_torch.ppo` is the torch optimiser's. The pieces:

- **Models.** The actor is the policy checkpoint, loaded with
  :func:`caikit_jax.model.load_model` (Tunix's ``Llama3`` with caikit's shims); the
  reference is the reference checkpoint loaded the same way and never trained; the
  critic is a zero-initialised one-output head on the actor's own trunk
  (:class:`caikit_jax.shims.SharedTrunkCritic`), its optimiser over the head alone.
  All share one device mesh (:func:`caikit_jax.model.make_mesh`), and the rollout
  samples with the actor's own weights.
- **Prompts** are rendered with the policy tokenizer's chat template (assistant turn
  opened) and tokenized without added special tokens, as the torch PPO does;
  prompts longer than ``max_length - max_new_tokens`` tokens are left out. Each
  step takes the next ``rollout_batch_size`` of a seeded, shuffled stream of them.
- **Reward.** The preference model's :meth:`score` of each response (wrapped into
  a :class:`~caikit_core.records.Sample`), on the response's last token; each
  token's reward also carries the KL penalty ``-kl_coef * (logp - logp_ref)``.
  Tunix computes GAE (``gamma``, ``lam``), whitens the advantages, and trains the
  actor on PPO's clipped objective (``cliprange``) and the critic on the clipped
  value loss, each with AdamW (``learning_rate``, gradients clipped to norm 1).
  With ``adaptive_kl`` the coefficient follows Ziegler et al.'s controller towards
  ``target_kl`` (horizon 10,000 samples), as in the torch PPO.
- **Schedule (Tunix's).** A step is ``rollout_batch_size // mini_batch_size``
  rollouts of ``mini_batch_size`` prompts each, and each rollout is trained on for
  ``epochs`` optimiser steps before the next is sampled; so within a step,
  later mini-batches are sampled from the policy as updated by the earlier ones
  (the torch PPO samples the whole step's batch first). ``rollout_batch_size``
  must be a multiple of ``mini_batch_size``.

Where this differs from the torch PPO, by Tunix's design: a response's
end-of-sequence token is not part of it (Tunix's sampler cuts it off, so it is
neither trained on nor in the KL), the actor and the critic are trained in separate
updates (Tunix's actor and critic trainers), so the value loss moves the value head
only and never the shared trunk (``vf_coef``, the weight of the value loss in the
torch PPO's shared loss, has nothing to weigh and is not used), the head's values in
the value loss are those of the trunk's hidden states at the rollout, before the
step's actor updates (:func:`caikit_jax.shims.value_loss_on_rollout_features`), and
log-probabilities, the KL's included, are those of the untempered policy whatever
``temperature`` the rollouts sample at (:func:`caikit_jax.shims.untempered_reference_logps`).

Guards: ``kl_bound`` is checked on every rollout; when its mean KL per response
exceeds it, the policy that sampled it is saved to ``out`` and
:class:`~caikit_core.errors.TrainingStopped` is raised with that checkpoint. The
preference model is called from Tunix's data-loading thread.

Resumable: ``PPOLearner.train`` runs its whole loop with no step boundary, so
:func:`train_ppo` calls it once per step (the cluster config's ``max_steps`` ends
each call at the step's last optimiser step; ``_cluster_class`` turns the cluster's
``close`` at the end of each call into a flush of the buffered metrics). Between two
calls, with ``checkpoint_dir``, :class:`~caikit_jax.checkpoints.Checkpointer` saves the
actor, the critic and both optimisers, and ``loop.json`` what Tunix carries from step
to step (:func:`_loop_state`); a resume loads them into the freshly built learner
(:func:`_resume`) and trains the remaining steps, bitwise as an uninterrupted run on
CPU (docs/reliability.md#resumable-training).

This module imports JAX, Tunix and transformers' tokenizers (not torch models).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from caikit_core.errors import CaikitError, PluginError, TrainingStopped
from caikit_core.interfaces import PreferenceModel
from caikit_core.records import Prompt, Sample, stable_id
from caikit_core.training.metrics import checked_scores
from caikit_jax.checkpoints import Checkpointer
from caikit_jax.config import JaxOptimiserConfig

__all__ = ["KL_HORIZON", "MAX_GRAD_NORM", "PHASES", "train_ppo"]

log = logging.getLogger("caikit.jax")

_WHO = "jax ppo"
#: The adaptive KL controller's horizon, in samples (the torch PPO's default).
KL_HORIZON = 10000
#: Gradients (actor's and critic's) are clipped to this global norm, as in the torch PPO.
MAX_GRAD_NORM = 1.0
#: The phases of a step timed in its ``time/<phase>`` metrics, as the torch PPO's:
#: sampling the rollouts; the reference's and the policy's log-probabilities, the
#: values, the scores and the advantages; and the actor's and the critic's updates.
PHASES = ("generate", "score", "train")


class _KLBoundExceeded(Exception):
    """Raised inside Tunix's data thread; :func:`train_ppo` turns it into TrainingStopped."""

    def __init__(self, step: int, kl: float) -> None:
        super().__init__(f"step {step}: KL {kl}")
        self.step, self.kl = step, kl


class _PromptTokenizer:
    """The policy's tokenizer as Tunix's sampler sees it.

    Prompts arrive rendered by the chat template, so they are encoded without added
    special tokens, and ``bos_id`` is ``None`` so that the sampler does not prepend a
    BOS the template did not write (the torch PPO's token ids, exactly). Responses
    are decoded without special tokens.
    """

    def __init__(self, hf: Any, eos_ids: list[int], pad_id: int) -> None:
        self.hf, self.eos_ids, self.pad = hf, eos_ids, pad_id

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        return list(self.hf(str(text), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=True))

    def bos_id(self) -> int | None:
        return None

    def eos_id(self) -> int:
        return self.eos_ids[0]

    def pad_id(self) -> int:
        return self.pad


def _eos_ids(tokenizer: Any, folder: Path) -> list[int]:
    """The tokenizer's end-of-sequence token and the generation config's, as the torch PPO."""
    import json

    ids: list[int] = []

    def add(value: Any) -> None:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
        elif isinstance(value, list | tuple):
            for v in value:
                add(v)

    add(tokenizer.eos_token_id)
    path = folder / "generation_config.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            add(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
    if not ids:
        raise PluginError(f"{_WHO}: the tokenizer of {folder} has no end-of-sequence token")
    return ids


def _render(tokenizer: Any, prompt: Prompt) -> str:
    if not prompt.messages:
        raise CaikitError(f"{_WHO}: prompt {prompt.id} has no messages")
    turns = [{"role": m.role, "content": m.content} for m in prompt.messages]
    return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))


def _prompt_stream(count: int, seed: int) -> Iterator[int]:
    """Prompt indices forever: a fresh seeded shuffle of ``range(count)`` per pass."""
    rng = np.random.default_rng(seed)
    while True:
        yield from (int(i) for i in rng.permutation(count))


def _check_settings(cfg: JaxOptimiserConfig) -> None:
    if cfg.ppo.rollout_batch_size % cfg.ppo.mini_batch_size:
        raise CaikitError(
            f"{_WHO}: rollout_batch_size ({cfg.ppo.rollout_batch_size}) must be a multiple of "
            f"mini_batch_size ({cfg.ppo.mini_batch_size}): Tunix's PPO trains on whole mini-batches"
        )
    if cfg.ppo.max_length <= cfg.ppo.max_new_tokens:
        raise CaikitError(
            f"{_WHO}: max_length ({cfg.ppo.max_length}) leaves no room for a prompt with "
            f"max_new_tokens = {cfg.ppo.max_new_tokens}"
        )


def _wait(tree: Any) -> Any:
    """``tree`` once every array in it is computed (``jax.block_until_ready``)."""
    return jax.block_until_ready(tree)  # type: ignore[no-untyped-call]


def _scores(reward: PreferenceModel, samples: list[Sample]) -> list[float]:
    return checked_scores(reward.score, samples, _WHO)


def _learner_class() -> type:
    """``PPOLearner`` recording each rollout (KL, scores, lengths) and guarding ``kl_bound``."""
    from tunix.rl.ppo import ppo_learner

    from caikit_jax import shims

    class CaikitPPOLearner(ppo_learner.PPOLearner):  # type: ignore[misc]
        def setup(self, cfg: JaxOptimiserConfig, scores: Any) -> None:
            """``scores``: the cluster's :class:`caikit_jax.shims.OnePassScores`."""
            self.caikit_cfg = cfg
            self.one_pass = scores
            self.rl_cluster.critic_trainer.with_loss_fn(
                shims.value_loss_on_rollout_features, has_aux=True
            )
            #: one dict per rollout: step, n, kl (summed per response, mean), score, length, beta
            self.rollouts: list[dict[str, float]] = []
            #: per step (as a string, for loop.json): seconds per phase of :data:`PHASES`
            self.seconds: dict[str, dict[str, float]] = {}
            self._scores: list[float] = []
            cluster = self.rl_cluster
            for name, phase in (
                ("generate", "generate"),
                ("update_actor", "train"),
                ("update_critic", "train"),
            ):
                setattr(cluster, name, self._timed(phase, getattr(cluster, name)))

        def _timed(self, phase: str, method: Any) -> Any:
            """``method`` adding its seconds to ``phase``, waiting for what it computes
            (JAX dispatches asynchronously: unwaited, a phase's work would be timed in
            the next one's)."""
            from flax import nnx

            def timed(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    out = method(*args, **kwargs)
                    if phase == "train":  # the trainers return nothing; wait for the models
                        for trainer in (
                            self.rl_cluster.actor_trainer,
                            self.rl_cluster.critic_trainer,
                        ):
                            _wait(nnx.state(trainer.model))
                    return _wait(out)
                finally:
                    self._spent(phase, time.perf_counter() - started)

            return timed

        def _step_seconds(self) -> dict[str, float]:
            """The current step's seconds per phase (created at 0)."""
            step = str(int(self.rl_cluster.global_steps))
            return self.seconds.setdefault(step, dict.fromkeys(PHASES, 0.0))

        def _spent(self, phase: str, seconds: float) -> None:
            self._step_seconds()[phase] += seconds

        def _compute_rewards(self, *args: Any, **kwargs: Any) -> Any:
            rewards = super()._compute_rewards(*args, **kwargs)
            self._scores = [float(x) for x in np.asarray(rewards).reshape(-1)]
            return rewards

        def _generate_and_compute_advantage(self, training_input: Any, mode: Any = None) -> Any:
            from tunix.rl import rl_cluster as rl_cluster_lib

            mode = rl_cluster_lib.Mode.TRAIN if mode is None else mode
            started = time.perf_counter()
            sampled = self._step_seconds()["generate"]
            beta = float(self.algo_config.beta)
            example = super()._generate_and_compute_advantage(training_input, mode)
            example = _wait(shims.with_rollout_features(example, self.one_pass))
            mask = np.asarray(jax.device_get(example.completion_mask), dtype=np.float64)
            old = np.asarray(jax.device_get(example.old_per_token_logps), dtype=np.float64)
            if example.ref_per_token_logps is None:  # pragma: no cover - beta is > 0
                ref = old
            else:
                ref = np.asarray(jax.device_get(example.ref_per_token_logps), dtype=np.float64)
            kl = float((((old - ref) * mask).sum(-1)).mean())
            step = int(self.rl_cluster.global_steps)
            n = int(mask.shape[0])
            self.rollouts.append(
                {
                    "step": float(step),
                    "n": float(n),
                    "kl": kl,
                    "score": float(np.mean(self._scores)) if self._scores else float("nan"),
                    "length": float(mask.sum(-1).mean()),
                    "entropy": float((-old * mask).sum(-1).mean()),
                    "beta": beta,
                }
            )
            # everything but the sampling: log-probabilities, values, scores, advantages
            sampling = self._step_seconds()["generate"] - sampled
            self._spent("score", time.perf_counter() - started - sampling)
            cfg = self.caikit_cfg
            if cfg.ppo.kl_bound is not None and kl > cfg.ppo.kl_bound:
                raise _KLBoundExceeded(step, kl)
            if cfg.ppo.adaptive_kl:
                error = min(max(kl / cfg.ppo.target_kl - 1.0, -0.2), 0.2)
                self.algo_config.beta = beta * (1.0 + error * n / KL_HORIZON)
            return example

    return CaikitPPOLearner


def _cluster_class() -> type:
    """``RLCluster`` whose ``close`` (the end of each ``PPOLearner.train`` call) only
    writes the buffered metrics, so that :func:`train_ppo` can call ``train`` once per
    step; :meth:`finish` closes it for good."""
    from tunix.rl import rl_cluster as rl_cluster_lib

    class CaikitRLCluster(rl_cluster_lib.RLCluster):  # type: ignore[misc]
        def close(self) -> None:
            # RLCluster.close less closing the trainers and their metrics logger (which
            # clears every JAX listener): log the step's buffered metrics and forget them
            # (close leaves them buffered, and the next step would log them again), and
            # write each trainer's last optimiser step (Tunix writes one step late)
            for buffered in (self._buffered_train_metrics, self._buffered_eval_metrics):
                for metrics in buffered:
                    self._log_metrics(metrics)
                buffered.clear()
            for trainer in (self.actor_trainer, self.critic_trainer):
                trainer._write_train_metrics()

        def finish(self) -> None:
            super().close()

    return CaikitRLCluster


#: The metric histories (Tunix's ``prefix``, ``name``) the metrics are computed from:
#: one value per optimiser step, the rewards' one per rollout.
_HISTORIES = (
    ("actor", "loss"),
    ("critic", "loss"),
    ("actor", "pg_clipfrac"),
    ("critic", "vf_clipfrac"),
    ("actor", "grad_norm"),
    ("rewards", "reward/mean"),
)


def _history(logger: Any, prefix: str, name: str) -> list[float]:
    try:
        values = logger.get_metric_history(prefix, name, "train")
    except (ValueError, KeyError):
        return []
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _histories(cluster: Any, before: dict[str, list[float]]) -> dict[str, list[float]]:
    """Each of :data:`_HISTORIES`: ``before`` (a checkpoint's) then this run's."""
    logger = cluster._rl_metrics_logger
    return {
        f"{prefix}/{name}": [*before.get(f"{prefix}/{name}", []), *_history(logger, prefix, name)]
        for prefix, name in _HISTORIES
    }


def _loop_state(learner: Any, cluster: Any, step: int, before: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint holds besides the models and optimisers (``loop.json``): the
    step, Tunix's step counters, the KL coefficient, the data-shuffle key, the rollouts'
    seed counter, the rollout records and the metric histories so far."""
    key = learner._data_shuffle_seed
    return {
        "step": step,
        "global_steps": int(cluster.global_steps),
        "iter_steps": int(learner._iter_steps),
        "trainers": {
            role: [int(t._train_steps), int(t._iter_steps)]
            for role, t in (("actor", cluster.actor_trainer), ("critic", cluster.critic_trainer))
        },
        "beta": float(learner.algo_config.beta),
        "shuffle_key": None if key is None else [int(x) for x in np.asarray(key).reshape(-1)],
        "rollout_calls": int(cluster.rollout.generate.calls),
        "rollouts": learner.rollouts,
        "seconds": learner.seconds,
        "histories": _histories(cluster, before),
    }


def _resume(learner: Any, cluster: Any, loop: dict[str, Any]) -> None:
    """Set what :func:`_loop_state` saved (the models and optimisers are loaded)."""
    cluster.global_steps = int(loop["global_steps"])
    learner._iter_steps = int(loop["iter_steps"])
    for role, trainer in (("actor", cluster.actor_trainer), ("critic", cluster.critic_trainer)):
        trainer._train_steps, trainer._iter_steps = (int(x) for x in loop["trainers"][role])
    learner.algo_config.beta = float(loop["beta"])
    if loop["shuffle_key"] is not None:
        learner._data_shuffle_seed = jnp.asarray(np.array(loop["shuffle_key"], dtype=np.uint32))
    cluster.rollout.generate.calls = int(loop["rollout_calls"])
    learner.rollouts = [{k: float(v) for k, v in r.items()} for r in loop["rollouts"]]
    learner.seconds = {
        step: {phase: float(v) for phase, v in row.items()}
        for step, row in loop.get("seconds", {}).items()
    }


def _per_step(values: list[float], per_step: int, steps: int) -> list[float]:
    """Means of consecutive groups of ``per_step`` optimiser-step values, one per step."""
    out = []
    for s in range(steps):
        chunk = values[s * per_step : (s + 1) * per_step]
        out.append(float(np.mean(chunk)) if chunk else float("nan"))
    return out


def _metrics(
    learner: Any,
    histories: dict[str, list[float]],
    cfg: JaxOptimiserConfig,
    kept: int,
    too_long: int,
    seconds_per_step: float,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The run's metrics and its per-step history (see :func:`train_ppo`)."""
    by_step: dict[int, list[dict[str, float]]] = {}
    for r in learner.rollouts:
        by_step.setdefault(int(r["step"]), []).append(r)
    steps = sorted(by_step)

    def mean(step: int, key: str) -> float:
        rows = by_step[step]
        total = sum(r["n"] for r in rows)
        return float(sum(r[key] * r["n"] for r in rows) / total)

    per_step = (cfg.ppo.rollout_batch_size // cfg.ppo.mini_batch_size) * cfg.ppo.epochs

    def each_step(key: str) -> list[float]:
        return _per_step(histories[key], per_step, len(steps))

    policy_loss, value_loss = each_step("actor/loss"), each_step("critic/loss")
    clipfrac, vf_clipfrac = each_step("actor/pg_clipfrac"), each_step("critic/vf_clipfrac")
    grad_norm = each_step("actor/grad_norm")
    # Tunix's per-token reward tensor summed over each response: score - beta * KL.
    rlhf = histories["rewards/reward/mean"]
    first, last = steps[0], steps[-1]
    metrics: dict[str, float] = {
        "steps": float(len(steps)),
        "rollouts": float(len(learner.rollouts)),
        "prompts": float(kept),
        "too_long": float(too_long),
        "kl_first": mean(first, "kl"),
        "kl_last": mean(last, "kl"),
        "score_first": mean(first, "score"),
        "score_last": mean(last, "score"),
        "reward_first": mean(first, "score"),
        "reward_last": mean(last, "score"),
        "beta_first": by_step[first][0]["beta"],
        "beta_last": by_step[last][-1]["beta"],
        "response_length_last": mean(last, "length"),
        "entropy_last": mean(last, "entropy"),
        "loss_first": policy_loss[0],
        "loss_last": policy_loss[-1],
        "value_loss_first": value_loss[0],
        "value_loss_last": value_loss[-1],
        "pg_clipfrac_last": clipfrac[-1],
        "vf_clipfrac_last": vf_clipfrac[-1],
        "grad_norm_last": grad_norm[-1],
        "seconds_per_step": seconds_per_step,
    }
    if len(rlhf) >= len(steps):
        metrics["rlhf_reward_first"] = rlhf[0]
        metrics["rlhf_reward_last"] = rlhf[len(steps) - 1]

    def seconds(step: int) -> dict[str, float]:
        row = learner.seconds.get(str(step), {})
        return {f"time/{phase}": float(row.get(phase, 0.0)) for phase in PHASES}

    for phase in PHASES:
        metrics[f"time/{phase}"] = sum(seconds(step)[f"time/{phase}"] for step in steps)
    history = [
        {
            "step": float(i + 1),
            "loss": policy_loss[i],
            "value_loss": value_loss[i],
            "kl": mean(step, "kl"),
            "reward": mean(step, "score"),
            "beta": by_step[step][0]["beta"],
            "response_length": mean(step, "length"),
            "grad_norm": grad_norm[i],
            **seconds(step),
        }
        for i, step in enumerate(steps)
    ]
    return metrics, history


def train_ppo(
    config: JaxOptimiserConfig,
    *,
    policy: Path,
    reference: Path,
    reward: PreferenceModel,
    prompts: Sequence[Prompt],
    out: Path,
    checkpoint_dir: Path | None = None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Train ``policy`` with Tunix's PPO against ``reward``, penalised by KL to ``reference``.

    :param config: the optimiser's settings; PPO reads ``ppo_steps``,
        ``rollout_batch_size``, ``mini_batch_size``, ``ppo_epochs``, ``max_new_tokens``,
        ``temperature``, ``cliprange``, ``gamma``, ``lam``, ``kl_coef``,
        ``adaptive_kl``, ``target_kl``, ``kl_bound``, ``learning_rate``, ``max_length``,
        ``dtype``, ``gradient_checkpointing`` and ``seed`` (see the module).
    :param policy: a local Hugging Face Llama checkpoint folder with a chat template.
    :param reference: a checkpoint folder with the same vocabulary; frozen.
    :param reward: scores the responses (:meth:`PreferenceModel.score`).
    :param prompts: conversations ending with a user turn.
    :param out: where the trained policy is saved (a Hugging Face folder, with the
        policy's tokenizer files).
    :param checkpoint_dir: where to save checkpoints (``checkpoint_every_steps`` /
        ``checkpoint_every_minutes``, counted in PPO steps) and resume from the newest
        (see the module); ``None``: neither.
    :returns: the metrics and one history row per step (``step``, ``loss``: the step's
        mean policy loss, ``value_loss``, ``kl``, ``reward``: the mean score, ``beta``,
        ``response_length``, ``grad_norm``, ``time/<phase>``). The metrics: ``steps``, ``rollouts``,
        ``prompts``, ``too_long``; ``kl_first`` and ``kl_last`` (the mean over a step's
        responses of ``sum_t (logp - logp_ref)``,
        from the policy that sampled them), ``score_first`` / ``score_last`` (the mean
        preference-model score; also as ``reward_first`` / ``reward_last``, the torch
        optimiser's names), ``rlhf_reward_first`` / ``rlhf_reward_last`` (score minus
        the KL penalty, from Tunix's reward tensor), ``beta_first`` / ``beta_last``,
        ``loss_first`` / ``loss_last`` (the step's mean policy loss),
        ``value_loss_first`` / ``value_loss_last``, ``pg_clipfrac_last``,
        ``vf_clipfrac_last``, ``grad_norm_last``, ``response_length_last`` (tokens, no
        end-of-sequence), ``entropy_last``, ``seconds_per_step`` (of the steps this
        call ran), and ``time/generate``, ``time/score`` and ``time/train``: the seconds
        spent in each of :data:`PHASES`, summed over the steps (a history row has its
        step's; a resumed run's earlier steps keep those timed before it stopped).
    :raises CaikitError: invalid settings, no prompts or none short enough, or a
        preference model returning the wrong number of scores or non-finite ones.
    :raises PluginError: a tokenizer that cannot be loaded or has no chat template.
    :raises TrainingStopped: a rollout's mean KL above ``kl_bound`` (the policy that
        sampled it is saved to ``out`` first).
    """
    import optax
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.ppo import ppo_learner
    from tunix.rl.rollout import base_rollout

    from caikit_jax import shims
    from caikit_jax.model import (
        load_model,
        make_mesh,
        place_on_mesh,
        read_tokenizer,
        save_checkpoint,
    )

    cfg = config
    _check_settings(cfg)
    if not prompts:
        raise CaikitError(f"{_WHO}: no prompts to train on")
    policy, reference, out = Path(policy), Path(reference), Path(out)
    tokenizer = read_tokenizer(policy, who=_WHO)
    eos_ids = _eos_ids(tokenizer, policy)
    pad = tokenizer.pad_token_id
    pad_id = int(pad) if pad is not None else eos_ids[0]
    adapter = _PromptTokenizer(tokenizer, eos_ids, pad_id)

    room = cfg.ppo.max_length - cfg.ppo.max_new_tokens
    kept: list[Prompt] = []
    texts: list[str] = []
    width = 1
    for p in prompts:
        text = _render(tokenizer, p)
        length = len(adapter.encode(text))
        if length <= room:
            kept.append(p)
            texts.append(text)
            width = max(width, length)
    too_long = len(prompts) - len(kept)
    if too_long:
        log.warning(
            "ppo: left out %d of %d prompts longer than max_length - max_new_tokens = %d tokens",
            too_long,
            len(prompts),
            room,
        )
    if not kept:
        raise CaikitError(
            f"{_WHO}: every one of the {len(prompts)} prompts is longer than max_length - "
            f"max_new_tokens = {room} tokens; raise max_length"
        )

    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    mesh = make_mesh()
    actor = load_model(policy, mesh=mesh, dtype=dtype, remat=cfg.gradient_checkpointing)
    ref_model = load_model(reference, mesh=mesh, dtype=dtype)
    if ref_model.config.vocab_size != actor.config.vocab_size:
        raise PluginError(
            f"{_WHO}: the policy ({policy}) and the reference ({reference}) have different "
            "vocabularies"
        )
    for model in (actor, ref_model):  # before the cluster splits them
        shims.keep_completion_logits(model, cfg.ppo.max_new_tokens)
    critic = shims.ppo_critic(actor, seed=cfg.seed)
    # a new head lives on one device, and the critic's step returns it on the mesh:
    # unplaced, the second rollout's one pass and the second critic update compile again
    place_on_mesh(mesh, critic.value_head)
    shims.patch_ppo_rewards()

    def optimiser() -> Any:
        return optax.chain(
            optax.clip_by_global_norm(MAX_GRAD_NORM),
            optax.adamw(cfg.ppo.learning_rate, eps=1e-8, weight_decay=0.0),
        )

    per_step = cfg.ppo.rollout_batch_size // cfg.ppo.mini_batch_size
    rollout_config = base_rollout.RolloutConfig(
        max_tokens_to_generate=cfg.ppo.max_new_tokens,
        temperature=cfg.ppo.temperature,
        top_p=1.0,
        top_k=None,
        seed=None,  # shims.reseed_rollouts gives every rollout its own
        max_prompt_length=width,  # one compiled prefill for every batch
        kv_cache_size=width + cfg.ppo.max_new_tokens,
        eos_tokens=eos_ids,
    )
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={role: mesh for role in rl_cluster_lib.Role},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimiser(),
            critic_optimizer=optimiser(),
            eval_every_n_steps=cfg.ppo.steps * per_step * cfg.ppo.epochs + 1,
            max_steps=cfg.ppo.steps * per_step * cfg.ppo.epochs,
            mini_batch_size=cfg.ppo.mini_batch_size,
            pbar_description=None,
        ),
        rollout_config=rollout_config,
    )
    cluster = _cluster_class()(
        actor=actor,
        critic=critic,
        reference=ref_model,
        tokenizer=adapter,
        cluster_config=cluster_config,
    )
    shims.drop_anchor_snapshot(cluster)
    shims.reseed_rollouts(cluster.rollout, cfg.seed)
    shims.untempered_reference_logps(cluster.inference_worker)
    one_pass = shims.one_trunk_pass(cluster, cluster.critic_trainer.model)

    def caikit_preference_model(
        prompts: Sequence[str], completions: Sequence[str], prompt_index: Any, **kwargs: Any
    ) -> list[float]:
        samples = []
        for i, text in zip(np.asarray(prompt_index).reshape(-1), completions, strict=True):
            p = kept[int(i)]
            samples.append(Sample(stable_id("rl-sample", p.id, str(text)), p.id, p.messages, text))
        return _scores(reward, samples)

    learner = _learner_class()(
        rl_cluster=cluster,
        ppo_config=ppo_learner.PPOConfig(
            num_iterations=cfg.ppo.epochs,
            gamma=cfg.ppo.gamma,
            gae_lambda=cfg.ppo.lam,
            beta=cfg.ppo.kl_coef,
            epsilon=cfg.ppo.cliprange,
            kl_method="kl",  # per-token logp - logp_ref, as the torch PPO's penalty
        ),
        reward_fns=[caikit_preference_model],
        data_shuffle_seed=cfg.seed,
    )
    learner.setup(cfg, one_pass)

    stream = _prompt_stream(len(kept), cfg.seed)
    batches = []
    for _ in range(cfg.ppo.steps):
        index = np.array([next(stream) for _ in range(cfg.ppo.rollout_batch_size)], dtype=np.int64)
        batches.append({"prompts": np.array([texts[i] for i in index]), "prompt_index": index})

    saver = Checkpointer(checkpoint_dir, "ppo", cfg)
    trained = {
        "actor": cluster.actor_trainer.model,
        "actor_optimizer": cluster.actor_trainer.optimizer,
        "critic": cluster.critic_trainer.model.value_head,  # its trunk is the actor's
        "critic_optimizer": cluster.critic_trainer.optimizer,
    }
    loop = saver.restore(trained)
    done = 0 if loop is None else int(loop["step"])
    before: dict[str, list[float]] = {} if loop is None else loop["histories"]
    if loop is not None:
        _resume(learner, cluster, loop)
        log.info("ppo: resuming from the checkpoint of step %d of %d", done, cfg.ppo.steps)

    log.info(
        "ppo: %d prompts, %d steps of %d x %d responses, %d epochs, beta %g, on %s",
        len(kept),
        cfg.ppo.steps,
        per_step,
        cfg.ppo.mini_batch_size,
        cfg.ppo.epochs,
        cfg.ppo.kl_coef,
        jax.default_backend(),
    )
    started = time.perf_counter()
    bound = cluster.cluster_config.training_config
    try:
        # One PPOLearner.train call per step (max_steps ends it at the step's last
        # optimiser step), so that a checkpoint can be saved between steps.
        for step in range(done, cfg.ppo.steps):
            bound.max_steps = (step + 1) * per_step * cfg.ppo.epochs
            learner.train(batches[step : step + 1])
            if saver.due(step + 1, cfg.ppo.steps):
                saver.save(step + 1, trained, _loop_state(learner, cluster, step + 1, before))
    except _KLBoundExceeded as stop:
        save_checkpoint(cluster.actor_trainer.model, out, source=policy)
        message = (
            f"{_WHO}: stopped at step {stop.step}: mean KL to the reference {stop.kl:.6g} "
            f"exceeds kl_bound = {cfg.ppo.kl_bound:g}; the policy that sampled that rollout is "
            f"saved to {out}"
        )
        raise TrainingStopped(message, checkpoint=str(out)) from None
    finally:
        learner.executor.shutdown(wait=False)  # Tunix's data thread, idle now
    histories = _histories(cluster, before)
    cluster.finish()
    save_checkpoint(cluster.actor_trainer.model, out, source=policy)
    seconds = (time.perf_counter() - started) / max(1, cfg.ppo.steps - done)
    metrics, history = _metrics(learner, histories, cfg, len(kept), too_long, seconds)
    log.info(
        "ppo: done, score %.4f -> %.4f, kl %.4f -> %.4f",
        metrics["score_first"],
        metrics["score_last"],
        metrics["kl_first"],
        metrics["kl_last"],
    )
    return metrics, history
