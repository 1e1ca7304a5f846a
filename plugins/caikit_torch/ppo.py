"""PPO for causal language models against a scalar reward, with a KL penalty to a reference.

This is RL-CAI's policy step (Bai et al. 2022, section 4): the policy samples
responses to prompts, a preference model scores them, and PPO (Schulman et al.
2017) raises the score while a per-token KL penalty keeps the policy close to a
frozen reference (Ziegler et al. 2019; Stiennon et al. 2020). TRL dropped its
``PPOTrainer`` after 1.12; this is caikit's own, compact implementation.

One PPO iteration (a *step*):

1. **Rollout.** ``rollout_batch_size`` prompts (per process) are rendered with
   the tokenizer's chat template (assistant turn opened), left-padded, and one
   response each is sampled at ``temperature`` (no top-k / top-p, so the sampling
   distribution is exactly the one whose log-probabilities are trained). A
   response ends at its first end-of-sequence token (kept, and scored as part of
   the response) or after ``max_new_tokens`` tokens.
2. **Scoring.** One forward pass of the policy gives each response token's
   log-probability and the value of the state before it; one of the frozen
   reference gives its log-probabilities. The reward function scores the decoded
   texts. Each token's reward is the KL penalty ``-beta * (logp - logp_ref)``
   (the *non-score* reward) and the last token's also gets the score.
3. **Advantages.** Generalised advantage estimation (:func:`gae`) over the
   response tokens, returns ``advantages + values``, advantages whitened.
4. **Update.** ``epochs`` passes over the rollout in shuffled mini-batches of
   ``mini_batch_size``, each an AdamW step on the clipped policy objective
   (:func:`clipped_policy_loss`) plus ``vf_coef`` times the clipped value loss
   (:func:`clipped_value_loss`), gradients clipped to ``max_grad_norm``.
5. **KL coefficient.** Fixed, or adapted towards ``target_kl`` by
   :class:`KLController` (Ziegler et al. 2019).

The value function is a linear head on the policy's last hidden state (zero
initialised, so every value starts at 0 and the head sends no gradient into the
policy at first), not a separate value model: one forward pass gives both the
log-probabilities and the values, which halves the compute and memory of the
update compared with a second transformer (TRL 1.12's design), at the price of a
shared trunk, whose value-loss gradient ``vf_coef`` keeps small. The saved
checkpoint is the policy alone: a plain Hugging Face folder, in float32 (both models
are loaded in float32 whatever their saved dtype).

Log-probabilities used as the "old" policy and the reference's come from the
same kind of full forward pass (not from the sampler's scores), so when the
policy equals the reference the KL of the first rollout is exactly 0, and the
first mini-batch's probability ratios are 1 up to floating-point batching effects
(TRL 1.12 took them from the sampler's scores, which differ slightly from a
forward pass).

It runs in one plain process (CPU or one GPU), or under ``accelerate launch``
across processes: :class:`accelerate.Accelerator` places the models, wraps the
trainable module for data parallelism and reduces the metrics. Each process
samples its own ``rollout_batch_size`` prompts (a disjoint slice of one shuffled
order) and calls the reward function on its own responses. On CPU a run is
deterministic given ``seed``: sampling, prompt order and mini-batch order draw
from generators seeded from it, and the global random state is left untouched.

Guards: a non-finite loss raises :class:`~caikit_core.errors.TrainingStopped`
naming the step, epoch and mini-batch (before the bad gradient is applied); a
mean rollout KL above ``kl_bound`` saves the current policy to ``out`` and raises
:class:`~caikit_core.errors.TrainingStopped` with that checkpoint.

:func:`optimise_ppo` is the ``torch`` policy optimiser's ``algorithm = "ppo"``: it
passes ``[policy_optimiser.ppo]`` (:class:`~caikit_core.training.settings.PPOSettings`)
to :func:`train_ppo` as it is.

This module imports torch, transformers and accelerate at import time.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import attrs
import torch
import transformers
from torch import nn

import caikit_torch.checkpoints as checkpoints
from caikit_core.errors import CaikitError, PluginError, TrainingStopped
from caikit_core.interfaces import PreferenceModel, RolloutGenerator
from caikit_core.records import Conversation, Prompt, RolloutRequest, Sample, stable_id
from caikit_core.training.settings import PPOSettings
from caikit_torch.common import RLRun, chat_turns, score_samples

__all__ = [
    "METRIC_KEYS",
    "PPO_RECORD",
    "KLController",
    "PPOOptions",
    "RewardFn",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae",
    "masked_whiten",
    "optimise_ppo",
    "train_ppo",
]

log = logging.getLogger("caikit.torch")

_WHO = "ppo"

#: The file in a saved checkpoint that records how it was trained.
PPO_RECORD = "caikit_ppo.json"
#: The file beside it with every sampled response, one JSON line each:
#: ``{"step": int, "prompt": the last user turn, "response": text}`` (what the
#: ``goodhart`` instrument reads to find phrases that spread over training).
ROLLOUTS_FILE = "rollouts.jsonl"

#: The keys of every step's metrics (all floats; means over processes, except timings).
#:
#: - ``step``: the step's index, from 0.
#: - ``objective/kl``: the rollout's KL to the reference, ``sum_t (logp - logp_ref)``
#:   over a response's tokens, averaged over responses.
#: - ``objective/entropy``: ``sum_t -logp`` over a response's sampled tokens, averaged
#:   (a one-sample estimate of the policy's sequence entropy).
#: - ``objective/scores``: the mean reward-function score.
#: - ``objective/non_score_reward``: the mean summed KL penalty, ``-beta * kl``.
#: - ``objective/rlhf_reward``: ``scores + non_score_reward``.
#: - ``policy/clipfrac``, ``val/clipfrac``: the fraction of tokens where the clipped
#:   policy (value) term was the larger, averaged over the step's mini-batch updates.
#: - ``policy/approxkl``: ``0.5 * mean((logp_new - logp_old)^2)``, averaged likewise.
#: - ``val/ratio``: the mean probability ratio ``exp(logp_new - logp_old)``, likewise.
#: - ``val/response_length``: the mean response length in tokens (end-of-sequence
#:   token included).
#: - ``loss/policy``, ``loss/value``, ``loss/total``: the mini-batch losses, averaged
#:   (``total = policy + vf_coef * value``).
#: - ``beta``: the KL coefficient used for this step's rewards.
#: - ``time/generate``, ``time/score``, ``time/train``, ``time/push``: seconds spent
#:   sampling; computing log-probabilities, values, rewards and advantages; updating;
#:   and pushing the updated weights into the rollout generator (0 without one).
METRIC_KEYS: tuple[str, ...] = (
    "step",
    "objective/kl",
    "objective/entropy",
    "objective/rlhf_reward",
    "objective/non_score_reward",
    "objective/scores",
    "policy/clipfrac",
    "policy/approxkl",
    "val/ratio",
    "val/response_length",
    "loss/policy",
    "loss/value",
    "loss/total",
    "val/clipfrac",
    "beta",
    "time/generate",
    "time/push",
    "time/score",
    "time/train",
)

#: Scores a batch: the prompts' messages and the responses' texts, in the same
#: order, to one finite float per response.
RewardFn = Callable[[Sequence[Conversation], Sequence[str]], list[float]]


@dataclass(frozen=True)
class PPOOptions:
    """What :func:`train_ppo` takes besides the backend-neutral
    :class:`~caikit_core.training.settings.PPOSettings`: fixed by the ``torch`` plugin,
    open to direct callers.

    :ivar seed: seeds sampling, prompt order and mini-batch order.
    :ivar device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (the GPU if there is one);
        under ``accelerate launch`` the launcher assigns each process its GPU.
    :ivar kl_horizon: the adaptive KL controller's horizon, in samples.
    :ivar cliprange_value: the value prediction's clip range.
    :ivar whiten_rewards: whiten the per-token rewards (not shifting their mean).
    :ivar max_grad_norm: gradients are clipped to this total norm.
    """

    seed: int = 0
    device: str = "cpu"
    kl_horizon: int = 10000
    cliprange_value: float = 0.2
    whiten_rewards: bool = False
    max_grad_norm: float = 1.0

    def problems(self) -> list[str]:
        """One line per invalid option (empty when all are valid)."""
        out: list[str] = []
        if self.kl_horizon < 1:
            out.append(f"kl_horizon must be >= 1, got {self.kl_horizon}")
        if not self.cliprange_value > 0:
            out.append(f"cliprange_value must be > 0, got {self.cliprange_value}")
        if not self.max_grad_norm > 0:
            out.append(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.device not in ("cpu", "cuda", "auto"):
            out.append(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        return out


# --- the maths --------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    lam: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over token sequences.

    For each row, with ``V(s_T) = 0`` after the last token,
    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; the returns are ``A_t + V(s_t)``.

    :param rewards: ``[batch, tokens]`` per-token rewards.
    :param values: ``[batch, tokens]`` the value of the state before each token.
    :param gamma: the discount factor.
    :param lam: GAE's lambda.
    :param mask: ``[batch, tokens]``, true on real tokens; each row's real tokens
        come first. Rewards and values past them are taken as 0 (the episode has
        ended), and advantages and returns there are 0.
    :returns: ``(advantages, returns)``, both ``[batch, tokens]``.
    """
    if rewards.shape != values.shape or rewards.dim() != 2:
        raise ValueError(
            f"rewards and values must both be [batch, tokens], got {tuple(rewards.shape)} "
            f"and {tuple(values.shape)}"
        )
    if mask is not None:
        rewards = rewards * mask
        values = values * mask
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_values = torch.zeros_like(values[:, 0])
    for t in range(width - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
        next_values = values[:, t]
    returns = advantages + values
    if mask is not None:
        advantages = advantages * mask
        returns = returns * mask
    return advantages, returns


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True
) -> torch.Tensor:
    """``values`` normalised to mean 0 and variance 1 over the positions where ``mask``.

    The variance is unbiased (Bessel-corrected) when more than one position is
    masked in; positions outside the mask are 0 in the result.

    :param shift_mean: ``False`` keeps the original mean (only rescales).
    """
    mask_f = mask.to(values.dtype)
    count = mask_f.sum()
    mean = _masked_mean(values, mask_f)
    var = _masked_mean((values - mean) ** 2, mask_f)
    if count > 1:
        var = var * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss (to minimise), averaged over the masked tokens.

    Per token, with ``ratio = exp(logprobs - old_logprobs)``:
    ``max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange))``.

    :returns: ``(loss, clipfrac)``: the mean loss, and the fraction of tokens where
        the clipped term is the larger (the gradient is cut off).
    """
    mask_f = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _masked_mean(torch.maximum(unclipped, clipped), mask_f)
    clipfrac = _masked_mean((clipped > unclipped).to(logprobs.dtype), mask_f)
    return loss, clipfrac


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss, averaged over the masked tokens.

    Per token: ``0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``.

    :returns: ``(loss, clipfrac)``: the mean loss, and the fraction of tokens where
        the clipped error is the larger.
    """
    mask_f = mask.to(values.dtype)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * _masked_mean(torch.maximum(err, err_clipped), mask_f)
    clipfrac = _masked_mean((err_clipped > err).to(values.dtype), mask_f)
    return loss, clipfrac


class KLController:
    """The KL penalty's coefficient ``beta``: fixed, or adaptive (Ziegler et al. 2019).

    The adaptive rule moves ``beta`` proportionally to the relative error of the
    observed KL, clipped to +-20%: ``e = clip(kl / target - 1, -0.2, 0.2)``,
    ``beta *= 1 + e * n / horizon``, where ``n`` is the number of samples the
    KL was measured on. KL above the target raises ``beta``; below it lowers it.
    """

    def __init__(
        self, init: float, *, adaptive: bool = False, target: float = 6.0, horizon: int = 10000
    ) -> None:
        self.value = float(init)
        self.adaptive = adaptive
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, samples: int) -> float:
        """Update ``beta`` after a rollout of ``samples`` samples with mean KL ``kl``.

        :returns: the new ``beta`` (unchanged when fixed).
        """
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * samples / self.horizon
        return self.value


# --- models -----------------------------------------------------------------------------


class _PolicyWithValue(nn.Module):
    """A causal LM and a linear value head on its last hidden state."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy
        text_config = policy.config.get_text_config()
        hidden = int(text_config.hidden_size)
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device=policy.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        keep: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last ``keep`` positions' logits and values (``[batch, keep, vocab]``,
        ``[batch, keep]``)."""
        out = _lm_forward(self.policy, input_ids, attention_mask, position_ids, keep, hidden=True)
        hidden_states = out.hidden_states[-1][:, -keep:, :]
        head_dtype = self.value_head.weight.dtype
        values = self.value_head(hidden_states.to(head_dtype)).squeeze(-1)
        logits: torch.Tensor = out.logits[:, -keep:, :]
        return logits, values


def _lm_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    keep: int,
    *,
    hidden: bool = False,
) -> Any:
    """A causal LM's forward pass computing logits for the last ``keep`` positions only
    where the model supports it (``logits_to_keep``)."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,
        "return_dict": True,
    }
    if hidden:
        kwargs["output_hidden_states"] = True
    if getattr(model, "_caikit_logits_to_keep", False):
        kwargs["logits_to_keep"] = keep
    return model(**kwargs)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens`` (``[batch, n]``), in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _check_folder(path_text: str, role: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.is_dir():
        raise PluginError(f"{_WHO}: {role} folder {path} does not exist or is not a folder")
    if not (path / "config.json").is_file():
        raise PluginError(
            f"{_WHO}: {role} folder {path} is not a Hugging Face checkpoint (no config.json)"
        )
    return path


def _load_lm(folder: Path, role: str) -> Any:
    """A causal LM in float32 (AdamW on low-precision weights loses small updates;
    ``accelerate launch --mixed_precision bf16`` still runs the matmuls in bf16)."""
    try:
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise PluginError(f"{_WHO}: cannot load the {role} model {folder}: {exc}") from exc
    model._caikit_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    _disable_dropout(model)
    return model


def _disable_dropout(model: nn.Module) -> None:
    """Dropout makes the old, new and reference log-probabilities disagree: turn it off.

    The models stay in eval mode throughout (gradients flow all the same), which
    turns off every kind of dropout a model implements; ``nn.Dropout`` layers are
    also zeroed in case something switches a model back to train mode.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.eval()


def _load_tokenizer(folder: Path) -> Any:
    try:
        tokenizer: Any = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PluginError(f"{_WHO}: cannot load the tokenizer of {folder}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise PluginError(
            f"{_WHO}: the tokenizer of {folder} has no chat template; PPO on conversations "
            "needs one"
        )
    return tokenizer


def _make_accelerator(device: str) -> Any:
    import accelerate

    if device == "cuda" and not torch.cuda.is_available():
        raise PluginError(f"{_WHO}: device = 'cuda' but torch sees no CUDA device")
    return accelerate.Accelerator(cpu=device == "cpu")


# --- rollouts ---------------------------------------------------------------------------


@dataclass
class _Rollout:
    """One rollout's tensors, all ``[batch, ...]`` on the training device."""

    input_ids: torch.Tensor  # [B, P + R] left-padded prompt then right-padded response
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    responses: torch.Tensor  # [B, R]
    mask: torch.Tensor  # [B, R] bool: the response's tokens (up to its end-of-sequence)
    logprobs: torch.Tensor  # [B, R] the policy's, at sampling time
    ref_logprobs: torch.Tensor  # [B, R]
    values: torch.Tensor  # [B, R]
    scores: torch.Tensor  # [B]
    texts: list[str]


def _prompt_stream(count: int, seed: int) -> Iterator[int]:
    """Prompt indices forever: a fresh seeded shuffle of ``range(count)`` per pass."""
    epoch = 0
    while True:
        generator = torch.Generator().manual_seed(_mix(seed, 1, epoch))
        yield from torch.randperm(count, generator=generator).tolist()
        epoch += 1


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (order-sensitive, stable across runs)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 0x100000001B3 ^ (part & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for the duration, restoring them afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _Trainer:
    """The state of one :func:`train_ppo` run (see the module docstring)."""

    def __init__(
        self,
        policy: str,
        reference: str,
        reward: RewardFn,
        prompts: Sequence[Conversation],
        settings: PPOSettings,
        options: PPOOptions,
        out: Path,
        rollouts: RolloutGenerator | None = None,
        checkpoint_dir: Path | None = None,
        schedule: checkpoints.Schedule | None = None,
    ) -> None:
        self.settings = settings
        self.checkpoint_dir = checkpoint_dir
        self.schedule = schedule or checkpoints.Schedule(None, None)
        self.rollouts = rollouts
        self.options = options
        self.reward = reward
        self.prompts = list(prompts)
        self.out = Path(out)
        self.policy_name = policy
        self.reference_name = reference
        policy_folder = _check_folder(policy, "policy")
        reference_folder = _check_folder(reference, "reference")

        self.accelerator: Any = _make_accelerator(options.device)
        self.device: torch.device = self.accelerator.device
        self.tokenizer = _load_tokenizer(policy_folder)
        policy_model = _load_lm(policy_folder, "policy")
        ref_model = _load_lm(reference_folder, "reference")
        if (
            policy_model.get_output_embeddings().weight.shape[0]
            != (ref_model.get_output_embeddings().weight.shape[0])
        ):
            raise PluginError(
                f"{_WHO}: the policy ({policy_folder}) and the reference ({reference_folder}) "
                "have different vocabularies"
            )
        policy_model.to(self.device)
        self.ref = ref_model.to(self.device).eval()
        self.ref.requires_grad_(False)
        wrapped = _PolicyWithValue(policy_model).eval()  # no dropout: see _disable_dropout
        optimizer = torch.optim.AdamW(
            wrapped.parameters(),
            lr=settings.learning_rate,
            eps=1e-8,
            weight_decay=0.0,
            fused=self.device.type in ("cpu", "cuda"),  # one kernel for all parameters
        )
        self.model, self.optimizer = self.accelerator.prepare(wrapped, optimizer)

        self.eos_ids = self._eos_ids(policy_model)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        self.pad_id = int(pad)
        self.encoded = self._encode_prompts()
        self.kl = KLController(
            settings.kl_coef,
            adaptive=settings.adaptive_kl,
            target=settings.target_kl,
            horizon=options.kl_horizon,
        )
        self.rank = int(self.accelerator.process_index)
        self.world = int(self.accelerator.num_processes)
        self.stream = _prompt_stream(len(self.prompts), options.seed)
        self.history: list[dict[str, float]] = []
        if rollouts is not None and self.world > 1:
            raise CaikitError(
                f"{_WHO}: rollouts from a generator run in one process; this run has {self.world}"
            )
        #: where the updated policy is saved for the rollout generator to load
        self.push_dir = tempfile.TemporaryDirectory(prefix="caikit-ppo-push-")

    # setup helpers --------------------------------------------------------------------
    def _eos_ids(self, model: Any) -> list[int]:
        ids: set[int] = set()
        for value in (
            self.tokenizer.eos_token_id,
            getattr(model.generation_config, "eos_token_id", None),
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return sorted(ids)

    def _context_length(self) -> int | None:
        config = self._policy().config.get_text_config()
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _encode_prompts(self) -> list[list[int]]:
        limit = self._context_length()
        budget = None if limit is None else limit - self.settings.max_new_tokens
        if budget is not None and budget < 1:
            raise CaikitError(
                f"{_WHO}: max_new_tokens = {self.settings.max_new_tokens} leaves no room for a "
                f"prompt in the model's context of {limit} tokens"
            )
        encoded: list[list[int]] = []
        cut = 0
        for i, conv in enumerate(self.prompts):
            if not conv:
                raise CaikitError(f"{_WHO}: prompt {i} has no messages")
            text = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in conv],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])
            if budget is not None and len(ids) > budget:
                ids = ids[-budget:]
                cut += 1
            encoded.append(ids)
        if cut:
            log.warning(
                "ppo: left-truncated %d of %d prompts to fit the context with max_new_tokens = %d",
                cut,
                len(encoded),
                self.settings.max_new_tokens,
            )
        return encoded

    def _policy(self) -> Any:
        return self.accelerator.unwrap_model(self.model).policy

    # the loop ---------------------------------------------------------------------------
    def run(self, on_step: Callable[[dict[str, float]], None] | None) -> list[dict[str, float]]:
        for step in range(self._resume(), self.settings.steps):
            metrics = self.step(step)
            self.history.append(metrics)
            log.info(
                "ppo: step %d/%d, score %.4f, kl %.4f, beta %.4g, policy loss %.4f",
                step + 1,
                self.settings.steps,
                metrics["objective/scores"],
                metrics["objective/kl"],
                metrics["beta"],
                metrics["loss/policy"],
            )
            if on_step is not None:
                on_step(metrics)
            done = step + 1
            due = self.checkpoint_dir is not None and done < self.settings.steps
            if due and self.schedule.due(done):
                self.checkpoint(done)
        self.save(stopped=None)
        return self.history

    # resumable checkpoints ----------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        """What a checkpoint must agree with to be resumed from."""
        return {
            "fit": "ppo",
            "policy": self.policy_name,
            "reference": self.reference_name,
            "settings": {**attrs.asdict(self.settings), **asdict(self.options)},
            "processes": self.world,
            "prompts": len(self.prompts),
        }

    def checkpoint(self, done: int) -> None:
        """Save everything a resumed run needs after ``done`` steps into
        ``checkpoint_dir`` (see :mod:`caikit_torch.checkpoints`): the policy and value
        head, AdamW's state, the KL coefficient, the prompts drawn so far, the metrics
        and responses of every step. Nothing else is random: each step's sampling and
        mini-batch order come from generators seeded by ``(seed, step, rank)``."""
        assert self.checkpoint_dir is not None
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:

            def fill(folder: Path) -> None:
                model = self.accelerator.unwrap_model(self.model)
                checkpoints.save_state(folder, "model", model.state_dict())
                checkpoints.save_state(folder, "optimizer", self.optimizer.state_dict())
                trainer = {
                    "kl_coef": self.kl.value,
                    "prompts_drawn": done * self.settings.rollout_batch_size * self.world,
                    "history": self.history,
                }
                checkpoints.save_state(folder, "trainer", trainer)
                responses = self.out / ROLLOUTS_FILE
                if responses.is_file():
                    shutil.copyfile(responses, folder / "rollouts.json")

            path = checkpoints.write(self.checkpoint_dir, done, fill, self._record())
            log.info("ppo: checkpoint after step %d saved to %s", done, path)
        self.accelerator.wait_for_everyone()
        self.schedule.saved()

    def _resume(self) -> int:
        """Load the newest checkpoint in ``checkpoint_dir``; returns the step to start at
        (0 without one)."""
        folder = checkpoints.latest(self.checkpoint_dir)
        if folder is None:
            return 0
        marker = json.loads((folder / checkpoints.MARKER).read_text(encoding="utf-8"))
        done = int(marker.pop("step"))
        if marker != json.loads(json.dumps(self._record())):
            raise CaikitError(
                f"{_WHO}: checkpoint {folder} was saved by a run with other settings or "
                "processes; remove it to start again"
            )
        model = self.accelerator.unwrap_model(self.model)
        model.load_state_dict(checkpoints.load_state(folder, "model"))
        self.optimizer.load_state_dict(checkpoints.load_state(folder, "optimizer"))
        trainer = checkpoints.load_state(folder, "trainer")
        self.kl.value = float(trainer["kl_coef"])
        self.history = [dict(row) for row in trainer["history"]]
        for _ in range(int(trainer["prompts_drawn"])):
            next(self.stream)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            responses = folder / "rollouts.json"
            if responses.is_file():
                shutil.copyfile(responses, self.out / ROLLOUTS_FILE)
        if self.rollouts is not None:
            self._push()
        log.info("ppo: resumed from %s after step %d of %d", folder, done, self.settings.steps)
        return done

    def step(self, step: int) -> dict[str, float]:
        """One rollout and its update; returns the step's metrics."""
        s = self.settings
        beta = self.kl.value
        started = time.perf_counter()
        indices = self._next_prompts()
        rows = [self.encoded[i] for i in indices]
        prompt_ids, prompt_mask = self._left_pad(rows)
        if self.rollouts is not None:
            responses = self._rollout(rows, step)
        else:
            with _seeded(_mix(self.options.seed, 2, step, self.rank), self.device):
                responses = self._generate(prompt_ids, prompt_mask)
        generated = time.perf_counter()

        rollout = self._score(indices, prompt_ids, prompt_mask, responses)
        self._write_rollouts(step, indices, rollout.texts)
        mask_f = rollout.mask.to(torch.float32)
        kl_tokens = (rollout.logprobs - rollout.ref_logprobs) * mask_f
        non_score = -beta * kl_tokens
        rewards = non_score.clone()
        last = rollout.mask.sum(1) - 1
        rows_idx = torch.arange(rewards.shape[0], device=rewards.device)
        rewards[rows_idx, last] += rollout.scores
        if self.options.whiten_rewards:
            rewards = masked_whiten(rewards, rollout.mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, s.gamma, s.lam, mask=mask_f)
        advantages = masked_whiten(advantages, rollout.mask)
        kl_sum = kl_tokens.sum(1)
        rollout_stats = torch.stack(
            [
                kl_sum.mean(),
                (-rollout.logprobs * mask_f).sum(1).mean(),
                non_score.sum(1).mean(),
                rollout.scores.mean(),
                mask_f.sum(1).mean(),
            ]
        )
        rollout_stats = self._reduce(rollout_stats)
        mean_kl = float(rollout_stats[0])
        scored = time.perf_counter()

        if s.kl_bound is not None and mean_kl > s.kl_bound:
            message = (
                f"{_WHO}: stopped at step {step}: mean KL to the reference {mean_kl:.6g} exceeds "
                f"kl_bound = {s.kl_bound:g}; the policy before this step's update is saved to "
                f"{self.out}"
            )
            self.save(stopped=message)
            raise TrainingStopped(message, checkpoint=str(self.out))

        train_stats = self._update(step, rollout, advantages, returns)
        trained = time.perf_counter()
        push_seconds = 0.0
        if self.rollouts is not None and step + 1 < s.steps:
            self._push()
            push_seconds = time.perf_counter() - trained

        metrics: dict[str, float] = {
            "step": float(step),
            "objective/kl": mean_kl,
            "objective/entropy": float(rollout_stats[1]),
            "objective/non_score_reward": float(rollout_stats[2]),
            "objective/scores": float(rollout_stats[3]),
            "objective/rlhf_reward": float(rollout_stats[3] + rollout_stats[2]),
            "val/response_length": float(rollout_stats[4]),
            "beta": beta,
            **train_stats,
            "time/generate": generated - started,
            "time/score": scored - generated,
            "time/train": trained - scored,
            "time/push": push_seconds,
        }
        self.kl.update(mean_kl, s.rollout_batch_size * self.world)
        return metrics

    def _next_prompts(self) -> list[int]:
        size = self.settings.rollout_batch_size
        batch = [next(self.stream) for _ in range(size * self.world)]
        return batch[self.rank * size : (self.rank + 1) * size]

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """Sample one response per row: ``[batch, R]``, ``R <= max_new_tokens``.

        The model's own generation defaults (top-k, repetition penalty, ...) are set
        aside for the call, so tokens are drawn from exactly ``softmax(logits / T)``.
        """
        s = self.settings
        policy = self._policy()
        saved = policy.generation_config
        generation_config: Any = transformers.GenerationConfig
        policy.generation_config = generation_config(
            bos_token_id=getattr(saved, "bos_token_id", None),
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        try:
            out = policy.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                do_sample=True,
                temperature=s.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=s.max_new_tokens,
                eos_token_id=self.eos_ids or None,
                pad_token_id=self.pad_id,
                use_cache=True,
            )
        finally:
            policy.generation_config = saved
        responses: torch.Tensor = out[:, prompt_ids.shape[1] :]
        return responses

    def _rollout(self, rows: list[list[int]], step: int) -> torch.Tensor:
        """Sample one response per prompt from the rollout generator: ``[batch, R]``,
        right-padded with the pad token (``_score`` masks after the first EOS)."""
        assert self.rollouts is not None
        s = self.settings
        requests = [
            RolloutRequest(
                id=f"{step}:{i}",
                prompt_ids=tuple(row),
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                seed=_mix(self.options.seed, 2, step, self.rank, i),
                stop_token_ids=tuple(self.eos_ids),
            )
            for i, row in enumerate(rows)
        ]
        sampled = [r.token_ids[0] for r in self.rollouts.rollout(requests)]
        width = max(1, max(len(t) for t in sampled))
        out = torch.full((len(sampled), width), self.pad_id, dtype=torch.long)
        for i, tokens in enumerate(sampled):
            out[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out.to(self.device)

    def _write_rollouts(self, step: int, indices: list[int], texts: list[str]) -> None:
        """Append this step's responses to :data:`ROLLOUTS_FILE` (a new run starts it)."""
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"step": step, "prompt": self.prompts[i][-1].content, "response": text})
            for i, text in zip(indices, texts, strict=True)
        ]
        with (self.out / ROLLOUTS_FILE).open("w" if step == 0 else "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))

    def _push(self) -> None:
        """Save the updated policy's weights and load them into the rollout generator."""
        assert self.rollouts is not None
        folder = Path(self.push_dir.name)
        self._policy().save_pretrained(folder, safe_serialization=True)
        self.rollouts.load_weights(folder)

    @torch.no_grad()
    def _score(
        self,
        indices: list[int],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        responses: torch.Tensor,
    ) -> _Rollout:
        s = self.settings
        batch, width = responses.shape
        if self.eos_ids:
            is_eos = torch.isin(responses, torch.tensor(self.eos_ids, device=responses.device))
        else:
            is_eos = torch.zeros_like(responses, dtype=torch.bool)
        positions = torch.arange(width, device=responses.device).expand(batch, width)
        first_eos = torch.where(is_eos, positions, torch.full_like(positions, width)).min(1).values
        lengths = torch.clamp(first_eos + 1, max=width)
        mask = positions < lengths.unsqueeze(1)
        responses = torch.where(mask, responses, torch.full_like(responses, self.pad_id))
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)

        texts = [
            self.tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
            for row, n in zip(responses.cpu(), first_eos.clamp(max=width).cpu(), strict=True)
        ]
        convs = [self.prompts[i] for i in indices]
        scores = self._rewards(convs, texts)

        keep = width + 1
        logprobs, ref_logprobs, values = [], [], []
        # Without gradients nothing is kept for a backward pass, so twice a training
        # mini-batch's rows fit in about the memory one training mini-batch needs.
        chunk = 2 * s.mini_batch_size
        for start in range(0, batch, chunk):
            sl = slice(start, start + chunk)
            logits, value = self.model(input_ids[sl], attention_mask[sl], position_ids[sl], keep)
            logprobs.append(_token_logprobs(logits[:, :-1], responses[sl], s.temperature))
            values.append(value[:, :-1].float())
            ref_out = _lm_forward(
                self.ref, input_ids[sl], attention_mask[sl], position_ids[sl], keep
            )
            ref_logits = ref_out.logits[:, -keep:-1, :]
            ref_logprobs.append(_token_logprobs(ref_logits, responses[sl], s.temperature))
        mask_f = mask.to(torch.float32)
        return _Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            responses=responses,
            mask=mask,
            logprobs=torch.cat(logprobs) * mask_f,
            ref_logprobs=torch.cat(ref_logprobs) * mask_f,
            values=torch.cat(values) * mask_f,
            scores=torch.tensor(scores, dtype=torch.float32, device=self.device),
            texts=texts,
        )

    def _rewards(self, convs: list[Conversation], texts: list[str]) -> list[float]:
        raw = self.reward(convs, texts)
        scores = [float(x) for x in raw]
        if len(scores) != len(texts):
            raise CaikitError(
                f"{_WHO}: the reward function returned {len(scores)} scores for "
                f"{len(texts)} responses"
            )
        bad = [i for i, x in enumerate(scores) if not math.isfinite(x)]
        if bad:
            raise CaikitError(
                f"{_WHO}: the reward function returned non-finite scores "
                f"({', '.join(repr(scores[i]) for i in bad[:3])}) for responses {bad[:3]}"
            )
        return scores

    def _update(
        self,
        step: int,
        rollout: _Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> dict[str, float]:
        s = self.settings
        batch, width = rollout.responses.shape
        keep = width + 1
        generator = torch.Generator().manual_seed(_mix(self.options.seed, 3, step, self.rank))
        totals = torch.zeros(7, dtype=torch.float64)
        count = 0
        for epoch in range(s.epochs):
            order = torch.randperm(batch, generator=generator).to(self.device)
            for mb, start in enumerate(range(0, batch, s.mini_batch_size)):
                idx = order[start : start + s.mini_batch_size]
                mask = rollout.mask[idx]
                mask_f = mask.to(torch.float32)
                logits, values = self.model(
                    rollout.input_ids[idx],
                    rollout.attention_mask[idx],
                    rollout.position_ids[idx],
                    keep,
                )
                logprobs = _token_logprobs(logits[:, :-1], rollout.responses[idx], s.temperature)
                values = values[:, :-1].float()
                old_logprobs = rollout.logprobs[idx]
                pg_loss, pg_clipfrac = clipped_policy_loss(
                    logprobs, old_logprobs, advantages[idx], mask, s.cliprange
                )
                vf_loss, vf_clipfrac = clipped_value_loss(
                    values, rollout.values[idx], returns[idx], mask, self.options.cliprange_value
                )
                loss = pg_loss + s.vf_coef * vf_loss
                self._check_finite(loss, step, epoch, mb)
                self.accelerator.backward(loss)
                self.accelerator.clip_grad_norm_(
                    self.model.parameters(), self.options.max_grad_norm
                )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    diff = (logprobs - old_logprobs) * mask_f
                    totals += (
                        torch.stack(
                            [
                                pg_clipfrac,
                                0.5 * _masked_mean(diff**2, mask_f),
                                _masked_mean(torch.exp(diff), mask_f),
                                pg_loss,
                                vf_loss,
                                vf_clipfrac,
                                loss,
                            ]
                        )
                        .detach()
                        .to("cpu", torch.float64)
                    )
                count += 1
        means = self._reduce((totals / max(count, 1)).to(self.device, torch.float32))
        names = (
            "policy/clipfrac",
            "policy/approxkl",
            "val/ratio",
            "loss/policy",
            "loss/value",
            "val/clipfrac",
            "loss/total",
        )
        return {name: float(v) for name, v in zip(names, means.tolist(), strict=True)}

    def _check_finite(self, loss: torch.Tensor, step: int, epoch: int, mb: int) -> None:
        bad = torch.logical_not(torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
        if self.world > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad.item()) > 0:
            raise TrainingStopped(
                f"{_WHO}: non-finite loss ({float(loss.detach()):g} on this process) at step "
                f"{step}, PPO epoch {epoch}, mini-batch {mb}; the update was not applied",
                checkpoint=None,
            )

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over processes (the tensor itself in a single process), on the CPU."""
        if self.world > 1:
            values = self.accelerator.reduce(values.to(self.device), reduction="mean")
        return values.detach().to("cpu")

    def save(self, stopped: str | None) -> None:
        """Save the policy (no value head), its tokenizer and :data:`PPO_RECORD` to ``out``."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            policy = self._policy()
            policy.save_pretrained(self.out)
            self.tokenizer.save_pretrained(self.out)
            record = {
                "policy": self.policy_name,
                "reference": self.reference_name,
                "settings": {**attrs.asdict(self.settings), **asdict(self.options)},
                "steps_completed": len(self.history),
                "stopped": stopped,
                "processes": self.world,
                "metrics": self.history,
            }
            (self.out / PPO_RECORD).write_text(json.dumps(record, indent=2) + "\n", "utf-8")
        self.accelerator.wait_for_everyone()


def train_ppo(
    policy: str,
    reference: str,
    reward: RewardFn,
    prompts: Sequence[Conversation],
    settings: PPOSettings,
    out: Path,
    *,
    options: PPOOptions | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    rollouts: RolloutGenerator | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_every_steps: int | None = None,
    checkpoint_every_minutes: float | None = None,
) -> list[dict[str, float]]:
    """Train ``policy`` with PPO against ``reward``, penalised by KL to ``reference``.

    :param policy: a local Hugging Face causal-LM checkpoint folder with a chat
        template; the starting policy (and the value head's trunk).
    :param reference: a local checkpoint folder with the same vocabulary; frozen.
    :param reward: scores ``(prompts' messages, response texts)`` to one finite float
        per response (e.g. a preference model's score of the response).
    :param prompts: conversations ending with a user turn; sampled in seeded,
        shuffled passes, ``settings.rollout_batch_size`` per step and process.
    :param settings: ``[policy_optimiser.ppo]``
        (:class:`~caikit_core.training.settings.PPOSettings`, validated when built).
    :param options: the seed, the device and the fixed internals (:class:`PPOOptions`).
    :param out: the folder to save the trained policy in (created if missing): a
        plain Hugging Face checkpoint (safetensors), its tokenizer, and
        :data:`PPO_RECORD` (the settings and the metrics of every step).
    :param on_step: called after each step with its metrics (see :data:`METRIC_KEYS`),
        in every process.
    :param rollouts: a generator loaded with ``policy`` to sample the responses
        (``rl.rollouts = "generator"``); the updated policy is saved and loaded into
        it after every step but the last. ``None``: the policy's own ``generate``.
    :param checkpoint_dir: where to save resumable checkpoints (see
        :mod:`caikit_torch.checkpoints`) and to resume from the newest one there;
        ``None``: none. On CPU a resumed run's metrics (but ``time/*``) and final
        weights equal an uninterrupted run's exactly.
    :param checkpoint_every_steps: save after every this many steps.
    :param checkpoint_every_minutes: save after the first step ending this many minutes
        after the last save.
    :returns: every step's metrics, in order (:data:`METRIC_KEYS`, all finite); a
        resumed run's include those before the checkpoint.
    :raises CaikitError: invalid options, no prompts, a reward function that
        returns the wrong number of scores or non-finite ones, or a checkpoint saved
        with other settings.
    :raises PluginError: a checkpoint folder that cannot be loaded.
    :raises TrainingStopped: a non-finite loss (no checkpoint), or a rollout KL above
        ``settings.kl_bound`` (the policy is saved to ``out`` first).
    """
    options = options or PPOOptions()
    problems = options.problems()
    if problems:
        raise CaikitError(f"{_WHO}: invalid settings: " + "; ".join(problems))
    if not prompts:
        raise CaikitError(f"{_WHO}: no prompts to train on")
    schedule = checkpoints.Schedule(checkpoint_every_steps, checkpoint_every_minutes)
    trainer = _Trainer(
        policy,
        reference,
        reward,
        prompts,
        settings,
        options,
        Path(out),
        rollouts,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        schedule=schedule,
    )
    try:
        return trainer.run(on_step)
    finally:
        trainer.push_dir.cleanup()


def optimise_ppo(
    run: RLRun,
    reward: PreferenceModel,
    prompts: Sequence[Prompt],
    checkpoint_dir: Path | None = None,
) -> dict[str, float]:
    """RL-CAI with ``algorithm = "ppo"``: :func:`train_ppo` against the preference model's
    score, with ``[policy_optimiser.ppo]``'s settings; returns the metrics."""
    cfg = run.cfg
    table = cfg.ppo
    if cfg.lora:
        log.warning("ppo: lora = true does not apply to PPO, which trains all weights")
    kept, too_long = run.fitting_prompts(prompts, table.max_length, table.max_new_tokens)
    ids = {p.messages: p.id for p in kept}

    def score(conversations: Sequence[Conversation], texts: Sequence[str]) -> list[float]:
        samples = []
        for messages, text in zip(conversations, texts, strict=True):
            pid = ids.get(messages) or stable_id("prompt", chat_turns(messages))
            samples.append(Sample(stable_id("rl-sample", pid, text), pid, messages, text))
        return score_samples(reward, samples)

    def on_step(metrics: dict[str, float]) -> None:
        run.history.append(dict(metrics))  # train_ppo logs each step itself

    history = train_ppo(
        str(run.policy),
        str(run.reference),
        score,
        [p.messages for p in kept],
        table,
        run.out,
        options=PPOOptions(seed=cfg.seed, device=run.device),
        on_step=on_step,
        rollouts=run.rollouts,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_steps=cfg.checkpoint_every_steps,
        checkpoint_every_minutes=cfg.checkpoint_every_minutes,
    )
    run.history = [dict(h) for h in history]
    first, last = history[0], history[-1]
    return {
        "reward_first": float(first["objective/scores"]),
        "reward_last": float(last["objective/scores"]),
        "rlhf_reward_last": float(last["objective/rlhf_reward"]),
        "kl_last": float(last["objective/kl"]),
        "beta_last": float(last["beta"]),
        "steps": float(len(history)),
        "prompts": float(len(kept)),
        "too_long": float(too_long),
    }
