"""The ``hf`` generator's implementation: a transformers causal LM with its own decode loop.

Generation runs a KV-cached decode loop over a left-padded batch. Sampling is
reproducible per request, whatever batch the request lands in: each sequence
``(request, sample)`` draws its random numbers in advance from its own
``torch.Generator``, seeded from ``(request.seed, sample index)``, and picks each
token by inverting its own (temperature-scaled, nucleus-truncated) CDF at its
own uniform number for that step. Nothing a row computes depends on the other
rows, except through the model's floating-point arithmetic on a padded batch.

Scoring runs one forward pass per micro-batch over left-padded
``context + continuation`` token ids, where the context (chat template, assistant
turn opened, ``response_prefix``) and the continuation are tokenised separately,
so the boundary between them is exact. With ``prefix_reuse`` (the default) two
shortcuts give the same results with less work:

* **Shared prefixes.** The rows' contexts are sorted and split into groups that
  share a long token prefix (instructions and few-shot examples, say); a small
  dynamic programme picks the groups that save the most tokens. All group
  prefixes are encoded once, in one left-padded forward pass with the KV cache
  on, and each micro-batch then runs only its rows' suffixes (the rest of the
  context and the continuation), attending to their group's cached prefix. The
  layout of a row is ``[pads][prefix] [pads][suffix]``: the attention mask covers
  the prefix and the suffix and nothing else, and explicit position ids continue
  the prefix's positions, so every real token sees exactly the tokens and
  positions it sees without the cache.
* **Single tokens.** A request whose continuations are all single tokens (the
  option letters of a multiple-choice question) is scored from one row: the
  next-token distribution after its context gives every continuation at once.

This module imports torch at import time; :mod:`caikit_hf.plugin` imports it only
when the factory runs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from caikit_core.errors import PluginError
from caikit_core.interfaces import CAN_SCORE, ROLLOUTS, SEEDED
from caikit_core.models import local_checkpoint
from caikit_core.records import (
    Conversation,
    Generation,
    GenerationRequest,
    Rollout,
    RolloutRequest,
    Score,
    ScoreRequest,
    chat_messages,
)
from caikit_hf.config import HFGeneratorConfig

__all__ = [
    "FINISH_EOS",
    "FINISH_LENGTH",
    "FINISH_SKIPPED",
    "FINISH_STOP",
    "HFGenerator",
    "plan_shared_prefixes",
]

logger = logging.getLogger("caikit.hf")

#: The completion hit a stop string; the text is cut before it.
FINISH_STOP = "stop"
#: The completion reached ``max_new_tokens``.
FINISH_LENGTH = "length"
#: The model emitted an end-of-sequence token.
FINISH_EOS = "eos"
#: The prompt did not fit in the context and the truncation policy is ``"skip"``.
FINISH_SKIPPED = "skipped"

#: The shortest token prefix worth encoding once for several score rows.
_MIN_SHARED_PREFIX = 16
#: What a shared-prefix group costs, in tokens encoded: its share of the extra forward
#: pass and the copies of its KV cache. A group must save more than this.
_GROUP_COST = 128
#: How far back (in sorted rows) a shared-prefix group may reach; bounds the planning work.
_MAX_GROUP_SPAN = 512
#: Attention implementations known to honour a 2-D mask with holes next to a KV cache.
_PREFIX_ATTENTION = ("sdpa", "eager")


def _row_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed derived from a request's seed and a sample index."""
    digest = hashlib.sha256(f"caikit-hf:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Row:
    """One sequence to generate: sample ``sample`` of request ``request``."""

    request: int
    sample: int
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    stops: tuple[str, ...]
    seed: int
    tokens: list[int] = field(default_factory=list)
    finish: str = ""


@dataclass
class _ScoreRow:
    """One sequence to score.

    With ``index >= 0`` the row scores continuation ``index`` of request
    ``request`` (``continuation``, summed over its tokens). With ``index == -1``
    the row holds only the context, and ``reads`` lists ``(continuation index,
    token id)`` pairs read from the next-token distribution after it.
    ``group`` is the shared prefix whose KV cache stands for the first ``shared``
    context tokens (``-1`` and ``0``: none).
    """

    request: int
    index: int
    context: list[int]
    continuation: list[int]
    reads: list[tuple[int, int]] = field(default_factory=list)
    group: int = -1
    shared: int = 0


@dataclass
class _Prefixes:
    """Encoded shared prefixes, left-padded to one width.

    ``keys[layer]`` and ``values[layer]`` are ``[groups, kv_heads, width, head_dim]``;
    ``mask`` is ``[groups, width]``; ``lengths[g]`` is group ``g``'s prefix length.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: list[int]

    def select(self, groups: list[int]) -> tuple[Any, torch.Tensor]:
        """A KV cache and attention mask for rows of the given groups (``-1``: none).

        The width is cut to the longest selected prefix (the padding is on the
        left); a row without a group gets an all-zero prefix mask.
        """
        from transformers import DynamicCache

        width = max(self.lengths[g] for g in groups if g >= 0)
        index = torch.tensor([max(g, 0) for g in groups], device=self.mask.device)
        mask = self.mask[index, -width:].clone()
        mask[torch.tensor([g < 0 for g in groups], device=mask.device)] = 0
        data = [
            (keys[index, :, -width:, :], values[index, :, -width:, :])
            for keys, values in zip(self.keys, self.values, strict=True)
        ]
        return DynamicCache(ddp_cache_data=data), mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of two token lists (binary search)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_shared_prefixes(contexts: Sequence[list[int]]) -> list[tuple[list[int], int]]:
    """Groups of contexts worth encoding a shared prefix for, as ``(members, length)``.

    The contexts are sorted, so that contexts sharing a prefix are neighbours;
    a group is a run of neighbours and its prefix the shortest common prefix of
    its neighbouring pairs, at least :data:`_MIN_SHARED_PREFIX` tokens and never
    a whole context (each row keeps its last context token, whose logits it
    needs). Dynamic programming picks the runs that save the most tokens,
    ``sum((len(members) - 1) * length - _GROUP_COST)``; a run that saves no more
    than :data:`_GROUP_COST` is not worth a group. Contexts in no group are left out.
    """
    n = len(contexts)
    if n < 2:
        return []
    order = sorted(range(n), key=lambda j: contexts[j])
    caps = [len(contexts[j]) - 1 for j in order]
    shared = [0] * n  # shared[a]: usable common prefix of sorted neighbours a-1 and a
    for a in range(1, n):
        common = _common_prefix(contexts[order[a - 1]], contexts[order[a]])
        shared[a] = min(common, caps[a - 1], caps[a])
    best = [0] * (n + 1)  # best[b]: the most tokens saved over the first b sorted rows
    start = list(range(-1, n))  # start[b]: where the last group of that best split starts
    length = [0] * (n + 1)  # length[b]: that group's prefix length (0: a lone row)
    for b in range(1, n + 1):
        best[b] = best[b - 1]
        low = len(contexts[order[b - 1]])  # no group prefix is longer than a context
        for a in range(b - 1, max(0, b - 1 - _MAX_GROUP_SPAN), -1):
            low = min(low, shared[a])
            if low < _MIN_SHARED_PREFIX:
                break
            value = best[a - 1] + (b - a) * low - _GROUP_COST
            if value > best[b]:
                best[b], start[b], length[b] = value, a - 1, low
    groups: list[tuple[list[int], int]] = []
    b = n
    while b > 0:
        a = start[b]
        if length[b]:
            groups.append(([order[j] for j in range(a, b)], length[b]))
        b = a
    groups.reverse()
    return groups


class HFGenerator:
    """A transformers causal LM behind the :class:`caikit_core.interfaces.Generator` role.

    :param config: the plugin settings.
    :param model: a local checkpoint folder, or a hub id.
    :raises PluginError: the folder does not exist, has no tokenizer, or transformers
        cannot load the tokenizer or the model from it.
    """

    capabilities: frozenset[str] = frozenset({CAN_SCORE, ROLLOUTS, SEEDED})

    def __init__(self, config: HFGeneratorConfig, *, model: str) -> None:
        import transformers

        self.config = config
        self.model_name = model
        self.device = self._resolve_device(config.device)
        self.dtype = self._resolve_dtype(config.dtype, self.device)

        folder = local_checkpoint(model, "hf generator", allow_pickle=config.allow_pickle)
        source = model if folder is None else str(folder)
        if config.trust_remote_code:
            logger.warning(
                "hf generator: trust_remote_code = true: transformers may run code shipped with %s",
                model,
            )

        common: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        if config.revision is not None:
            common["revision"] = config.revision
        if config.local_files_only:
            common["local_files_only"] = True

        try:
            self.tokenizer: Any = cast(
                Any, transformers.AutoTokenizer.from_pretrained(source, **common)
            )
        except Exception as exc:
            raise PluginError(f"hf generator: cannot load a tokenizer from {model}: {exc}") from exc
        model_kwargs: dict[str, Any] = dict(common, dtype=self.dtype)
        if not config.allow_pickle:
            model_kwargs["use_safetensors"] = True
        if config.attn_implementation is not None:
            model_kwargs["attn_implementation"] = config.attn_implementation
        try:
            self.model: Any = cast(
                Any, transformers.AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
            )
        except Exception as exc:
            raise PluginError(f"hf generator: cannot load a model from {model}: {exc}") from exc
        self.model.to(self.device)
        self.model.eval()

        if config.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise PluginError(
                f"hf generator: the tokenizer of {model} has no chat template; "
                "set chat_template in the generator's config"
            )

        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._has_position_ids = "position_ids" in params
        # Set when the model's cache turns out not to be reusable (see _encode_prefixes).
        self._prefix_cache_unusable = False

        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = min(self.eos_ids) if self.eos_ids else 0
        self.pad_id: int = int(pad)
        self.context_length = self._context_length()

    # --- setup ------------------------------------------------------------------------

    @staticmethod
    def _resolve_device(name: str) -> torch.device:
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise PluginError(f"hf generator: device {name!r} requested but CUDA is not available")
        return torch.device(name)

    @staticmethod
    def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
        if name == "auto":
            if device.type != "cuda":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        return dtypes[name]

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        candidates: list[Any] = [self.tokenizer.eos_token_id]
        generation_config = getattr(self.model, "generation_config", None)
        if generation_config is not None:
            candidates.append(getattr(generation_config, "eos_token_id", None))
        for value in candidates:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    def _context_length(self) -> int | None:
        if self.config.max_context is not None:
            return self.config.max_context
        model_config = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(model_config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        value = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(value, int) and 0 < value < 10_000_000:
            return value
        return None

    # --- shared helpers --------------------------------------------------------------

    def _context_texts(self, conversations: Sequence[tuple[Conversation, str]]) -> list[str]:
        """Chat-formatted conversations with the assistant turn opened, plus the prefix."""
        texts = []
        for conv, prefix in conversations:
            rendered = self.tokenizer.apply_chat_template(
                chat_messages(conv),
                tokenize=False,
                add_generation_prompt=True,
                chat_template=self.config.chat_template,
            )
            texts.append(str(rendered) + prefix)
        return texts

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-padded ids and attention mask (on CPU), and the padded length."""
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
        return ids, mask, width

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        cache: Any = None,
        use_cache: bool,
        keep: int,
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass; returns the last ``keep`` positions' logits and the cache."""
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": use_cache,
        }
        if self._has_position_ids:
            kwargs["position_ids"] = position_ids
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        logits: torch.Tensor = out.logits[:, -keep:, :]
        # Reading the other name of the cache makes transformers warn that it is deprecated.
        name = "cache" if self._cache_kwarg == "cache" else "past_key_values"
        new_cache = getattr(out, name, None)
        return logits, new_cache

    # --- generation ------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """``n`` completions per request, in request order and sample order.

        Completions continue ``response_prefix`` (which they do not repeat). Each
        text is cut at its first stop string (finish reason ``"stop"``); otherwise
        the finish reason is ``"eos"`` or ``"length"``. A prompt too long for the
        context is handled by :attr:`HFGeneratorConfig.truncation`.

        :raises PluginError: a request with invalid sampling settings.
        """
        if not requests:
            return []
        for req in requests:
            self._check_request(req)
            self._check_fits_context(req)

        texts = self._context_texts([(r.messages, r.response_prefix) for r in requests])
        prompts = self._encode(texts)
        warnings: list[list[str]] = [[] for _ in requests]
        skipped: list[str | None] = [None] * len(requests)
        rows: list[_Row] = []
        for i, (req, prompt) in enumerate(zip(requests, prompts, strict=True)):
            prompt, reason = self._fit_prompt(req, prompt, warnings[i])
            if reason is not None:
                skipped[i] = reason
                continue
            stops = tuple(s for s in req.sampling.stop if s)
            for k in range(req.n):
                rows.append(
                    _Row(
                        request=i,
                        sample=k,
                        prompt=prompt,
                        max_new=req.sampling.max_new_tokens,
                        temperature=float(req.sampling.temperature),
                        top_p=float(req.sampling.top_p),
                        stops=stops,
                        seed=_row_seed(req.seed, k),
                    )
                )

        # Similar lengths share a micro-batch, so little compute goes to padding.
        order = sorted(rows, key=lambda r: -len(r.prompt))
        size = self.config.max_batch_size
        with torch.inference_mode():
            for start in range(0, len(order), size):
                self._generate_rows(order[start : start + size])

        by_request: list[list[_Row]] = [[] for _ in requests]
        for row in rows:
            by_request[row.request].append(row)
        out = []
        for i, req in enumerate(requests):
            reason = skipped[i]
            if reason is not None:
                out.append(
                    Generation(
                        request_id=req.id,
                        texts=("",) * req.n,
                        finish_reasons=(FINISH_SKIPPED,) * req.n,
                        warnings=(*warnings[i], reason),
                    )
                )
                continue
            finished = [self._finish_text(row) for row in by_request[i]]
            out.append(
                Generation(
                    request_id=req.id,
                    texts=tuple(text for text, _ in finished),
                    finish_reasons=tuple(why for _, why in finished),
                    warnings=tuple(warnings[i]),
                )
            )
        return out

    def _check_fits_context(self, req: GenerationRequest) -> None:
        """Refuse a ``max_new_tokens`` that leaves no room for any prompt in the context:
        every response would be skipped, so it is a setting to fix, not a warning."""
        limit = self.context_length
        max_new = req.sampling.max_new_tokens
        if limit is not None and max_new >= limit:
            raise PluginError(
                f"hf generator: max_new_tokens={max_new} is at or above the context of "
                f"{self.model_name} ({limit} tokens), so no prompt fits and every response "
                "would be empty; lower max_new_tokens (sl.sampling, rl.sampling or the "
                "critic's settings) or raise the generator's max_context"
            )

    @staticmethod
    def _check_request(req: GenerationRequest) -> None:
        sampling = req.sampling
        problems = []
        if req.n < 0:
            problems.append(f"n must be >= 0, got {req.n}")
        if sampling.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {sampling.max_new_tokens}")
        if not sampling.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {sampling.top_p}")
        if problems:
            raise PluginError(f"hf generator: request {req.id!r}: " + "; ".join(problems))

    def _fit_prompt(
        self, req: GenerationRequest, prompt: list[int], warnings: list[str]
    ) -> tuple[list[int], str | None]:
        """Apply the truncation policy; returns the prompt and a skip reason (or ``None``)."""
        limit = self.context_length
        max_new = req.sampling.max_new_tokens
        if limit is None or len(prompt) + max_new <= limit:
            return prompt, None
        budget = limit - max_new
        if self.config.truncation == "skip" or budget < 1:
            return prompt, (
                f"skipped: prompt of {len(prompt)} tokens plus max_new_tokens={max_new} "
                f"exceeds the context of {limit} tokens"
            )
        warnings.append(
            f"prompt left-truncated from {len(prompt)} to {budget} tokens to fit the context "
            f"of {limit} tokens with max_new_tokens={max_new}"
        )
        return prompt[-budget:], None

    # --- rollouts (the ``rollouts`` capability) ----------------------------------------

    def rollout(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        """Token ids sampled from the unfiltered distribution (see ``RolloutRequest``),
        each continuation ending after its first stop token (kept) or at the limit.

        :raises PluginError: a prompt that does not fit the context with its
            ``max_new_tokens``, or invalid settings.
        """
        rows: list[_Row] = []
        for i, req in enumerate(requests):
            limit = self.context_length
            if req.max_new_tokens < 1 or req.temperature < 0 or req.n < 0 or not req.prompt_ids:
                raise PluginError(
                    f"hf generator: rollout {req.id!r}: needs a prompt, max_new_tokens >= 1, "
                    "temperature >= 0 and n >= 0"
                )
            if limit is not None and len(req.prompt_ids) + req.max_new_tokens > limit:
                raise PluginError(
                    f"hf generator: rollout {req.id!r}: a prompt of {len(req.prompt_ids)} tokens "
                    f"plus max_new_tokens={req.max_new_tokens} exceeds the context of {limit}"
                )
            rows.extend(
                _Row(
                    i,
                    k,
                    list(req.prompt_ids),
                    req.max_new_tokens,
                    float(req.temperature),
                    1.0,
                    (),
                    _row_seed(req.seed, k),
                )
                for k in range(req.n)
            )
        size = self.config.max_batch_size
        by_stops: dict[frozenset[int], list[_Row]] = {}
        for row in rows:
            stops = requests[row.request].stop_token_ids
            by_stops.setdefault(frozenset(stops) or self.eos_ids, []).append(row)
        with torch.inference_mode():
            for eos, group in by_stops.items():
                group.sort(key=lambda r: -len(r.prompt))
                for start in range(0, len(group), size):
                    self._generate_rows(group[start : start + size], eos=eos)
        tokens: list[list[tuple[int, ...]]] = [[] for _ in requests]
        for row in rows:  # in request and sample order
            tokens[row.request].append(tuple(row.tokens))
        return [Rollout(req.id, tuple(t)) for req, t in zip(requests, tokens, strict=True)]

    def load_weights(self, checkpoint: Path) -> None:
        """Replace the model's weights with the ``*.safetensors`` weights in ``checkpoint``.

        :raises PluginError: no weights there, or names or shapes that do not match.
        """
        from safetensors.torch import load_file

        files = sorted(Path(checkpoint).glob("*.safetensors"))
        if not files:
            raise PluginError(f"hf generator: no *.safetensors weights in {checkpoint}")
        weights: dict[str, torch.Tensor] = {}
        for file in files:
            weights.update(load_file(str(file)))
        tied = bool(getattr(self.model.config.get_text_config(), "tie_word_embeddings", False))
        try:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
        except RuntimeError as exc:  # a shape mismatch
            raise PluginError(
                f"hf generator: cannot load the weights in {checkpoint}: {exc}"
            ) from exc
        if tied:  # the output head is the input embedding, saved once
            missing = [k for k in missing if not k.startswith("lm_head.")]
        if missing or unexpected:
            raise PluginError(
                f"hf generator: the weights in {checkpoint} do not match the model "
                f"(missing: {missing[:5]}, unexpected: {list(unexpected)[:5]})"
            )
        if tied:
            self.model.tie_weights()

    def _generate_rows(self, rows: list[_Row], eos: frozenset[int] | None = None) -> None:
        """Generate every row of one micro-batch, filling ``tokens`` and ``finish``.

        ``eos``: the tokens that end a row (default: the model's end-of-sequence
        tokens, left out of ``tokens``); given, as for rollouts, they are kept."""
        steps = max(row.max_new for row in rows)
        for row in rows:
            if row.max_new == 0:
                row.finish = FINISH_LENGTH
        if steps == 0:
            return
        device = self.device
        batch = len(rows)
        ids, prompt_mask, width = self._left_pad([row.prompt for row in rows])
        mask = torch.ones((batch, width + steps), dtype=torch.long)
        mask[:, :width] = prompt_mask
        positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        picker = _TokenPicker(rows, steps, device)

        logits, cache = self._forward(ids, mask[:, :width], positions, use_cache=True, keep=1)
        next_positions = positions[:, -1:] + 1
        active = [i for i, row in enumerate(rows) if row.max_new > 0]
        keep_eos = eos is not None
        eos = self.eos_ids if eos is None else eos
        for step in range(steps):
            tokens = picker.pick(logits[:, -1, :], step)
            chosen = tokens.tolist()
            still = []
            for i in active:
                row = rows[i]
                token = chosen[i]
                if token in eos:
                    row.finish = FINISH_EOS
                    if keep_eos:
                        row.tokens.append(token)
                    continue
                row.tokens.append(token)
                if len(row.tokens) >= row.max_new:
                    row.finish = FINISH_LENGTH
                elif row.stops and self._hit_stop(row):
                    row.finish = FINISH_STOP
                else:
                    still.append(i)
            active = still
            if not active or step + 1 == steps:
                break
            logits, cache = self._forward(
                tokens[:, None],
                mask[:, : width + step + 1],
                next_positions,
                cache=cache,
                use_cache=True,
                keep=1,
            )
            next_positions = next_positions + 1

    def _hit_stop(self, row: _Row) -> bool:
        """Whether the newest token completes a stop string (checks a short tail)."""
        longest = max(len(s.encode("utf-8")) for s in row.stops)
        tail = self.tokenizer.decode(row.tokens[-(longest + 2) :], skip_special_tokens=True)
        return any(s in tail for s in row.stops)

    def _finish_text(self, row: _Row) -> tuple[str, str]:
        text: str = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cuts = [pos for pos in (text.find(s) for s in row.stops) if pos >= 0]
        if cuts:
            return text[: min(cuts)], FINISH_STOP
        return text, row.finish or FINISH_LENGTH

    # --- scoring ---------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """log P(continuation | chat-formatted messages + response_prefix) per continuation.

        Each log-probability is summed over the continuation's tokens;
        ``token_counts`` gives their number (an empty continuation scores 0.0 over
        0 tokens). One forward pass per micro-batch of rows, plus, with
        ``prefix_reuse``, one per micro-batch of shared prefixes (see the module
        docstring). A context too long for the model is truncated from the left.

        :raises PluginError: a continuation alone does not fit in the context.
        """
        if not requests:
            return []
        contexts = self._encode(
            self._context_texts([(r.messages, r.response_prefix) for r in requests])
        )
        rows: list[_ScoreRow] = []
        for i, (req, context) in enumerate(zip(requests, contexts, strict=True)):
            continuations = self._encode(list(req.continuations))
            singles = [(k, c[0]) for k, c in enumerate(continuations) if len(c) == 1]
            if self.config.prefix_reuse and singles and all(len(c) <= 1 for c in continuations):
                # Every continuation is one token (or none): one row reads them all.
                fitted = self._fit_context(req, context, continuations[singles[0][0]])
                rows.append(_ScoreRow(i, -1, fitted, [], reads=singles))
                continue
            for k, continuation in enumerate(continuations):
                fitted = self._fit_context(req, context, continuation)
                if continuation:
                    rows.append(_ScoreRow(i, k, fitted, continuation))

        logprobs = [[0.0] * len(r.continuations) for r in requests]
        counts = [[0] * len(r.continuations) for r in requests]
        size = self.config.max_batch_size
        with torch.inference_mode():
            prefixes = self._encode_prefixes(rows) if self._prefix_reuse_possible() else None
            rows.sort(key=lambda r: (-(len(r.context) + len(r.continuation) - r.shared), r.group))
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                for row, results in zip(chunk, self._score_rows(chunk, prefixes), strict=True):
                    for index, value, count in results:
                        logprobs[row.request][index] = value
                        counts[row.request][index] = count
        return [
            Score(request_id=req.id, logprobs=tuple(logprobs[i]), token_counts=tuple(counts[i]))
            for i, req in enumerate(requests)
        ]

    def _prefix_reuse_possible(self) -> bool:
        """Whether this model can run suffixes against a cached, padded prefix."""
        attention = getattr(self.model.config, "_attn_implementation", None)
        return (
            self.config.prefix_reuse
            and self._has_position_ids
            and attention in _PREFIX_ATTENTION
            and not self._prefix_cache_unusable
        )

    def _fit_context(
        self, req: ScoreRequest, context: list[int], continuation: list[int]
    ) -> list[int]:
        if not context:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise PluginError(
                    f"hf generator: request {req.id!r}: the scoring context is empty "
                    "and the tokenizer has no BOS token to condition on"
                )
            context = [int(bos)]
        limit = self.context_length
        if limit is None or len(context) + len(continuation) <= limit:
            return context
        budget = limit - len(continuation)
        if budget < 1:
            raise PluginError(
                f"hf generator: request {req.id!r}: a continuation of {len(continuation)} "
                f"tokens does not fit in the context of {limit} tokens"
            )
        logger.warning(
            "hf generator: request %r: scoring context left-truncated from %d to %d tokens",
            req.id,
            len(context),
            budget,
        )
        return context[-budget:]

    def _encode_prefixes(self, rows: list[_ScoreRow]) -> _Prefixes | None:
        """Encode the rows' shared prefixes (setting ``group`` and ``shared`` on them).

        Returns ``None``, changing no row, when no group is worth it or the model's
        cache is not a plain :class:`transformers.DynamicCache` of full-attention
        layers (sliding windows, linear attention, ...), which the suffixes could
        not continue exactly.
        """
        groups = plan_shared_prefixes([row.context for row in rows])
        if not groups:
            return None
        lengths = [length for _, length in groups]
        seqs = [rows[members[0]].context[:length] for members, length in groups]
        width = max(lengths)
        parts: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = []
        size = self.config.max_batch_size
        for start in range(0, len(seqs), size):
            ids, mask, chunk_width = self._left_pad(seqs[start : start + size])
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            _, cache = self._forward(
                ids.to(self.device),
                mask.to(self.device),
                positions.to(self.device),
                use_cache=True,
                keep=1,
            )
            layers = _plain_layers(cache)
            if layers is None:
                logger.info("hf generator: this model's KV cache cannot be reused for prefixes")
                self._prefix_cache_unusable = True
                return None
            pad = width - chunk_width
            parts.append(
                (
                    [F.pad(layer.keys, (0, 0, pad, 0)) for layer in layers],
                    [F.pad(layer.values, (0, 0, pad, 0)) for layer in layers],
                    F.pad(mask, (pad, 0)),
                )
            )
        keys = [torch.cat([part[0][i] for part in parts]) for i in range(len(parts[0][0]))]
        values = [torch.cat([part[1][i] for part in parts]) for i in range(len(parts[0][1]))]
        masks = torch.cat([part[2] for part in parts]).to(self.device)
        for g, (members, length) in enumerate(groups):
            for j in members:
                rows[j].group, rows[j].shared = g, length
        return _Prefixes(keys, values, masks, lengths)

    def _score_rows(
        self, rows: list[_ScoreRow], prefixes: _Prefixes | None
    ) -> list[list[tuple[int, float, int]]]:
        """``(continuation index, log-prob, tokens)`` per row of one micro-batch, in one pass.

        Rows are left-padded after their ``shared`` prefix tokens, which come from
        the prefix cache; their position ids continue the prefix's.
        """
        ids, mask, _ = self._left_pad([(r.context + r.continuation)[r.shared :] for r in rows])
        shared = torch.tensor([row.shared for row in rows], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_min(0) + shared[:, None]
        longest = max(len(row.continuation) for row in rows)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = None
        if prefixes is not None and any(row.group >= 0 for row in rows):
            cache, prefix_mask = prefixes.select([row.group for row in rows])
            mask = torch.cat([prefix_mask, mask], dim=1)
        logits, _ = self._forward(
            ids, mask, positions, cache=cache, use_cache=cache is not None, keep=longest + 1
        )
        logits = logits.float()
        normaliser = torch.logsumexp(logits, dim=-1)
        sums: list[float] = [0.0] * len(rows)
        if longest:
            # Position j of the kept logits predicts token j + 1 of the kept window.
            targets = ids[:, -longest:]
            token_logprobs = (
                logits[:, :-1, :].gather(-1, targets[..., None])[..., 0] - normaliser[:, :-1]
            )
            lengths = torch.tensor([len(row.continuation) for row in rows], device=self.device)
            offsets = torch.arange(longest, device=self.device)[None, :]
            valid = offsets >= (longest - lengths)[:, None]
            kept = torch.where(valid, token_logprobs, torch.zeros_like(token_logprobs))
            sums = kept.sum(-1).tolist()
        out: list[list[tuple[int, float, int]]] = []
        for r, row in enumerate(rows):
            if row.index >= 0:
                out.append([(row.index, min(float(sums[r]), 0.0), len(row.continuation))])
                continue
            tokens = torch.tensor([token for _, token in row.reads], device=self.device)
            values = (logits[r, -1, tokens] - normaliser[r, -1]).tolist()
            out.append(
                [(k, min(float(v), 0.0), 1) for (k, _), v in zip(row.reads, values, strict=True)]
            )
        return out


def _plain_layers(cache: Any) -> list[Any] | None:
    """The layers of a plain full-attention ``DynamicCache``, else ``None``."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if not isinstance(cache, DynamicCache) or not cache.layers:
        return None
    layers = list(cache.layers)
    if any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return layers


class _TokenPicker:
    """Chooses each row's next token from its own pre-drawn uniform numbers.

    Greedy rows (temperature 0) take the argmax. Sampling rows scale by their
    temperature and invert their CDF at their uniform number for the step: in
    vocabulary order when ``top_p == 1``, in descending-probability order (cut to
    the nucleus) otherwise. Which path a row takes depends on its own settings
    only, so a row's tokens do not depend on its batch.
    """

    def __init__(self, rows: list[_Row], steps: int, device: torch.device) -> None:
        temperatures = [row.temperature for row in rows]
        self.all_greedy = all(t == 0 for t in temperatures)
        self.device = device
        if self.all_greedy:
            return
        self.greedy = torch.tensor([t == 0 for t in temperatures], device=device)
        self.any_greedy = bool(any(t == 0 for t in temperatures))
        self.inv_temperature = torch.tensor(
            [1.0 / t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32, device=device
        )[:, None]
        uniforms = torch.zeros((len(rows), steps), dtype=torch.float32)
        for i, row in enumerate(rows):
            if row.temperature > 0 and row.max_new > 0:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(row.seed)
                uniforms[i, : row.max_new] = torch.rand(row.max_new, generator=gen)
        self.uniforms = uniforms.to(device)
        full = [i for i, row in enumerate(rows) if row.top_p >= 1]
        nucleus = [i for i, row in enumerate(rows) if row.top_p < 1]
        self.full_rows = torch.tensor(full, dtype=torch.long, device=device)
        self.nucleus_rows = torch.tensor(nucleus, dtype=torch.long, device=device)
        self.mixed = bool(full) and bool(nucleus)
        self.only_nucleus = not full
        self.top_p = torch.tensor(
            [rows[i].top_p for i in nucleus], dtype=torch.float32, device=device
        )[:, None]

    def pick(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The next token of every row, from last-position logits ``[batch, vocab]``."""
        if self.all_greedy:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits.float() * self.inv_temperature, dim=-1)
        u = self.uniforms[:, step : step + 1]
        if self.mixed:
            tokens = torch.empty(probs.shape[0], dtype=torch.long, device=self.device)
            tokens[self.full_rows] = _invert_cdf(probs[self.full_rows], u[self.full_rows])
            tokens[self.nucleus_rows] = _invert_nucleus(
                probs[self.nucleus_rows], u[self.nucleus_rows], self.top_p
            )
        elif self.only_nucleus:
            tokens = _invert_nucleus(probs, u, self.top_p)
        else:
            tokens = _invert_cdf(probs, u)
        if self.any_greedy:
            tokens = torch.where(self.greedy, logits.argmax(dim=-1), tokens)
        return tokens


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample each row by inverting its CDF (vocabulary order) at ``u`` ``[rows, 1]``."""
    cdf = probs.cumsum(dim=-1)
    target = u * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp_max(probs.shape[-1] - 1)[:, 0]


def _invert_nucleus(probs: torch.Tensor, u: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling: invert the CDF of the smallest set of tokens holding ``top_p``."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    cdf = sorted_probs.cumsum(dim=-1)
    kept = torch.where(cdf - sorted_probs < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    index = _invert_cdf(kept, u)
    return order.gather(-1, index[:, None])[:, 0]
