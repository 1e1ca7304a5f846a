"""PPO on JAX (:mod:`caikit_jax.ppo`): Tunix's PPOLearner on a tiny Llama, and the shims it needs.

One short run (two steps) is shared by most tests; the ``kl_bound`` test stops on the
first rollout, and the shim tests drive Tunix's pieces directly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax
import jax.numpy as jnp
from tunix.generate import tokenizer_adapter
from tunix.rl import common
from tunix.rl.inference import inference_worker
from tunix.rl.rollout import base_rollout, vanilla_rollout

from caikit_core.errors import CaikitError, TrainingStopped
from caikit_core.interfaces import FitReport
from caikit_core.records import LabelledComparison, Prompt, Sample, conversation
from caikit_core.testing.tiny_models import build_tiny_llama
from caikit_core.training.settings import PPOSettings
from caikit_jax import shims
from caikit_jax.model import load_model, make_mesh
from caikit_jax.plugin import JaxOptimiserConfig
from caikit_jax.ppo import train_ppo

QUESTIONS = ("What is the capital of France?", "Why is the sky blue?", "Say something nice.")


class FractionalLengthReward:
    """Scores a response ``min(len, 40) / 40``: a fraction in [0, 1], so a reward tensor
    that truncated to integers would zero almost every score."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.calls: list[list[Sample]] = []

    def fit(self, labelled: Sequence[LabelledComparison], out: Path) -> FitReport:
        return FitReport(str(out), {})

    def score(self, samples: Sequence[Sample]) -> list[float]:
        self.calls.append(list(samples))
        return [min(len(s.response), 40) / 40 for s in samples]

    def load(self, path: Path) -> None:
        pass


class SlowLengthReward(FractionalLengthReward):
    """:class:`FractionalLengthReward` that takes at least :data:`SCORE_SECONDS` per call,
    so that its time has to show in the step's ``time/score``."""

    def score(self, samples: Sequence[Sample]) -> list[float]:
        time.sleep(SCORE_SECONDS)
        return super().score(samples)


SCORE_SECONDS = 0.25


def _prompts() -> list[Prompt]:
    return [Prompt(f"p{i}", conversation(("user", q))) for i, q in enumerate(QUESTIONS)]


def _config(**overrides: Any) -> JaxOptimiserConfig:
    """The jax optimiser running PPO with ``[policy_optimiser.ppo]`` + ``overrides``."""
    ppo: dict[str, Any] = {
        "steps": 2,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "epochs": 1,
        "max_new_tokens": 6,
        "learning_rate": 1e-3,
        "kl_coef": 0.05,
        "max_length": 64,
    }
    ppo.update(overrides)
    return JaxOptimiserConfig(algorithm="ppo", seed=0, ppo=PPOSettings(**ppo))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("jax-ppo") / "tiny")


@pytest.fixture(scope="module")
def run(
    tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, float], Path, FractionalLengthReward]:
    import collections

    out = tmp_path_factory.mktemp("jax-ppo-out") / "policy"
    reward = SlowLengthReward()
    compiles: collections.Counter[str] = collections.Counter()

    def count(event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[str(kwargs.get("fun_name"))] += 1

    jax.clear_caches()  # so that every step function compiles (or loads) in this run
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        metrics, history = train_ppo(
            _config(), policy=tiny, reference=tiny, reward=reward, prompts=_prompts(), out=out
        )
    finally:
        with contextlib.suppress(AssertionError, ValueError):  # Tunix may have cleared it
            jax.monitoring.unregister_event_duration_listener(count)
    return metrics, out, reward, history, compiles


# --- the shared run --------------------------------------------------------------------


def test_first_rollout_has_zero_kl_and_later_ones_do_not(run: Any) -> None:
    metrics, _, _ = run[:3]
    assert metrics["steps"] == 2
    # the first rollout comes from the unchanged policy; the reference is the same checkpoint
    assert abs(metrics["kl_first"]) <= 1e-6
    # after an update the policy has moved away from the (frozen) reference
    assert abs(metrics["kl_last"]) > 1e-6


def test_metrics_are_finite_floats(run: Any) -> None:
    metrics, _, _ = run[:3]
    for key in (
        "kl_first",
        "kl_last",
        "score_first",
        "score_last",
        "loss_first",
        "loss_last",
        "value_loss_last",
        "rlhf_reward_first",
        "rlhf_reward_last",
        "beta_last",
        "response_length_last",
    ):
        assert isinstance(metrics[key], float), key
        assert math.isfinite(metrics[key]), (key, metrics[key])
    assert metrics["beta_first"] == pytest.approx(0.05)
    assert metrics["prompts"] == len(QUESTIONS)


def test_each_step_times_its_phases_and_the_scoring_holds_the_reward(run: Any) -> None:
    """``time/generate``, ``time/score`` and ``time/train`` per history row and summed
    in the metrics; the reward (which sleeps) is called in the scoring phase, and the
    phases, timed apart, add up to no more than the steps took."""
    metrics, _, reward, history = run[:4]
    phases = ("time/generate", "time/score", "time/train")
    assert len(history) == 2 and len(reward.calls) == 2  # one rollout per step
    for row in history:
        assert min(row[k] for k in phases) > 0, row
        assert row["time/score"] >= SCORE_SECONDS, row
    for k in phases:
        assert metrics[k] == pytest.approx(sum(row[k] for row in history))
    assert sum(metrics[k] for k in phases) <= metrics["seconds_per_step"] * metrics["steps"]


def test_each_step_function_compiles_once(run: Any) -> None:
    """The second rollout and update reuse the first's executables: the critic's new
    head is placed on the mesh as its update returns it (unplaced, the one pass and the
    critic's step compiled again on the second rollout)."""
    compiles = run[4]
    assert compiles["jit(_logps_and_values)"] == 1
    assert compiles["jit(_train_step)"] == 2  # the actor's and the critic's


def test_reward_sees_samples_of_the_prompts(run: Any) -> None:
    _, _, reward = run[:3]
    assert len(reward.calls) == 2  # one rollout of 2 per step
    ids = {p.id: p.messages for p in _prompts()}
    for batch in reward.calls:
        assert len(batch) == 2
        for sample in batch:
            assert sample.messages == ids[sample.prompt_id]
            assert isinstance(sample.response, str)


def test_fractional_scores_reach_the_learner_untruncated(run: Any) -> None:
    """Tunix's reward tensor (summed per response: score - beta * KL, KL 0 on the first
    rollout) keeps the fractional scores: without ``patch_ppo_rewards`` it is integer."""
    metrics, _, _ = run[:3]
    assert 0 < metrics["score_first"] < 1
    assert metrics["rlhf_reward_first"] == pytest.approx(metrics["score_first"], abs=1e-5)
    expected_last = metrics["score_last"] - metrics["beta_last"] * metrics["kl_last"]
    assert metrics["rlhf_reward_last"] == pytest.approx(expected_last, abs=1e-4)


def test_checkpoint_loads_in_transformers_and_is_trained(run: Any, tiny: Path) -> None:
    import torch
    import transformers

    _, out, _ = run[:3]
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    trained = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True)
    trained_state, base_state = trained.state_dict(), base.state_dict()
    assert trained_state.keys() == base_state.keys()
    changed = [k for k in base_state if not torch.equal(trained_state[k], base_state[k])]
    assert changed, "PPO left every weight unchanged"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = trained(ids).logits
    assert bool(torch.isfinite(logits).all())


# --- guards and settings ----------------------------------------------------------------


def test_kl_bound_stops_and_saves_the_policy(tiny: Path, tmp_path: Path) -> None:
    """A reference other than the policy puts the very first rollout over a tiny bound."""
    other = build_tiny_llama(tmp_path / "other", seed=1)
    out = tmp_path / "stopped"
    with pytest.raises(TrainingStopped, match="kl_bound") as info:
        train_ppo(
            _config(kl_bound=1e-6),
            policy=tiny,
            reference=other,
            reward=FractionalLengthReward(),
            prompts=_prompts(),
            out=out,
        )
    assert info.value.checkpoint == str(out)
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()


def test_rollout_batch_must_be_a_multiple_of_the_mini_batch(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(CaikitError, match="multiple of mini_batch_size"):
        train_ppo(
            _config(rollout_batch_size=3, mini_batch_size=2),
            policy=tiny,
            reference=tiny,
            reward=FractionalLengthReward(),
            prompts=_prompts(),
            out=tmp_path / "x",
        )


def test_no_prompts_is_an_error(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(CaikitError, match="no prompts"):
        train_ppo(
            _config(),
            policy=tiny,
            reference=tiny,
            reward=FractionalLengthReward(),
            prompts=[],
            out=tmp_path / "x",
        )


# --- shims for Tunix defects met by PPO ----------------------------------------------------


@pytest.fixture(scope="module")
def pieces(tiny: Path) -> dict[str, Any]:
    """The tiny policy on Tunix's vanilla rollout, and token batches to score."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    actor = load_model(tiny, mesh=make_mesh())
    adapter = tokenizer_adapter.TokenizerAdapter(tokenizer)
    rollout = vanilla_rollout.VanillaRollout(
        actor,
        adapter,
        base_rollout.CacheConfig(
            cache_size=64,
            num_layers=actor.config.num_layers,
            num_kv_heads=actor.config.num_kv_heads,
            head_dim=actor.config.head_dim,
        ),
    )
    pad = int(tokenizer.pad_token_id)
    # The shapes of the shared run's batches (2 prompts left-padded to the longest of
    # QUESTIONS, 6 response tokens), so that Tunix's compiled functions are reused.
    rows = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in p.messages],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in _prompts()
    ]
    width = max(len(r) for r in rows)
    prompt = jnp.array([[pad] * (width - len(r)) + r for r in rows[:2]], dtype=jnp.int32)
    completion = jnp.array([[20, 21, 22, 23, pad, pad], [24, 25, 26, 27, 28, 29]], dtype=jnp.int32)
    return {
        "actor": actor,
        "rollout": rollout,
        "pad": pad,
        "eos": int(tokenizer.eos_token_id),
        "prompt": prompt,
        "completion": completion,
    }


def test_ppo_critic_survives_compute_score_segment_ids(pieces: dict[str, Any]) -> None:
    """``tunix.rl.common.compute_score`` passes ``segment_ids`` that Llama3 refuses."""
    args = (pieces["prompt"], pieces["completion"], pieces["pad"], pieces["eos"])
    with pytest.raises(TypeError, match="segment_ids"):
        common.compute_score(pieces["actor"], *args)  # a Tunix Llama3 as it is
    values = common.compute_score(shims.ppo_critic(pieces["actor"]), *args)
    assert values.shape == (2, pieces["prompt"].shape[1] + 6)
    assert float(jnp.abs(values).max()) == 0.0  # the head starts at zero


def test_reseed_rollouts_gives_each_rollout_its_own_seed(pieces: dict[str, Any]) -> None:
    """Without the shim every rollout samples with the same key: identical responses."""
    rollout = pieces["rollout"]
    config = base_rollout.RolloutConfig(
        max_tokens_to_generate=8, temperature=1.0, top_p=1.0, max_prompt_length=32
    )
    prompts = ["<|bos|><|user|>\nhello<|eos|>\n<|assistant|>\n"] * 2

    def sample() -> list[list[int]]:
        return [list(map(int, t)) for t in rollout.generate(prompts, config).tokens]

    assert sample() == sample()  # the defect: the same key for every rollout
    shims.reseed_rollouts(rollout, seed=0)
    shims.reseed_rollouts(rollout, seed=0)  # idempotent
    assert sample() != sample()
    assert config.seed is None  # the caller's config is left as it was


def test_reference_logps_are_untempered_like_the_policys(pieces: dict[str, Any]) -> None:
    """RLCluster asks for the reference's log-probabilities at the rollout temperature,
    while the policy's (the rollout's, and the loss's) are at temperature 1."""
    args = (pieces["prompt"], pieces["completion"])
    policy = np.asarray(pieces["rollout"].get_per_token_logps(*args))
    worker = inference_worker.InferenceWorker({"reference": pieces["actor"]})
    tail = (pieces["pad"], pieces["eos"])
    hot = np.asarray(worker.get_ref_per_token_logps(*args, *tail, temperature=0.5))
    assert not np.allclose(hot, policy, atol=1e-3)  # the defect: an identical model, KL != 0
    shims.untempered_reference_logps(worker)
    shims.untempered_reference_logps(worker)  # idempotent
    fixed = np.asarray(worker.get_ref_per_token_logps(*args, *tail, temperature=0.5))
    np.testing.assert_allclose(fixed, policy, atol=1e-6)


def test_one_trunk_pass_gives_tunixs_old_logps_and_values(pieces: dict[str, Any]) -> None:
    """The old log-probabilities (Tunix's rollout) and the values (Tunix's
    ``compute_score``, outside jit) from one jitted pass of the shared trunk; the values
    are handed over once, for the same token arrays only."""
    critic = shims.ppo_critic(pieces["actor"])
    head = critic.value_head.kernel
    head.value = jnp.asarray(np.random.default_rng(0).normal(size=head.value.shape), jnp.float32)
    args, tail = (pieces["prompt"], pieces["completion"]), (pieces["pad"], pieces["eos"])
    cluster = _one_pass_cluster(pieces, critic)
    logps_before = np.asarray(cluster.get_old_per_token_logps(*args))
    values_before = np.asarray(cluster.get_values(*args, *tail))
    assert float(np.abs(values_before).max()) > 0.1  # a head that is not zero

    scores = shims.one_trunk_pass(cluster, critic)
    assert shims.one_trunk_pass(cluster, critic) is scores  # idempotent
    logps = cluster.get_old_per_token_logps(*args, micro_batch_size=1)
    values = cluster.get_values(*args, *tail)
    np.testing.assert_allclose(np.asarray(logps), logps_before, atol=1e-5)
    np.testing.assert_allclose(np.asarray(values), values_before, atol=1e-5)
    assert scores.handed_over == 1
    # other arrays (or a second call) are computed as Tunix does
    again = cluster.get_values(*args, *tail)
    np.testing.assert_allclose(np.asarray(again), values_before, atol=1e-6)
    assert scores.handed_over == 1


def _one_pass_cluster(pieces: dict[str, Any], critic: Any) -> Any:
    """A stand-in for the ``RLCluster`` :func:`shims.one_trunk_pass` reads: the real
    rollout and Tunix's own ``InferenceWorker.get_values`` on ``critic``."""
    import contextlib
    import types

    rollout = pieces["rollout"]
    worker = inference_worker.InferenceWorker({"critic": critic})
    return types.SimpleNamespace(
        rollout=rollout,
        get_old_per_token_logps=lambda *a, **k: rollout.get_per_token_logps(*a),
        get_values=worker.get_values,
        _get_mesh_and_logical_axis_rules_cm=lambda role: contextlib.nullcontext(),
    )


def test_value_loss_on_rollout_features_is_tunixs_without_a_trunk_pass(
    pieces: dict[str, Any],
) -> None:
    """On the trunk the rollout saw, the value loss (and its aux) from the one pass's
    hidden states is Tunix's ``ppo_value_loss_fn``'s, and its gradient runs the head
    alone where Tunix's runs the whole trunk again."""
    from flax import nnx
    from tunix.rl import algo_core
    from tunix.rl import utils as rl_utils
    from tunix.rl.ppo import ppo_learner

    critic = shims.ppo_critic(pieces["actor"])
    head = critic.value_head.kernel
    head.value = jnp.asarray(np.random.default_rng(1).normal(size=head.value.shape), jnp.float32)
    cluster = _one_pass_cluster(pieces, critic)
    scores = shims.one_trunk_pass(cluster, critic)
    prompt, completion, pad, eos = (pieces[k] for k in ("prompt", "completion", "pad", "eos"))
    logps = cluster.get_old_per_token_logps(prompt, completion)
    width = completion.shape[1]
    mask = (completion != pad).astype(jnp.int32)
    values = cluster.get_values(prompt, completion, pad, eos)[:, -width - 1 : -1] * mask
    returns = values + jnp.linspace(-1.0, 1.0, values.size).reshape(values.shape)
    example = ppo_learner.TrainExample(
        prompt_ids=prompt,
        prompt_mask=(prompt != pad).astype(jnp.int32),
        completion_ids=completion,
        completion_mask=mask,
        advantages=jnp.zeros_like(values),
        ref_per_token_logps=None,
        old_per_token_logps=logps,
        returns=returns,
        old_values=values,
    )
    featured = shims.with_rollout_features(example, scores)
    assert featured.features.shape == (2, width, critic.actor.config.embed_dim)
    ours = shims.value_loss_on_rollout_features(critic, featured, 0.2, pad, eos)
    theirs = algo_core.ppo_value_loss_fn(critic, example, 0.2, pad, eos)
    assert float(theirs[0]) > 0.01
    np.testing.assert_allclose(float(ours[0]), float(theirs[0]), rtol=1e-5)
    assert ours[1].keys() == theirs[1].keys()
    for key in theirs[1]:
        np.testing.assert_allclose(float(ours[1][key]), float(theirs[1][key]), atol=1e-5)
    # the features are cut with the rest by Tunix's mini-batch slicing
    row = rl_utils.get_batch_slice(featured, slice(1, 2))
    np.testing.assert_array_equal(np.asarray(row.features), np.asarray(featured.features[1:]))

    graphdef, state = nnx.split(critic)

    def products(loss: Any, batch: Any) -> int:
        def of(state: Any) -> Any:
            return loss(nnx.merge(graphdef, state), batch, 0.2, pad, eos)[0]

        return str(jax.make_jaxpr(jax.grad(of))(state)).count("dot_general")

    assert products(shims.value_loss_on_rollout_features, featured) <= 3  # the head's
    assert products(algo_core.ppo_value_loss_fn, example) > 20  # every layer's, again
    # the hidden states are handed over once, for the rollout that computed them
    with pytest.raises(RuntimeError, match="no one-pass hidden states"):
        shims.with_rollout_features(example, scores)


def test_completion_logits_give_tunixs_logps_and_gradients(
    tiny: Path, pieces: dict[str, Any]
) -> None:
    """A model keeping the completion's logits only gives ``compute_per_token_logps``
    (the reference's and the PPO loss's) the same log-probabilities and gradients as
    the whole sequence's (the shared run samples, with a KV cache, from such a model)."""
    from flax import nnx

    trimmed = load_model(tiny, mesh=make_mesh())
    width = int(pieces["completion"].shape[1])
    shims.keep_completion_logits(trimmed, width)
    args = (pieces["prompt"], pieces["completion"], pieces["pad"], pieces["eos"])

    def logps(model: Any) -> Any:
        graphdef, state = nnx.split(model)
        return common.compute_per_token_logps(graphdef, state, *args, stop_gradient=False)

    np.testing.assert_allclose(
        np.asarray(logps(trimmed)), np.asarray(logps(pieces["actor"])), atol=1e-5
    )
    ids, positions, mask, _ = common.process_ids(*args)
    logits, _ = trimmed(ids, positions, None, mask)
    assert logits.shape[1] == width + 1  # the output projection ran over C + 1 rows

    def loss(model: Any) -> Any:
        return common.compute_per_token_logps(*nnx.split(model), *args, stop_gradient=False).sum()

    grads = [nnx.grad(loss)(m) for m in (trimmed, pieces["actor"])]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
