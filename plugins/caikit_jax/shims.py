"""Every correction caikit applies to Tunix (and one to the JAX stack under it), in one module.

caikit's JAX backend is built on google-tunix (pinned to :data:`TUNIX_VERSION` in
pyproject.toml). Each class or function here corrects one upstream defect, names the
upstream code it corrects, and has a test (``caikit_jax/tests/test_optimiser.py`` for
items 1-4 and 11, ``caikit_jax/tests/test_ppo.py`` for 5-7, 9, 10 and 12,
``caikit_jax/tests/test_memory.py`` for 8) that shows the defect without it.
Nothing else in caikit patches Tunix or JAX.

1. :class:`RopeThetaAttention`: ``tunix/models/llama3/model.py``,
   ``Attention.block`` calls ``apply_rope(query_proj, segment_pos, head_dim=...)``
   without ``rope_theta``, so every model runs with the function's default of
   1,000,000 whatever its ``ModelConfig.rope_theta`` says (SmolLM2 uses 100,000,
   the tiny test models 10,000: logits off by several units).
2. :func:`auto_mesh`: ``jax.make_mesh`` makes ``Explicit`` axes by default since JAX
   0.7, and ``Embedder.encode`` in the same file gathers rows with
   ``self.input_embedding[(x,)]``, which explicit sharding refuses ("out sharding
   could not be resolved unambiguously"). Meshes for Tunix models need ``Auto`` axes.
3. :func:`float_zeros_like`: ``tunix/rl/ppo/ppo_learner.py``,
   ``_generate_and_compute_advantage`` builds the per-token reward tensor with
   ``jnp.zeros_like(jax_completion_ids)``, an integer array, so the preference
   model's float scores are truncated towards zero when added to it. The shim gives
   that module a ``jnp`` whose ``zeros_like`` of an integer array is float32.
4. :class:`SharedTrunkCritic`: ``tunix/rl/utils.py``, ``create_critic_model``
   copies the actor and replaces its ``lm_head`` with a one-output head. A
   tied-embedding model (SmolLM2, Llama 3.2) has no ``lm_head`` (it decodes through
   the embedding matrix), so that "critic" emits vocabulary logits; and the copy is
   a whole trunk with two AdamW moments of its own, 3 of PPO's 7 trunk copies, whose
   backward pass doubled each update's work. ``RLCluster`` cannot share a critic's
   backbone with the actor (``tunix/rl/rl_cluster.py``: "TODO(linchai): maybe
   support critic backbone sharing"). The shim's critic is a head on the actor's own
   trunk, trained alone.
5. The same class: ``tunix/rl/common.py``, ``compute_score`` passes
   ``segment_ids=`` to the critic, which Tunix's own ``Llama3.__call__`` does not
   accept, so PPO with a Llama critic fails on its first rollout.
6. :func:`reseed_rollouts`: ``tunix/rl/rollout/vanilla_rollout.py``,
   ``VanillaRollout.generate`` samples every rollout with the same seed, so a prompt
   seen twice gets the same response twice.
7. :func:`untempered_reference_logps`: ``tunix/rl/rl_cluster.py``,
   ``RLCluster.get_ref_per_token_logps`` divides the reference's logits by the
   rollout temperature while the policy's are at temperature 1, so the KL of an
   unchanged policy is not 0 when sampling at another temperature.
8. :func:`drop_anchor_snapshot`: ``tunix/rl/rl_cluster.py``, ``RLCluster`` keeps
   ``_anchor_policy_state``, a copy of the actor's weights in ``pinned_host``
   memory, taken when the actor trainer is built and at every ``sync_weights``. Only
   ``get_actor_per_token_logps`` reads it, and only the agentic GRPO learner calls
   that; PPO's old log-probabilities come from the rollout model
   (``get_old_per_token_logps``). For PPO it is one whole model copy held for
   nothing (on a CPU, ``pinned_host`` is the same RAM).
9. :func:`one_trunk_pass`: ``tunix/rl/ppo/ppo_learner.py``,
   ``_generate_and_compute_advantage`` runs the trunk twice over every rollout, for
   the policy's old log-probabilities and (outside ``jit``) for the critic's values;
   with item 4's critic both come from the same hidden states, so one jitted pass
   gives both.
10. :func:`keep_completion_logits`: ``tunix/rl/common.py``, ``compute_per_token_logps``
    computes logits over the whole prompt and completion, and keeps the completion's;
    PPO's actor and reference compute the completion's only.
11. :func:`tracer_sharding_without_origin`: ``flax/nnx/variablelib.py``,
    ``Variable.set_value`` compares ``getattr(value, 'sharding', None)``, and on a JAX
    tracer ``jax/_src/core.py``'s ``Tracer.sharding`` builds an error message by
    walking every equation traced so far (``find_progenitors``), which Python then
    discards for ``Tracer.__getattr__``'s: quadratic in the size of the trace. Tunix's
    loader (``tunix/models/safetensors_loader.py``) builds the model under
    ``nnx.eval_shape``, where every parameter's RNG draw pays it.
12. :func:`value_loss_on_rollout_features`: ``tunix/rl/algo_core.py``,
    ``ppo_value_loss_fn`` computes the values for the critic's loss with a new trunk
    pass over every mini-batch (``compute_score``). With item 4's critic only the head
    trains, and item 9's pass already computed the trunk's hidden states at the
    rollout; the loss reads the head's values of those (:class:`FeaturedTrainExample`).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.rl.ppo import ppo_learner

__all__ = [
    "TUNIX_VERSION",
    "CaikitLlama3",
    "FeaturedTrainExample",
    "OnePassScores",
    "ReseededGenerate",
    "RopeThetaAttention",
    "SharedTrunkCritic",
    "auto_mesh",
    "drop_anchor_snapshot",
    "float_zeros_like",
    "keep_completion_logits",
    "one_trunk_pass",
    "patch_ppo_rewards",
    "ppo_critic",
    "project",
    "reseed_rollouts",
    "tracer_sharding_without_origin",
    "trunk",
    "untempered_reference_logps",
    "value_loss_on_rollout_features",
    "with_rollout_features",
]

#: The Tunix release these shims were written against (pinned in pyproject.toml).
TUNIX_VERSION = "0.1.7"

# --- 1. RoPE theta ---------------------------------------------------------------------

_rope_lock = threading.RLock()


@contextlib.contextmanager
def _rope_theta(theta: float) -> Iterator[None]:
    """While tracing one attention block, make ``llama3.apply_rope`` use ``theta``.

    ``Attention.block`` looks ``apply_rope`` up in its module's globals at trace
    time; binding the theta there for the duration of the call is the smallest
    correction that keeps the rest of Tunix's block (GQA, the KV cache, sharding
    constraints) exactly as upstream wrote it. The lock keeps two models with
    different thetas from tracing into each other.
    """
    with _rope_lock:
        original = llama3.apply_rope
        llama3.apply_rope = functools.partial(original, rope_theta=theta)
        try:
            yield
        finally:
            llama3.apply_rope = original


class RopeThetaAttention(llama3.Attention):  # type: ignore[misc]  # Tunix is untyped
    """Tunix's Llama attention, rotating queries and keys with the model's own theta."""

    def block(
        self,
        x: jax.Array,
        segment_pos: jax.Array,
        cache: llama3.LayerCache | None,
        attn_mask: jax.Array | None,
    ) -> tuple[llama3.LayerCache | None, jax.Array]:
        with _rope_theta(self.config.rope_theta):
            out: tuple[llama3.LayerCache | None, jax.Array] = super().block(
                x, segment_pos, cache, attn_mask
            )
        return out


def trunk(model: Any, tokens: jax.Array, positions: jax.Array, attention: Any) -> jax.Array:
    """A Tunix ``Llama3``'s final-norm hidden states ``[B, T, D]``, without a KV cache
    (``Llama3.__call__`` up to the output projection)."""
    x = model.embedder.encode(tokens)
    for layer in model.layers:
        _, x = layer(x, positions, None, attention)
    hidden: jax.Array = model.final_norm(x)
    return hidden


def project(model: Any, hidden: jax.Array) -> jax.Array:
    """A Tunix ``Llama3``'s next-token logits of :func:`trunk`'s hidden states, as
    ``Llama3.__call__`` computes them (the tied embedding, or ``lm_head``)."""
    if model.config.weight_tying:
        out: jax.Array = model.embedder.decode(hidden)
    else:
        out = model.lm_head(hidden)
    return out


class CaikitLlama3(llama3.Llama3):  # type: ignore[misc]
    """Tunix's ``Llama3`` with :class:`RopeThetaAttention` in every layer.

    Parameter paths are upstream's (``layers.N.attn.q_proj.w``), so Tunix's
    safetensors key mapping, trainers and samplers apply unchanged.

    ``logits_to_keep`` (``None``: all) is how many of the last positions a call
    without a KV cache computes logits for (item 10).
    """

    def __init__(self, config: llama3.ModelConfig, *, rngs: nnx.Rngs) -> None:
        super().__init__(config, rngs=rngs)
        for layer in self.layers:
            layer.attn = RopeThetaAttention(config=config, rngs=rngs)
        self.logits_to_keep: int | None = None

    def __call__(
        self,
        input_tokens: jax.Array,
        positions: jax.Array,
        cache: Any,
        attention_mask: jax.Array,
    ) -> tuple[jax.Array, Any]:
        # the signature is upstream's: Tunix inspects it (tunix/rl/common.py) to decide
        # whether to pass segment_ids
        keep = self.logits_to_keep
        if keep is None or cache is not None:
            return super().__call__(input_tokens, positions, cache, attention_mask)  # type: ignore[no-any-return]
        return project(self, trunk(self, input_tokens, positions, attention_mask)[:, -keep:]), None


def keep_completion_logits(model: CaikitLlama3, completion: int) -> None:
    """Compute ``model``'s logits for the last ``completion + 1`` positions only (item 10).

    Corrects ``tunix/rl/common.py``, ``compute_per_token_logps`` (the reference's
    log-probabilities, and the actor's in ``tunix/rl/algo_core.py``'s PPO policy loss):
    it has the model compute logits ``[B, P + C, V]`` for every prompt and completion
    position and then keeps ``logits[:, -C - 1 : -1]``, so the output projection, the
    log-softmax over the vocabulary and their gradients run over the prompt for
    nothing. A model with :attr:`CaikitLlama3.logits_to_keep` = ``C + 1`` returns the
    last ``C + 1`` positions' logits, and Tunix's slice, counted from the end, picks the
    same ``C`` rows from them (what ``logits_to_keep`` does in transformers, and the
    torch PPO passes). Only calls without a KV cache (the sampler's keep all). Set it
    before an ``RLCluster`` splits the model, on models whose every call without a
    cache is for ``C`` completion tokens (PPO's actor and reference).
    """
    model.logits_to_keep = int(completion) + 1


# --- 2. meshes -----------------------------------------------------------------------


def auto_mesh(shape: tuple[int, ...], axis_names: tuple[str, ...]) -> jax.sharding.Mesh:
    """A device mesh whose axes are all ``Auto`` (see the module docstring, item 2)."""
    return jax.make_mesh(
        shape, axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names)
    )


# --- 3. PPO rewards -------------------------------------------------------------------


def float_zeros_like(x: Any, *args: Any, **kwargs: Any) -> jax.Array:
    """``jnp.zeros_like``, but float32 where ``x`` is an integer array (item 3)."""
    if "dtype" not in kwargs and not args and jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        kwargs["dtype"] = jnp.float32
    return jnp.zeros_like(x, *args, **kwargs)


def patch_ppo_rewards() -> None:
    """Give ``tunix.rl.ppo.ppo_learner`` a ``jnp`` with :func:`float_zeros_like`.

    Only that module's name ``jnp`` is rebound (to a namespace that forwards every
    other attribute to ``jax.numpy``); ``jax.numpy`` itself is untouched. Idempotent.
    """
    from tunix.rl.ppo import ppo_learner

    if getattr(ppo_learner.jnp, "_caikit_shim", False):
        return
    namespace = types.SimpleNamespace(zeros_like=float_zeros_like, _caikit_shim=True)

    class _Numpy(types.SimpleNamespace):
        def __getattr__(self, name: str) -> Any:
            return getattr(jnp, name)

    ppo_learner.jnp = _Numpy(**vars(namespace))


# --- 4.-5. the PPO critic ------------------------------------------------------------


class SharedTrunkCritic(nnx.Module):
    """PPO's value model: a one-output head on the actor's own trunk (items 4 and 5).

    The torch PPO's design (a value head on the policy's last hidden state), in place
    of Tunix's ``create_critic_model`` (a whole copy of the actor). ``actor`` is the
    actor itself, not a copy: the critic reads the trunk the actor is being trained
    to, and holds no weights of its own but the ``[D, 1]`` head, zero-initialised so
    every value starts at 0. The head's kernel is an ``nnx.LoRAParam``, which makes
    Tunix's trainer (``tunix/sft/peft_trainer.py``: ``is_lora_enabled``) give the
    critic an optimiser over the head alone and differentiate the value loss with
    respect to the head alone; the trunk moves only with the actor's optimiser (the
    torch PPO also sends ``vf_coef`` times the value loss's gradient into it).

    ``__call__`` takes what Tunix's ``compute_score`` passes, ``segment_ids``
    included (ignored: the attention mask passed with it already keeps padding out),
    and returns ``([B, T, 1] values, None)``.
    """

    def __init__(self, actor: llama3.Llama3, *, seed: int = 0) -> None:
        self.actor = actor
        head = nnx.Linear(
            in_features=actor.config.embed_dim,
            out_features=1,
            use_bias=False,
            kernel_init=nnx.initializers.zeros_init(),
            rngs=nnx.Rngs(seed),
        )
        head.kernel = nnx.LoRAParam(head.kernel.value)
        self.value_head = head

    def __call__(
        self,
        input_tokens: jax.Array,
        positions: jax.Array,
        cache: Any,
        attention_mask: jax.Array | None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        del cache, segment_ids  # see the class docstring
        hidden = self.trunk(input_tokens, positions, attention_mask)
        return self.values(hidden), None

    def trunk(
        self, input_tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array | None
    ) -> jax.Array:
        """The actor's final-norm hidden states ``[B, T, D]`` (no KV cache)."""
        return trunk(self.actor, input_tokens, positions, attention_mask)

    def values(self, hidden: jax.Array) -> jax.Array:
        """The head's ``[B, T, 1]`` values of :meth:`trunk`'s hidden states, in float32."""
        out: jax.Array = self.value_head(hidden.astype(jnp.float32))
        return out


def ppo_critic(actor: llama3.Llama3, *, seed: int = 0) -> SharedTrunkCritic:
    """The critic caikit's PPO gives Tunix: :class:`SharedTrunkCritic` on ``actor``."""
    return SharedTrunkCritic(actor, seed=seed)


# --- 6.-8. PPO on an RLCluster (used by caikit_jax.ppo; tested in tests/test_ppo.py) ---


def _mix_seed(seed: int, count: int) -> int:
    """A non-negative 31-bit integer from ``(seed, count)`` (stable across runs)."""
    value = (seed & 0xFFFFFFFF) * 0x9E3779B1 ^ (count & 0xFFFFFFFF) * 0x85EBCA77
    value ^= value >> 15
    return (value * 0xC2B2AE3D) & 0x7FFFFFFF


class ReseededGenerate:
    """A rollout's ``generate`` passing its ``n``-th call the seed ``mix(seed, n)``
    (:func:`reseed_rollouts`); ``calls`` is ``n`` of the next call, which a resumed
    PPO run sets to the count its checkpoint saved."""

    def __init__(self, original: Any, seed: int) -> None:
        self.original, self.seed, self.calls = original, seed, 0
        self._lock = threading.Lock()

    def __call__(self, prompts: Any, rollout_config: Any, **kwargs: Any) -> Any:
        import dataclasses

        with self._lock:
            count, self.calls = self.calls, self.calls + 1
        seeded = dataclasses.replace(rollout_config, seed=_mix_seed(self.seed, count))
        return self.original(prompts, seeded, **kwargs)


def reseed_rollouts(rollout: Any, seed: int) -> ReseededGenerate:
    """Give each of ``rollout``'s ``generate`` calls a sampling seed of its own (item 6).

    Corrects ``tunix/rl/rollout/vanilla_rollout.py``, ``VanillaRollout.generate``: it
    hands ``rollout_config.seed`` to the sampler on every call, so every rollout of a
    training run draws with the same PRNG key (``PRNGKey(0)`` when the seed is
    ``None``) and a prompt sampled twice by a policy that has barely moved gets the
    same response twice. Passing a ``jax.Array`` key instead is no way out:
    ``tunix/generate/sampler.py`` donates the sampling state, key included, to its
    compiled prefill, so the second rollout fails with "Array has been deleted".
    The shim replaces the instance's ``generate`` with a :class:`ReseededGenerate`,
    which passes the ``n``-th call the integer seed ``mix(seed, n)``, and returns it.
    Idempotent.
    """
    if isinstance(rollout.generate, ReseededGenerate):
        return rollout.generate
    wrapper = ReseededGenerate(rollout.generate, seed)
    rollout.generate = wrapper
    return wrapper


def untempered_reference_logps(worker: Any) -> None:
    """Compute the reference's log-probabilities at temperature 1, as the policy's are (item 7).

    Corrects ``tunix/rl/rl_cluster.py``, ``RLCluster.get_ref_per_token_logps``: it
    passes the rollout temperature to the reference model's log-probabilities, while
    the policy's are computed at temperature 1 (``get_old_per_token_logps`` through
    ``VanillaRollout.get_per_token_logps``, and the new ones in
    ``tunix/rl/algo_core.py``, ``ppo_policy_loss_fn``). With a temperature other
    than 1 the KL penalty then compares two different distributions and is not 0
    for an unchanged policy. The shim wraps ``worker``'s (the cluster's
    ``InferenceWorker``) ``get_ref_per_token_logps`` to use temperature 1.
    Idempotent.
    """
    original = worker.get_ref_per_token_logps
    if getattr(original, "_caikit_untempered", False):
        return

    def get_ref_per_token_logps(*args: Any, **kwargs: Any) -> Any:
        kwargs["temperature"] = 1.0
        return original(*args, **kwargs)

    get_ref_per_token_logps._caikit_untempered = True  # type: ignore[attr-defined]
    worker.get_ref_per_token_logps = get_ref_per_token_logps


# --- 8. the anchor snapshot --------------------------------------------------------------


def drop_anchor_snapshot(cluster: Any) -> None:
    """Free ``cluster``'s anchor copy of the actor and stop it being taken again (item 8).

    ``cluster`` is an ``RLCluster`` driven by the PPO learner, which never reads the
    anchor. The shim releases the copy made at construction and wraps the instance's
    ``sync_weights`` to release the one each sync takes. A learner that reads the
    anchor (``get_actor_per_token_logps``) then fails loudly ("Anchor policy state is
    not initialized") instead of using a stale copy. Idempotent.
    """
    cluster._anchor_policy_state = None
    original = cluster.sync_weights
    if getattr(original, "_caikit_no_anchor", False):
        return

    def sync_weights() -> None:
        original()
        cluster._anchor_policy_state = None

    sync_weights._caikit_no_anchor = True  # type: ignore[attr-defined]
    cluster.sync_weights = sync_weights


# --- 9. one trunk pass for the old log-probabilities and the values ---------------------


@functools.partial(jax.jit, static_argnames=("pad_id", "eos_id"))
def _logps_and_values(
    graphdef: Any,
    state: Any,
    prompt_tokens: jax.Array,
    completion_tokens: jax.Array,
    pad_id: int,
    eos_id: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``[B, C]`` log-probabilities of the completions, ``[B, P + C]`` values and the
    ``[B, C, D]`` hidden states the completion's values are read from (item 12), from
    one pass of a :class:`SharedTrunkCritic`'s trunk; inputs built as Tunix's."""
    from tunix.rl import common

    critic = nnx.merge(graphdef, state)
    ids, positions, attention, _ = common.process_ids(
        prompt_tokens, completion_tokens, pad_id, eos_id
    )
    hidden = critic.trunk(ids, positions, attention)
    width = completion_tokens.shape[1]
    features = hidden[:, -width - 1 : -1]  # the completion's positions
    logps = common.selective_log_softmax(project(critic.actor, features), ids[:, -width:])
    values = critic.values(hidden)[..., 0]
    frozen = jax.lax.stop_gradient
    return frozen(logps), frozen(values), frozen(features)


class OnePassScores:
    """``get_old_per_token_logps`` and ``get_values`` of an ``RLCluster`` whose critic
    is a :class:`SharedTrunkCritic` on its rollout model (:func:`one_trunk_pass`):
    the first computes both from one trunk pass and keeps the values for the second,
    which hands them over when it is called with the same token arrays (as
    ``PPOLearner`` calls it, right after) and otherwise computes them as Tunix does.
    The pass's hidden states wait for :meth:`features` (item 12)."""

    def __init__(self, cluster: Any, critic: SharedTrunkCritic) -> None:
        self.cluster, self.critic = cluster, critic
        self.original_values = cluster.get_values
        self._kept: tuple[jax.Array, jax.Array, jax.Array] | None = None
        self._features: tuple[jax.Array, jax.Array, jax.Array] | None = None
        #: trunk passes saved (values handed over without a forward pass of their own)
        self.handed_over = 0

    def old_logps(
        self, prompt_tokens: jax.Array, completion_tokens: jax.Array, micro_batch_size: Any = None
    ) -> jax.Array:
        del micro_batch_size  # one pass over the batch, as get_values makes
        from tunix.rl.rl_cluster import Role

        rollout = self.cluster.rollout
        with self.cluster._get_mesh_and_logical_axis_rules_cm(Role.ROLLOUT):
            graphdef, state = nnx.split(self.critic)
            logps, values, features = _logps_and_values(
                graphdef,
                state,
                prompt_tokens,
                completion_tokens,
                pad_id=int(rollout.pad_id()),
                eos_id=int(rollout.eos_id()),
            )
        self._kept = (prompt_tokens, completion_tokens, values)
        self._features = (prompt_tokens, completion_tokens, features)
        out: jax.Array = logps
        return out

    def values(
        self, prompt_tokens: jax.Array, completion_tokens: jax.Array, pad_id: int, eos_id: int
    ) -> jax.Array:
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] is prompt_tokens and kept[1] is completion_tokens:
            self.handed_over += 1
            return kept[2]
        out: jax.Array = self.original_values(prompt_tokens, completion_tokens, pad_id, eos_id)
        return out

    def features(self, prompt_tokens: jax.Array, completion_tokens: jax.Array) -> jax.Array:
        """The hidden states of the last :meth:`old_logps` pass, which must have been
        over these token arrays (the same objects)."""
        kept, self._features = self._features, None
        if kept is None or kept[0] is not prompt_tokens or kept[1] is not completion_tokens:
            raise RuntimeError(
                "caikit_jax.shims: no one-pass hidden states for this rollout (its old "
                "log-probabilities were not computed by OnePassScores.old_logps)"
            )
        return kept[2]


def one_trunk_pass(cluster: Any, critic: SharedTrunkCritic) -> OnePassScores:
    """Compute a rollout's old log-probabilities and values in one pass (item 9).

    Corrects ``tunix/rl/ppo/ppo_learner.py``, ``_generate_and_compute_advantage``: it
    runs the policy over each rollout for its log-probabilities
    (``RLCluster.get_old_per_token_logps``, jitted) and then the critic for its values
    (``get_values`` -> ``tunix/rl/common.py``, ``compute_score``, which calls the model
    outside ``jit``, op by op). With :class:`SharedTrunkCritic` both read the same
    trunk, so the second pass recomputes the first's hidden states. The shim replaces
    the instance's two methods with an :class:`OnePassScores`'s, whose one jitted pass
    gives both (to float32 rounding: XLA fuses the one program differently from the
    two), and returns it. ``critic`` must be the cluster's critic on its rollout model
    (vanilla rollout, the actor's weights). Idempotent.
    """
    if isinstance(getattr(cluster.get_values, "__self__", None), OnePassScores):
        return cluster.get_values.__self__  # type: ignore[no-any-return]
    scores = OnePassScores(cluster, critic)
    cluster.get_old_per_token_logps = scores.old_logps
    cluster.get_values = scores.values
    return scores


# --- 11. the message of a tracer's missing sharding -------------------------------------

_quiet = {"depth": 0}
_quiet_lock = threading.Lock()


def _no_sharding(tracer: Any) -> Any:
    raise AttributeError("sharding")  # Tracer.__getattr__ raises the caller's error


@contextlib.contextmanager
def tracer_sharding_without_origin() -> Iterator[None]:
    """While open, a traced value's missing ``sharding`` skips the message JAX builds
    and throws away (item 11).

    ``Tracer.sharding`` raises an ``AttributeError`` whose message includes the
    value's origin, found by walking every equation traced so far
    (``DynamicJaxprTracer._origin_msg`` -> ``find_progenitors``); Python then calls
    ``Tracer.__getattr__``, whose own ``AttributeError`` ("use ``jax.typeof(x)``") is
    the one the caller sees. Flax calls ``getattr(value, 'sharding', None)`` on every
    parameter it sets, so a model built under a trace (``nnx.eval_shape`` in Tunix's
    loader) pays time quadratic in its size for messages nobody reads. Measured on
    SmolLM2-135M (2 idle cores): ``load_model`` 2.5-3.0 s -> 0.45-0.7 s. The error and
    its message are unchanged. Reentrant; the attribute is put back when the
    outermost block closes. caikit opens it around each jax stage and each model load.
    """
    from jax._src.interpreters import partial_eval

    tracer: Any = partial_eval.DynamicJaxprTracer
    with _quiet_lock:
        _quiet["depth"] += 1
        if _quiet["depth"] == 1:
            tracer.sharding = property(_no_sharding)
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                del tracer.sharding


# --- 12. the value loss on the rollout's hidden states --------------------------------


@flax.struct.dataclass(frozen=True)
class FeaturedTrainExample(ppo_learner.TrainExample):  # type: ignore[misc]
    """Tunix's PPO ``TrainExample`` and ``features``: the ``[B, C, D]`` trunk hidden
    states the completion's old values were read from (item 12). A pytree like its
    base, so Tunix's mini-batch slicing and shuffling cut ``features`` with the rest."""

    features: jax.Array | None = None


def with_rollout_features(example: Any, scores: OnePassScores) -> FeaturedTrainExample:
    """``example`` (what ``PPOLearner._generate_and_compute_advantage`` returns) with the
    hidden states of the one pass :class:`OnePassScores` made over its tokens."""
    import dataclasses

    fields = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
    features = scores.features(example.prompt_ids, example.completion_ids)
    return FeaturedTrainExample(**fields, features=features)


def value_loss_on_rollout_features(
    model: SharedTrunkCritic,
    train_example: FeaturedTrainExample,
    clip_range_value: float,
    pad_id: int,
    eos_id: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped value loss on the head's values of the rollout's hidden states
    (item 12): the critic trainer's loss in place of Tunix's ``ppo_value_loss_fn``.

    Corrects ``tunix/rl/algo_core.py``, ``ppo_value_loss_fn``: it recomputes the
    values of every mini-batch with a trunk pass of its own (``compute_score``), and
    with :class:`SharedTrunkCritic` that pass only feeds the ``[D, 1]`` head, the one
    thing the critic trains: it was 0.8-1.0 s of each 4-response update on
    SmolLM2-135M, where the head's values cost nothing. Same loss, same ``aux``
    (Tunix's formula: ``0.5 * masked_mean(max((v - R)^2, (clip(v, v_old - c, v_old +
    c) - R)^2))``). The features are the trunk's at the rollout, before the actor's
    updates of the step: exactly what the first mini-batch of the first epoch read
    before, and one or more actor updates older for the others (Tunix's critic read
    the trunk after each actor update; the torch PPO reads it before, in one loss).
    ``pad_id`` and ``eos_id`` are accepted as the trainer passes them.
    """
    del pad_id, eos_id  # the features are already the completion's positions
    from tunix.rl.algo_core import masked_mean

    assert train_example.features is not None, "with_rollout_features attaches them"
    mask = train_example.completion_mask
    old, returns = train_example.old_values, train_example.returns
    vpreds = model.values(train_example.features)[..., 0]
    clipped = jnp.clip(vpreds, old - clip_range_value, old + clip_range_value)
    losses, losses_clipped = jnp.square(vpreds - returns), jnp.square(clipped - returns)
    loss = 0.5 * masked_mean(jnp.maximum(losses, losses_clipped), mask)
    aux = {
        "vf_loss": loss,
        "vpred_mean": masked_mean(vpreds, mask),
        "vf_clipfrac": masked_mean(jnp.greater(losses_clipped, losses), mask),
        "return_mean": masked_mean(returns, mask),
    }
    return loss, aux
