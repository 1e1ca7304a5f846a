"""The conformance checks: plain functions, one property of a role each.

Each check is ``check_xxx(ctx) -> None`` and raises :class:`CheckFailed` with a
message saying what is wrong and how to fix it, or :class:`CheckSkipped` when it
cannot run. :data:`CHECKS` lists them per role, with the capabilities a plugin must
declare for a check to apply (``capabilities`` of the built instance, else of its
registration).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from caikit_core.interfaces import (
    CAN_SCORE,
    CHAIN_OF_THOUGHT,
    CLAMP,
    DEBIAS,
    ROLLOUTS,
    SEEDED,
    SUPPORTS_PPO,
    SUPPORTS_PREFERENCE_LOSS,
    SUPPORTS_SFT,
    FitReport,
)
from caikit_core.records import (
    FINISH_SKIPPED,
    Comparison,
    Generation,
    GenerationRequest,
    LabelledComparison,
    OptionScore,
    PreferenceLabel,
    Prompt,
    RevisionStep,
    RevisionTrace,
    Rollout,
    RolloutRequest,
    Sample,
    SamplingParams,
    Score,
    ScoreRequest,
    conversation,
    stable_id,
)


class CheckFailed(AssertionError):
    """A check found a contract violation; the message says what to fix."""


class CheckSkipped(Exception):
    """A check cannot run for this plugin; the message says why."""


@attrs.define
class CheckContext:
    """What a check runs against: the plugin's spec, config, built instance and a workdir.

    ``build`` makes a new instance with the role's usual keyword arguments (``model``
    for generators and preference models, ``generator`` and ``constitution`` for
    critics and labellers); ``instance`` is built once. ``cache`` holds results that
    several checks share (e.g. a fitted preference model).

    ``role_kwargs_factory``, ``model_factory`` and ``constitution_factory`` replace
    the kit's defaults (the ``hf`` generator on the tiny model and the default
    constitution; the tiny model; the default constitution); each is called at most
    once per context, when first needed.
    """

    role: str
    name: str
    spec: Any
    config: Any
    workdir: Path
    seed: int = 0
    given_instance: Any = None
    cache: dict[str, Any] = attrs.field(factory=dict)
    role_kwargs_factory: Callable[[], dict[str, Any]] | None = None
    model_factory: Callable[[], Path] | None = None
    constitution_factory: Callable[[], Any] | None = None
    #: instruments: builds the EvalContext the checks evaluate against (default: the
    #: kit's, :class:`caikit_core.testing.instrument_checks.KitEvalContext`)
    eval_context_factory: Callable[[], Any] | None = None

    def base_model(self) -> Path:
        """The checkpoint folder model-backed checks start from (the tiny model by default).

        It is the ``model`` a generator or preference model is built on, and the
        policy the optimiser checks fine-tune. A registered generator gets the tiny
        model with head size 32 (:func:`~caikit_core.testing.fixtures.tiny_generator_model`),
        which vLLM's CPU build can run.
        """
        if "base_model" not in self.cache:
            if self.model_factory is not None:
                self.cache["base_model"] = Path(self.model_factory())
            else:
                from caikit_core.testing import fixtures

                self.cache["base_model"] = (
                    fixtures.tiny_generator_model()
                    if self.role == "generator" and self.spec is not None
                    else fixtures.tiny_model()
                )
        path: Path = self.cache["base_model"]
        return path

    def role_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the pipeline would pass to the factory of this role."""
        if "role_kwargs" not in self.cache:
            self.cache["role_kwargs"] = self._default_role_kwargs()
        kwargs: dict[str, Any] = self.cache["role_kwargs"]
        return dict(kwargs)

    def constitution(self) -> Any:
        """The constitution a critic or labeller was (or would be) built with."""
        if "constitution" not in self.cache:
            kwargs = self.cache.get("role_kwargs") or {}
            if "constitution" in kwargs:
                found = kwargs["constitution"]
            elif self.constitution_factory is not None:
                found = self.constitution_factory()
            elif self.spec is not None and self.role in ("critic", "labeller"):
                found = self.role_kwargs()["constitution"]
            else:
                from caikit_core.testing import fixtures

                found = fixtures.default_constitution()
            self.cache["constitution"] = found
        return self.cache["constitution"]

    def _default_role_kwargs(self) -> dict[str, Any]:
        if self.role_kwargs_factory is not None:
            return dict(self.role_kwargs_factory())
        from caikit_core.testing import fixtures

        if self.role in ("generator", "preference_model"):
            return {"model": str(self.base_model())}
        if self.role in ("critic", "labeller"):
            return {
                "generator": fixtures.hf_generator(),
                "constitution": fixtures.default_constitution(),
            }
        return {}

    def build(self) -> Any:
        """A fresh instance (or the given one when the kit was handed an instance)."""
        if self.spec is None:
            return self.given_instance
        return self.spec.build(self.config, **self.role_kwargs())

    @property
    def instance(self) -> Any:
        if "instance" not in self.cache:
            self.cache["instance"] = (
                self.given_instance if self.given_instance is not None else self.build()
            )
        return self.cache["instance"]

    @property
    def capabilities(self) -> frozenset[str]:
        """The instance's declared capabilities, else the registration's."""
        caps = getattr(self.instance, "capabilities", None)
        if caps is None and self.spec is not None:
            caps = self.spec.capabilities
        return frozenset(caps or ())

    def path(self, name: str) -> Path:
        """A fresh path under the workdir."""
        out = self.workdir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        return out


CheckFn = Callable[[CheckContext], None]


@attrs.frozen
class Check:
    """A check function, its role and the capabilities it needs."""

    name: str
    role: str
    fn: CheckFn
    requires: frozenset[str] = frozenset()


CHECKS: dict[str, list[Check]] = {}


def _check(role: str, *requires: str) -> Callable[[CheckFn], CheckFn]:
    def register(fn: CheckFn) -> CheckFn:
        CHECKS.setdefault(role, []).append(Check(fn.__name__, role, fn, frozenset(requires)))
        return fn

    return register


def role_check(role: str, *requires: str) -> Callable[[CheckFn], CheckFn]:
    """Add the decorated function to :data:`CHECKS` as a check of ``role`` (or of
    another registry kind, such as ``instrument``)."""
    return _check(role, *requires)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _typed_list(result: Any, cls: type, n: int, what: str) -> list[Any]:
    _expect(
        isinstance(result, list),
        f"{what} must return a list, got {type(result).__name__}; return a list of {cls.__name__}",
    )
    _expect(
        len(result) == n,
        f"{what} returned {len(result)} items for {n} inputs; return exactly one per input, "
        "in input order",
    )
    for i, item in enumerate(result):
        _expect(
            isinstance(item, cls),
            f"{what} item {i} is a {type(item).__name__}, not a {cls.__name__}; build "
            f"caikit_core.records.{cls.__name__} objects",
        )
    return list(result)


# --- generator -------------------------------------------------------------------------

_SHORT = SamplingParams(max_new_tokens=4, temperature=1.0)
_GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)
_QUESTIONS = ("What is the capital of France?", "Say something nice.", "Why is the sky blue?")


def _requests(sampling: SamplingParams, ns: Sequence[int] = (1, 1, 1)) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"req-{i}", conversation(("user", q)), sampling, n=n, seed=11 + i)
        for i, (q, n) in enumerate(zip(_QUESTIONS, ns, strict=True))
    ]


def _generate(ctx: CheckContext, requests: list[GenerationRequest]) -> list[Generation]:
    out = _typed_list(ctx.instance.generate(requests), Generation, len(requests), "generate")
    for request, gen in zip(requests, out, strict=True):
        _expect(
            gen.request_id == request.id,
            f"generate answered request '{request.id}' with request_id '{gen.request_id}'; "
            "return generations in request order with request_id = request.id",
        )
        _expect(
            all(isinstance(t, str) for t in gen.texts),
            f"generation '{gen.request_id}' has non-string texts; texts must be str",
        )
    return out


@_check("generator")
def check_generator_n_completions_in_order(ctx: CheckContext) -> None:
    """``n`` completions per request, generations in request order."""
    requests = _requests(_SHORT, ns=(1, 2, 3))
    for request, gen in zip(requests, _generate(ctx, requests), strict=True):
        _expect(
            len(gen.texts) == request.n,
            f"request '{request.id}' asked for n={request.n} completions but got "
            f"{len(gen.texts)}; return exactly n texts per request",
        )


@_check("generator", SEEDED)
def check_generator_same_seed_same_output(ctx: CheckContext) -> None:
    """The same request with the same seed gives the same texts (``seeded``)."""
    requests = _requests(_SHORT, ns=(2, 1, 1))
    first = _generate(ctx, requests)
    second = _generate(ctx, list(reversed(requests)))[::-1]
    for a, b in zip(first, second, strict=True):
        _expect(
            a.texts == b.texts,
            f"request '{a.request_id}' gave {a.texts!r} then {b.texts!r} with the same seed; "
            "seed sampling per request from GenerationRequest.seed (not from the batch), or "
            "do not declare 'seeded'",
        )


@_check("generator")
def check_generator_greedy_batch_equals_single(ctx: CheckContext) -> None:
    """Greedy decoding gives the same text batched as one request at a time."""
    requests = _requests(_GREEDY)
    batched = _generate(ctx, requests)
    for request, gen in zip(requests, batched, strict=True):
        (single,) = _generate(ctx, [request])
        _expect(
            single.texts == gen.texts,
            f"greedy request '{request.id}' gave {gen.texts!r} in a batch but {single.texts!r} "
            "alone; check padding side and attention masks so batching does not change output",
        )


@_check("generator")
def check_generator_empty_batch(ctx: CheckContext) -> None:
    """``generate([])`` returns ``[]`` (and ``score([])`` too, with ``score``)."""
    _expect(ctx.instance.generate([]) == [], "generate([]) must return [] without error")
    if CAN_SCORE in ctx.capabilities:
        _expect(ctx.instance.score([]) == [], "score([]) must return [] without error")


def _rollouts(ctx: CheckContext, requests: list[RolloutRequest]) -> list[Rollout]:
    out = _typed_list(ctx.instance.rollout(requests), Rollout, len(requests), "rollout")
    for request, got in zip(requests, out, strict=True):
        _expect(
            got.request_id == request.id and len(got.token_ids) == request.n,
            f"rollout answered '{request.id}' with request_id '{got.request_id}' and "
            f"{len(got.token_ids)} sequences; return one Rollout per request, in order, with "
            "n sequences of token ids",
        )
        for tokens in got.token_ids:
            _expect(
                0 < len(tokens) <= request.max_new_tokens
                and all(isinstance(t, int) for t in tokens),
                f"rollout '{request.id}' returned {len(tokens)} tokens for max_new_tokens = "
                f"{request.max_new_tokens}; return 1 to max_new_tokens int token ids",
            )
    return out


_ROLLOUT_PROMPTS = ((5, 9, 12, 7, 3), (11, 4, 8), (6, 6, 2, 10))


@_check("generator", ROLLOUTS)
def check_generator_rollouts_seeded_and_stop_at_stop_tokens(ctx: CheckContext) -> None:
    """``rollout``: a seeded request's tokens do not depend on its batch, and a
    sequence ends after its first stop token, which it keeps."""

    def req(i: int, **kw: Any) -> RolloutRequest:
        return RolloutRequest(f"r{i}", _ROLLOUT_PROMPTS[i], **{"max_new_tokens": 6, **kw})

    batch = _rollouts(ctx, [req(i, n=2, seed=40 + i) for i in range(3)])
    (alone,) = _rollouts(ctx, [req(1, n=2, seed=41)])
    _expect(
        alone.token_ids == batch[1].token_ids,
        f"seeded rollout 'r1' gave {alone.token_ids} alone but {batch[1].token_ids} in a batch; "
        "derive each sequence's randomness from the request's seed and sample index",
    )
    (greedy,) = _rollouts(ctx, [req(0, temperature=0.0)])
    tokens = list(greedy.token_ids[0])
    stop = tokens[min(2, len(tokens) - 1)]
    cut = tuple(tokens[: tokens.index(stop) + 1])
    (stopped,) = _rollouts(ctx, [req(0, temperature=0.0, stop_token_ids=(stop,))])
    _expect(
        stopped.token_ids[0] == cut,
        f"greedy rollout 'r0' is {tuple(tokens)}; with stop_token_ids = ({stop},) it gave "
        f"{stopped.token_ids[0]}, expected {cut} (end after the first stop token, keeping it)",
    )


def _perturbed_copy(model: str, out: Path) -> Path:
    """``model``'s checkpoint with noise added to every weight (saved with its tokenizer)."""
    import shutil

    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in loaded.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.5)
    loaded.save_pretrained(out)
    for item in Path(model).iterdir():
        if item.is_file() and item.suffix != ".safetensors" and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    return out


@_check("generator", ROLLOUTS)
def check_generator_rollouts_follow_loaded_weights(ctx: CheckContext) -> None:
    """``load_weights``: greedy rollouts change with new weights and come back with
    the old ones (nothing computed with the old weights, e.g. a prefix cache, is reused)."""
    model = str(ctx.role_kwargs().get("model", ctx.base_model()))
    requests = [
        RolloutRequest(f"w{i}", p, max_new_tokens=8, temperature=0.0)
        for i, p in enumerate(_ROLLOUT_PROMPTS)
    ]
    before = [r.token_ids for r in _rollouts(ctx, requests)]
    ctx.instance.load_weights(_perturbed_copy(model, ctx.path("perturbed")))
    changed = [r.token_ids for r in _rollouts(ctx, requests)]
    ctx.instance.load_weights(Path(model))
    back = [r.token_ids for r in _rollouts(ctx, requests)]
    _expect(
        changed != before,
        "greedy rollouts are the same after load_weights of a checkpoint with other weights; "
        "load the checkpoint's weights into the model that samples",
    )
    _expect(
        back == before,
        f"after loading the original weights back, greedy rollouts are {back}, not {before} "
        "as at first; reset caches computed with the replaced weights",
    )


@_check("generator")
def check_generator_unicode(ctx: CheckContext) -> None:
    """Non-ASCII prompts (accents, CJK, emoji) are accepted and give string texts."""
    text = "Héllo wörld — 日本語 🌍 ¿qué?"
    requests = [GenerationRequest("uni", conversation(("user", text)), _SHORT, n=1, seed=3)]
    _generate(ctx, requests)


@_check("generator", CAN_SCORE)
def check_generator_scores_are_logprobs(ctx: CheckContext) -> None:
    """``score`` gives one finite log-probability <= 0 per continuation, in order."""
    requests = [
        ScoreRequest(f"s-{i}", conversation(("user", q)), (" yes", " no, thanks", " 🌍"))
        for i, q in enumerate(_QUESTIONS)
    ]
    scores = _typed_list(ctx.instance.score(requests), Score, len(requests), "score")
    for request, score in zip(requests, scores, strict=True):
        _expect(
            score.request_id == request.id,
            f"score answered '{request.id}' with request_id '{score.request_id}'; keep order",
        )
        _expect(
            len(score.logprobs) == len(request.continuations),
            f"score '{request.id}' has {len(score.logprobs)} logprobs for "
            f"{len(request.continuations)} continuations; return one per continuation",
        )
        for lp in score.logprobs:
            _expect(
                isinstance(lp, float) and math.isfinite(lp) and lp <= 0.0,
                f"score '{request.id}' has logprob {lp!r}; log-probabilities must be finite "
                "floats <= 0 (sum the log-softmax of the continuation's tokens)",
            )


#: A prompt of 3,600 words: longer than the kit's tiny model's 2048 positions.
_LONG_PROMPT = "the sea is wide and deep " * 600
#: Values of ``config.truncation`` that mean "raise an error" rather than truncate.
_RAISE_POLICIES = ("error", "raise")


@_check("generator")
def check_generator_over_long_prompt(ctx: CheckContext) -> None:
    """An over-long prompt is truncated with a warning, skipped with finish reason
    ``skipped`` and a warning, or refused with a ``CaikitError`` naming the request, as
    ``config.truncation`` declares; the other requests of the batch still run."""
    from caikit_core.errors import CaikitError

    policy = getattr(getattr(ctx.instance, "config", None), "truncation", None)
    long = GenerationRequest("over-long", conversation(("user", _LONG_PROMPT)), _GREEDY, seed=1)
    short = _requests(_GREEDY)[0]
    where = f"an over-long prompt ({len(_LONG_PROMPT)} characters)"
    try:
        gen, other = _generate(ctx, [long, short])
    except CheckFailed:
        raise
    except Exception as exc:
        _expect(
            isinstance(exc, CaikitError) and long.id in str(exc),
            f"{where} raised {type(exc).__name__}: {exc}; truncate it and record a warning, "
            "skip it (empty texts, finish reason 'skipped', a warning), or raise a CaikitError "
            f"that names the request ('{long.id}')",
        )
        _expect(
            policy is None or policy in _RAISE_POLICIES,
            f"config.truncation is {policy!r}, but {where} raised {type(exc).__name__}: {exc}",
        )
        return
    skipped = FINISH_SKIPPED in gen.finish_reasons
    if skipped:
        _expect(
            len(gen.finish_reasons) == len(gen.texts)
            and all(r == FINISH_SKIPPED for r in gen.finish_reasons)
            and all(t == "" for t in gen.texts),
            f"{where} was partly skipped: texts {gen.texts!r}, finish reasons "
            f"{gen.finish_reasons!r}; a skipped request has an empty text and finish reason "
            "'skipped' for every completion",
        )
        _expect(
            bool(gen.warnings),
            f"{where} was skipped without a warning; say why in Generation.warnings",
        )
    _expect(
        FINISH_SKIPPED not in other.finish_reasons,
        f"request '{other.request_id}', a short prompt, was skipped when batched with "
        f"{where}; handle each request on its own",
    )
    if policy == "skip":
        _expect(
            skipped,
            f"config.truncation is 'skip' but {where} was not skipped (finish reasons "
            f"{gen.finish_reasons!r}); return empty texts with finish reason 'skipped'",
        )
    elif policy in _RAISE_POLICIES:
        raise CheckFailed(
            f"config.truncation is {policy!r} but {where} did not raise; raise a CaikitError "
            f"that names the request ('{long.id}')"
        )
    elif policy is not None:
        _expect(
            not skipped and bool(gen.warnings),
            f"config.truncation is {policy!r} but {where} was "
            + ("skipped" if skipped else "answered with no warning")
            + "; truncate it and record in Generation.warnings that it was truncated",
        )
    elif not skipped and not gen.warnings:
        raise CheckSkipped(
            f"{where} was answered with no warning and no 'skipped' finish reason, and the "
            "generator declares no truncation policy (config.truncation); the kit cannot tell "
            "whether it has a context limit"
        )


@_check("generator", CAN_SCORE)
def check_generator_greedy_choice_scores_highest(ctx: CheckContext) -> None:
    """``score`` agrees with ``generate``: a greedy one-token completion is the most likely
    next token, so no other continuation of the same messages scores higher."""
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    messages = [conversation(("user", q)) for q in (*_QUESTIONS, "Tell me about the sea.")]
    greedy = _generate(ctx, [GenerationRequest(f"top-{i}", m, one) for i, m in enumerate(messages)])
    # Other plausible continuations: sampled first tokens, and a few longer samples.
    sampled = [
        _generate(
            ctx,
            [
                GenerationRequest(f"any-{i}", m, SamplingParams(tokens, 1.0), n=n, seed=7 + i)
                for i, m in enumerate(messages)
            ],
        )
        for tokens, n in ((1, 8), (3, 4))
    ]
    requests = []
    for i, (m, top) in enumerate(zip(messages, greedy, strict=True)):
        first = top.texts[0] if top.texts else ""
        if not first or "\ufffd" in first:  # end of sequence, or part of a character
            continue
        texts = [t for gens in sampled for t in gens[i].texts]
        others = [t for t in (*texts, " yes", " no", "Paris.") if t and t != first]
        requests.append(ScoreRequest(f"top-{i}", m, (first, *dict.fromkeys(others))))
    if not requests:
        raise CheckSkipped(
            "every greedy first token was empty (end of sequence) or part of a character; "
            "nothing to compare"
        )
    scores = _typed_list(ctx.instance.score(requests), Score, len(requests), "score")
    compared = 0
    for request, score in zip(requests, scores, strict=True):
        if score.token_counts and score.token_counts[0] != 1:
            continue  # the greedy token's text does not encode back to one token
        compared += 1
        best = score.logprobs[0]
        for text, lp in zip(request.continuations[1:], score.logprobs[1:], strict=True):
            _expect(
                lp <= best + 1e-3,
                f"for '{request.id}' the greedy one-token completion {request.continuations[0]!r} "
                f"scores {best:.4g} but {text!r} scores {lp:.4g}; nothing may score above the "
                "most likely next token: score and generate must render the same context (chat "
                "template, assistant turn opened, response_prefix) and score must sum the "
                "log-softmax of the continuation's tokens",
            )
    if not compared:
        raise CheckSkipped("no greedy token's text scores as one token; nothing to compare")


#: Absolute tolerance, in nats, of the score checks below for a float32 model: far
#: above the round-off of a padded batch (about 1e-5 on the kit's tiny model), far
#: below what a scoring bug changes.
_SCORE_TOLERANCE = 1e-3
#: The same for a generator that declares a 16-bit dtype (``dtype`` of the instance or
#: of its config): bfloat16 round-off alone moves a sum of ten log-probs by ~1e-2.
_SCORE_TOLERANCE_16BIT = 0.1


def _score_tolerance(ctx: CheckContext) -> float:
    """:data:`_SCORE_TOLERANCE`, or :data:`_SCORE_TOLERANCE_16BIT` for a 16-bit generator."""
    instance = ctx.instance
    config = getattr(instance, "config", None)
    for dtype in (getattr(instance, "dtype", None), getattr(config, "dtype", None)):
        if dtype is not None and str(dtype) != "auto":
            text = str(dtype).lower()
            return _SCORE_TOLERANCE_16BIT if "16" in text or "half" in text else _SCORE_TOLERANCE
    return _SCORE_TOLERANCE


#: (question, response_prefix, a, b) for the chain-rule check. Every piece after the
#: first starts with a space, so a byte-level BPE tokenizer (the tiny model's, GPT-2's,
#: Llama 3's) splits ``a + b`` exactly between them and the context exactly before ``a``.
_CHAIN = (
    ("What is the capital of France?", "", "The capital", " of France is Paris."),
    ("Why is the sky blue?", "Because", " the air", " scatters blue light more."),
    ("Say something nice.", "Sure:", " you are", " welcome here, friend."),
)


def _scores(ctx: CheckContext, requests: list[ScoreRequest]) -> list[Score]:
    """``score(requests)``, checked for type, count, order and one logprob per continuation."""
    scores = _typed_list(ctx.instance.score(requests), Score, len(requests), "score")
    for request, score in zip(requests, scores, strict=True):
        _expect(
            score.request_id == request.id and len(score.logprobs) == len(request.continuations),
            f"score answered '{request.id}' with request_id '{score.request_id}' and "
            f"{len(score.logprobs)} logprobs for {len(request.continuations)} continuations; "
            "return one Score per request, in order, with one logprob per continuation",
        )
    return scores


@_check("generator", CAN_SCORE)
def check_generator_score_chain_rule(ctx: CheckContext) -> None:
    """log P(ab | x) = log P(a | x) + log P(b | x, response_prefix + a), within 1e-3
    (0.1 for a generator that declares a 16-bit ``dtype``).

    A continuation's log-probability is a sum over its tokens, so scoring ``a + b``
    whole, or ``a`` and then ``b`` with ``a`` appended to ``response_prefix``, gives
    the same number. The pieces split at a space, where the tokenizer splits too; a
    case whose ``token_counts`` show that ``a + b`` is not tokenised as ``a`` then
    ``b`` is left out. This catches a ``score`` that ignores ``response_prefix`` or
    averages the token log-probabilities instead of summing them.
    """
    requests = []
    for i, (question, prefix, a, b) in enumerate(_CHAIN):
        messages = conversation(("user", question))
        requests.append(ScoreRequest(f"chain-{i}-whole", messages, (a + b, a), prefix))
        requests.append(ScoreRequest(f"chain-{i}-rest", messages, (b,), prefix + a))
    scores = _scores(ctx, requests)
    tolerance = _score_tolerance(ctx)
    compared = 0
    for i, (_, prefix, a, b) in enumerate(_CHAIN):
        whole, rest = scores[2 * i], scores[2 * i + 1]
        counts, rest_counts = whole.token_counts, rest.token_counts
        if counts and rest_counts and counts[0] != counts[1] + rest_counts[0]:
            continue  # a + b is not tokenised as a then b
        compared += 1
        joint, first, second = whole.logprobs[0], whole.logprobs[1], rest.logprobs[0]
        _expect(
            abs(joint - (first + second)) <= tolerance,
            f"for 'chain-{i}' log P({a + b!r}) is {joint:.6g}, but log P({a!r}) + "
            f"log P({b!r} | response_prefix {prefix + a!r}) is {first:.6g} + {second:.6g} = "
            f"{first + second:.6g} (tolerance {tolerance:g}); score must sum the "
            "log-softmax of each continuation token given everything before it, with "
            "response_prefix in the context after the opened assistant turn",
        )
    if not compared:
        raise CheckSkipped(
            "token_counts show that no a + b of the chain-rule cases is tokenised as a then b"
        )


#: Continuations for the prompt check: two option letters after a prefix (one token
#: each, as a labeller scores them) and two whole sentences.
_OPTION_PREFIX = "The better response is ("
_OPTIONS = ("A", "B")
_SENTENCES = (" The answer is yes.", " I do not know.")
_PROMPT_QUESTIONS = (*_QUESTIONS, "Tell me about the sea.")


@_check("generator", CAN_SCORE)
def check_generator_scores_depend_on_prompt(ctx: CheckContext) -> None:
    """The same continuations get different scores under different questions: option
    letters after a prefix, and whole sentences, differ by more than 1e-6 somewhere
    between any two of four questions.

    A language model conditions on its prompt, so two different questions never give
    identical log-probabilities to the same continuations (on the tiny model they
    differ by orders of magnitude more than 1e-6). Equal scores mean ``score`` drops
    the messages (or caches results by continuation), so a labeller's option
    log-probabilities would be the same whatever the question.
    """
    requests = []
    for i, question in enumerate(_PROMPT_QUESTIONS):
        messages = conversation(("user", question))
        requests.append(ScoreRequest(f"options-{i}", messages, _OPTIONS, _OPTION_PREFIX))
        requests.append(ScoreRequest(f"sentences-{i}", messages, _SENTENCES))
    scores = _scores(ctx, requests)
    for kind, offset, texts in (("options", 0, _OPTIONS), ("sentences", 1, _SENTENCES)):
        found = [scores[2 * i + offset].logprobs for i in range(len(_PROMPT_QUESTIONS))]
        for i in range(len(found)):
            for j in range(i + 1, len(found)):
                gap = max(abs(x - y) for x, y in zip(found[i], found[j], strict=True))
                _expect(
                    gap > 1e-6,
                    f"{kind} {texts!r} score {tuple(round(v, 6) for v in found[i])} under "
                    f"{_PROMPT_QUESTIONS[i]!r} and {tuple(round(v, 6) for v in found[j])} under "
                    f"{_PROMPT_QUESTIONS[j]!r}; scores must depend on the messages: render "
                    "ScoreRequest.messages with the chat template before the continuation (and "
                    "do not cache scores by continuation alone)",
                )


#: Length (in tokens) of the greedy texts the greedy-text check scores, and its prompts:
#: ones whose greedy texts on the kit's random tiny model are mostly whole characters
#: (it often emits part of one, which the check leaves out).
_GREEDY_TOKENS = 4
_GREEDY_PROMPTS = (
    "Why is the sky blue?",
    "Tell me about the sea.",
    "Who are you?",
    "Describe the sun.",
    "What do cats eat?",
    "What is the time?",
    "Is it raining?",
    "Hello!",
)


def _as_generated(whole: Score, last: Score, m: int, tokens: int, tolerance: float) -> bool:
    """Whether whole text ``m`` (0: the greedy text; m >= 2: tail m - 1) scores as the
    shared greedy tokens (whole text 1) then one token, as it was generated."""
    tail = 0 if m == 0 else m - 1
    split = whole.logprobs[1] + last.logprobs[tail]
    return (
        whole.token_counts[m] == tokens
        and last.token_counts[tail] == 1
        and abs(whole.logprobs[m] - split) <= tolerance
    )


@_check("generator", CAN_SCORE)
def check_generator_greedy_text_scores_highest(ctx: CheckContext) -> None:
    """``generate``'s greedy text of ``j`` tokens (j = 2..4) scores at least as high,
    within 1e-3 (0.1 for a 16-bit ``dtype``), as every other ``j``-token continuation
    that shares its first ``j - 1`` tokens (the greedy next token and sampled ones
    after those tokens), on 8 prompts.

    Greedy decoding maximises each step, not the whole sequence, so a greedy text can
    lose to a continuation that differs from it early. It cannot lose to one that
    differs only in its last token: both share log P(first j - 1 tokens), and the
    greedy last token is the most likely one after them, so
    log P(greedy_j) >= log P(greedy_{j-1} + t) for every token t. The alternatives
    are therefore the ``j - 1``-token greedy text followed by one token that
    ``generate`` gives after it as ``response_prefix`` (greedy, and 8 samples).

    ``score`` sees text, not the generated tokens, so a text is compared only when it
    scores as the shared tokens then one more: ``token_counts`` of ``j - 1`` and
    ``j`` (and 1 for the last token), and log P(whole) = log P(shared) +
    log P(last | response_prefix shared) within the tolerance. A generated sequence
    that the tokenizer re-segments, or a last token that merges with the one before
    it, is left out, so a correct generator cannot fail. It catches a ``generate``
    that stops decoding greedily after the first token (the one-token case is
    ``check_generator_greedy_choice_scores_highest``), and a ``score`` that scores
    other tokens or another context than ``generate`` decodes from.
    """
    messages = [conversation(("user", q)) for q in _GREEDY_PROMPTS]
    greedy = _generate(
        ctx,
        [
            GenerationRequest(f"greedy-{i}-{j}", m, SamplingParams(j, 0.0))
            for i, m in enumerate(messages)
            for j in range(1, _GREEDY_TOKENS + 1)
        ],
    )
    texts = {
        (i, j): (greedy[i * _GREEDY_TOKENS + j - 1].texts or ("",))[0]
        for i in range(len(messages))
        for j in range(1, _GREEDY_TOKENS + 1)
    }
    # (prompt, j): the j - 1 greedy tokens can be continued (not ended, whole characters).
    cases = [
        (i, j)
        for i in range(len(messages))
        for j in range(2, _GREEDY_TOKENS + 1)
        if texts[i, j - 1]
        and "\ufffd" not in texts[i, j]
        and texts[i, j].startswith(texts[i, j - 1])
        and texts[i, j] != texts[i, j - 1]
    ]
    if not cases:
        raise CheckSkipped("every greedy text ended or split a character early; nothing to compare")
    nexts = _generate(
        ctx,
        [
            GenerationRequest(
                f"next-{i}-{j}",
                messages[i],
                SamplingParams(1, temperature),
                n=n,
                seed=31 + 7 * i + j,
                response_prefix=texts[i, j - 1],
            )
            for i, j in cases
            for temperature, n in ((0.0, 1), (1.0, 8))
        ],
    )
    requests = []
    for k, (i, j) in enumerate(cases):
        shared, best = texts[i, j - 1], texts[i, j]
        found = [t for gen in nexts[2 * k : 2 * k + 2] for t in gen.texts]
        tails = [best[len(shared) :]]
        tails += [t for t in dict.fromkeys(found) if t and "\ufffd" not in t and t != tails[0]]
        # Whole texts, and their last token after the shared greedy tokens as a prefix.
        whole = (best, shared, *(shared + t for t in tails[1:]))
        requests.append(ScoreRequest(f"greedy-{i}-{j}", messages[i], whole))
        requests.append(ScoreRequest(f"greedy-{i}-{j}-last", messages[i], tuple(tails), shared))
    scores = _scores(ctx, requests)
    tolerance = _score_tolerance(ctx)
    compared = 0
    for k, (_, j) in enumerate(cases):
        request, score, last = requests[2 * k], scores[2 * k], scores[2 * k + 1]
        if not score.token_counts or not last.token_counts:
            raise CheckSkipped(
                "score reports no token_counts, so the kit cannot tell which continuations "
                "have as many tokens as the greedy text; fill Score.token_counts"
            )
        if score.token_counts[1] != j - 1 or not _as_generated(score, last, 0, j, tolerance):
            continue  # the greedy text does not re-tokenise as generated
        top = score.logprobs[0]
        for m in range(2, len(request.continuations)):
            if not _as_generated(score, last, m, j, tolerance):
                continue  # the new token merged with the greedy ones (or split)
            compared += 1
            text, lp = request.continuations[m], score.logprobs[m]
            _expect(
                lp <= top + tolerance,
                f"for '{request.id}' generate's greedy {j}-token text {request.continuations[0]!r} "
                f"scores {top:.6g} but {text!r}, which shares its first {j - 1} tokens, scores "
                f"{lp:.6g} (tolerance {tolerance:g}); with temperature 0 every step of "
                "generate must take the most likely token given the prompt and all tokens so far "
                "(and score must score the same tokens given the same context)",
            )
    if not compared:
        raise CheckSkipped(
            "no greedy text and alternative scored as generated (token_counts, and the split at "
            "the last token that check_generator_score_chain_rule checks); nothing to compare"
        )


# --- critic ----------------------------------------------------------------------------


def _samples() -> list[Sample]:
    out = []
    for text in _QUESTIONS:
        pid = stable_id("prompt", text)
        out.append(Sample(stable_id("r", pid), pid, conversation(("user", text)), f"Sure: {text}"))
    return out


def _revise(ctx: CheckContext, *, fresh: bool = False) -> list[RevisionTrace]:
    """The traces of the kit's samples under seed 5 (cached unless ``fresh``)."""
    if not fresh and "traces" in ctx.cache:
        cached: list[RevisionTrace] = ctx.cache["traces"]
        return cached
    samples = _samples()
    seed = 5
    traces = _typed_list(
        ctx.instance.revise(samples, seed=seed), RevisionTrace, len(samples), "revise"
    )
    for sample, trace in zip(samples, traces, strict=True):
        _expect(
            trace.prompt_id == sample.prompt_id and trace.initial_response == sample.response,
            f"trace '{trace.id}' does not match sample '{sample.id}' (prompt_id/initial_response);"
            " return one trace per sample, in sample order",
        )
        _expect(
            isinstance(trace.steps, tuple)
            and all(isinstance(s, RevisionStep) for s in trace.steps),
            f"trace '{trace.id}' steps must be a tuple of RevisionStep",
        )
    if not fresh:
        ctx.cache["traces"] = traces
    return traces


@_check("critic")
def check_critic_steps_and_principles(ctx: CheckContext) -> None:
    """Every trace has N indexed steps whose principle ids come from the constitution."""
    ids = {p.id for p in ctx.constitution().critique_revision}
    expected = getattr(getattr(ctx.instance, "config", None), "revisions", None)
    for trace in _revise(ctx):
        if trace.skipped_reason is not None:
            continue
        if isinstance(expected, int):
            _expect(
                len(trace.steps) == expected,
                f"trace '{trace.id}' has {len(trace.steps)} steps but config.revisions is "
                f"{expected}; run one critique-revise step per revision",
            )
        _expect(len(trace.steps) >= 1, f"trace '{trace.id}' has no steps")
        for i, step in enumerate(trace.steps):
            _expect(step.index == i, f"trace '{trace.id}' step {i} has index {step.index}")
            _expect(
                step.principle_id in ids,
                f"trace '{trace.id}' step {i} uses principle '{step.principle_id}', which is not "
                "a critique_revision principle of the constitution passed to the factory",
            )


@_check("critic")
def check_critic_deterministic(ctx: CheckContext) -> None:
    """The same samples and seed give the same traces."""
    first, second = _revise(ctx), _revise(ctx, fresh=True)
    for a, b in zip(first, second, strict=True):
        _expect(
            a == b,
            f"trace '{a.id}' differs between two revise calls with seed=5; derive principle "
            "choice and sampling seeds from the seed and the record id",
        )


@_check("critic")
def check_critic_records_prompts(ctx: CheckContext) -> None:
    """Every step records its prompts and texts; the final response is the last revision."""
    for trace in _revise(ctx):
        for step in trace.steps:
            for field in ("critique_prompt", "critique", "revision_prompt", "revision"):
                _expect(
                    isinstance(getattr(step, field), str),
                    f"trace '{trace.id}' step {step.index} {field} must be a str",
                )
            _expect(
                bool(step.revision_prompt),
                f"trace '{trace.id}' step {step.index} has an empty revision_prompt; record the "
                "exact prompt sent to the generator",
            )
        if trace.steps and trace.skipped_reason is None:
            _expect(
                trace.final_response == trace.steps[-1].revision,
                f"trace '{trace.id}' final_response is not its last step's revision",
            )


# --- labeller --------------------------------------------------------------------------

_PAIRS = (
    ("What is the capital of France?", "The capital of France is Paris.", "It is Rome."),
    ("How do I bake bread?", "You need flour, water, salt and yeast.", "I would rather not."),
    ("Say something nice.", "You are welcome here.", "No."),
)


def _comparison(prompt: str, a: str, b: str) -> Comparison:
    pid = stable_id("prompt", prompt)
    return Comparison(stable_id("pair", pid, a, b), pid, conversation(("user", prompt)), a, b)


def _label(ctx: CheckContext, comparisons: list[Comparison], seed: int = 3) -> list[Any]:
    labels = _typed_list(
        ctx.instance.label(comparisons, seed=seed), PreferenceLabel, len(comparisons), "label"
    )
    for c, label in zip(comparisons, labels, strict=True):
        _expect(
            label.comparison_id == c.id,
            f"label '{label.id}' has comparison_id '{label.comparison_id}' for comparison "
            f"'{c.id}'; return labels in comparison order",
        )
    return labels


@_check("labeller")
def check_labeller_probabilities_in_unit_interval(ctx: CheckContext) -> None:
    """Every ``p_a`` is a finite probability in [0, 1]."""
    for label in _label(ctx, [_comparison(*p) for p in _PAIRS]):
        _expect(
            isinstance(label.p_a, float) and math.isfinite(label.p_a) and 0.0 <= label.p_a <= 1.0,
            f"label '{label.id}' has p_a={label.p_a!r}; p_a must be a finite float in [0, 1] "
            "(normalise the option probabilities, e.g. softmax over the two option log-probs)",
        )


@_check("labeller")
def check_labeller_deterministic(ctx: CheckContext) -> None:
    """The same comparisons and seed give the same labels."""
    comparisons = [_comparison(*p) for p in _PAIRS]
    first, second = _label(ctx, comparisons, seed=9), _label(ctx, comparisons, seed=9)
    for a, b in zip(first, second, strict=True):
        _expect(
            a.p_a == b.p_a,
            f"label for comparison '{a.comparison_id}' gave p_a {a.p_a!r} then {b.p_a!r} with "
            "seed=9; derive all randomness from the seed and the comparison id",
        )


@_check("labeller", DEBIAS)
def check_labeller_swap_complements(ctx: CheckContext) -> None:
    """(B, A) is labelled 1 - p(A, B) within 1e-6 (``debias``), in one call."""
    comparisons = [_comparison(*p) for p in _PAIRS]
    swapped = [
        attrs.evolve(c, response_a=c.response_b, response_b=c.response_a) for c in comparisons
    ]
    labels = _label(ctx, [*comparisons, *swapped])
    n = len(comparisons)
    for c, ab, ba in zip(comparisons, labels[:n], labels[n:], strict=True):
        _expect(
            abs(ab.p_a + ba.p_a - 1.0) <= 1e-6,
            f"comparison '{c.id}': p(A,B)={ab.p_a!r} and p(B,A)={ba.p_a!r} do not sum to 1; a "
            "'debias' labeller must score both orders and average them",
        )


@_check("labeller", DEBIAS)
def check_labeller_identical_responses_half(ctx: CheckContext) -> None:
    """Two identical responses give p_a = 0.5 (within 1e-6) when order bias is removed."""
    same = _comparison("Say something nice.", "You are welcome here.", "You are welcome here.")
    (label,) = _label(ctx, [same])
    _expect(
        abs(label.p_a - 0.5) <= 1e-6,
        f"identical responses gave p_a={label.p_a!r}, not 0.5; a 'debias' labeller must "
        "average both option orders",
    )


@_check("labeller", CLAMP)
def check_labeller_clamp_respected(ctx: CheckContext) -> None:
    """With ``clamp``, every ``p_a`` lies in the configured interval (``config.clamp``)."""
    clamp = getattr(getattr(ctx.instance, "config", None), "clamp", None)
    if clamp is None:
        raise CheckSkipped("declares 'clamp' but its instance has no config.clamp to read")
    low, high = clamp
    for label in _label(ctx, [_comparison(*p) for p in _PAIRS]):
        _expect(
            low - 1e-9 <= label.p_a <= high + 1e-9,
            f"label '{label.id}' has p_a={label.p_a!r} outside the configured clamp "
            f"[{low}, {high}]; clamp p_a after combining the options",
        )


@_check("labeller")
def check_labeller_provenance(ctx: CheckContext) -> None:
    """Labels name their labeller and carry their evidence (option log-probs, rationale)."""
    for label in _label(ctx, [_comparison(*p) for p in _PAIRS]):
        _expect(
            isinstance(label.labeller, str) and bool(label.labeller),
            f"label '{label.id}' has labeller={label.labeller!r}; set it to the labeller's name",
        )
        _expect(
            bool(label.evidence) and all(isinstance(e, OptionScore) for e in label.evidence),
            f"label '{label.id}' has no OptionScore evidence; record the option log-probs per "
            "principle and order in PreferenceLabel.evidence",
        )
        if CHAIN_OF_THOUGHT in ctx.capabilities:
            _expect(
                all(e.rationale is not None for e in label.evidence),
                f"label '{label.id}' declares 'chain-of-thought' but its evidence has no "
                "rationale; record the reasoning in OptionScore.rationale",
            )


# --- preference model ------------------------------------------------------------------

_MARKER = "please"
_WORDS = ("the", "sky", "is", "blue", "water", "boils", "good", "morning", "bread", "sea")


def marker_set(n: int = 48, seed: int = 0) -> list[LabelledComparison]:
    """Random-word response pairs; the one containing the marker word wins with p = 0.9."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = conversation(("user", rng.choice(_QUESTIONS)))
        a = " ".join(rng.choice(_WORDS) for _ in range(6))
        b = " ".join(rng.choice(_WORDS) for _ in range(6))
        a_wins = rng.random() < 0.5
        a, b = (f"{a} {_MARKER}", b) if a_wins else (a, f"{b} {_MARKER}")
        comparison = Comparison(f"m{i}", f"p-m{i}", messages, a, b)
        label = PreferenceLabel(f"l-m{i}", f"m{i}", 0.9 if a_wins else 0.1, "kit")
        out.append(LabelledComparison(comparison, label))
    return out


def _pair_samples(items: Sequence[LabelledComparison]) -> list[Sample]:
    return [
        Sample(f"s{k}-{i}", lc.comparison.prompt_id, lc.comparison.messages, text)
        for i, lc in enumerate(items)
        for k, text in enumerate((lc.comparison.response_a, lc.comparison.response_b))
    ]


def _fitted(ctx: CheckContext) -> tuple[Any, Path, list[float]]:
    """The instance fitted on the marker set, its saved folder and its scores (cached)."""
    if "fitted" not in ctx.cache:
        items = marker_set()
        out = ctx.path("preference-model")
        ctx.instance.fit(items, out)
        scores = ctx.instance.score(_pair_samples(items))
        _expect(
            isinstance(scores, list) and len(scores) == 2 * len(items),
            "score must return one float per sample, in order",
        )
        ctx.cache["fitted"] = (ctx.instance, out, [float(s) for s in scores])
    fitted: tuple[Any, Path, list[float]] = ctx.cache["fitted"]
    return fitted


@_check("preference_model")
def check_preference_model_fits_marker_set(ctx: CheckContext) -> None:
    """Fitting a soft-labelled marker set ranks the preferred response higher (> 90%)."""
    items = marker_set()
    _, _, scores = _fitted(ctx)
    right = 0
    for i, lc in enumerate(items):
        a, b = scores[2 * i], scores[2 * i + 1]
        right += (a > b) == (lc.label.p_a > 0.5)
    accuracy = right / len(items)
    _expect(
        accuracy > 0.9,
        f"after fit, pairwise accuracy on the training pairs is {accuracy:.2f} (need > 0.9); "
        "train on the soft labels (p_a) and score the response end",
    )


@_check("preference_model")
def check_preference_model_scores_deterministic(ctx: CheckContext) -> None:
    """Scoring the same samples twice gives the same floats."""
    model, _, scores = _fitted(ctx)
    again = [float(s) for s in model.score(_pair_samples(marker_set()))]
    _expect(
        again == scores,
        "two score calls on the same samples differ; put the model in eval mode (no dropout)",
    )


@_check("preference_model")
def check_preference_model_save_load(ctx: CheckContext) -> None:
    """A fresh instance that loads the fitted folder gives the same scores (within 1e-5)."""
    _, out, scores = _fitted(ctx)
    fresh = ctx.build()
    fresh.load(out)
    loaded = [float(s) for s in fresh.score(_pair_samples(marker_set()))]
    worst = max(abs(a - b) for a, b in zip(scores, loaded, strict=True))
    _expect(
        worst <= 1e-5,
        f"scores after load differ by up to {worst:.3g}; fit must save everything score needs "
        "(trunk and head) into its out folder, and load must restore it",
    )


# --- policy optimiser ------------------------------------------------------------------


def toy_traces(n: int = 8) -> list[RevisionTrace]:
    """Short revision traces whose final responses are the SFT targets."""
    out = []
    for i in range(n):
        q = _QUESTIONS[i % len(_QUESTIONS)]
        pid = f"p{i}"
        step = RevisionStep(0, "harmful", "Critique?", "Rude.", "Revise.", "Sure, happy to help.")
        out.append(
            RevisionTrace(
                f"t{i}", pid, conversation(("user", q)), "No.", (step,), "Sure, happy to help."
            )
        )
    return out


def _evolved(config: Any, settings: Mapping[str, Any]) -> Any:
    """``config`` with ``settings`` applied to the fields it has; a table of settings
    for a field holding an attrs instance (``{"ppo": {"steps": 1}}``) is applied to it."""
    names = {f.name for f in attrs.fields(type(config))}
    changes: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in names:
            continue
        current = getattr(config, key)
        if isinstance(value, Mapping) and attrs.has(type(current)):
            changes[key] = _evolved(current, value)
        else:
            changes[key] = value
    return attrs.evolve(config, **changes) if changes else config


def _tuned(ctx: CheckContext, settings: dict[str, Any]) -> Any:
    """The instance, rebuilt with ``settings`` applied to the fields its config has.

    A given instance (no spec to rebuild from) or a config that is not an attrs
    class is used as it is.
    """
    optimiser = ctx.instance
    config = getattr(optimiser, "config", None)
    if ctx.spec is not None and config is not None and attrs.has(type(config)):
        tuned = _evolved(config, settings)
        if tuned is not config:
            optimiser = ctx.spec.build(tuned)
    return optimiser


def _metrics(report: Any) -> dict[str, float]:
    metrics: dict[str, float] = dict(getattr(report, "metrics", {}) or {})
    return metrics


def _checkpoint(report: Any, out: Path) -> Path:
    """The folder a fit saved its policy in: ``FitReport.path``, else the ``out`` given."""
    return Path(getattr(report, "path", "") or out)


def _hf_on(ctx: CheckContext, folder: Path, what: str) -> Any:
    """The bundled ``hf`` generator on ``folder`` (cached per folder in the context).

    :raises CheckFailed: the folder does not load, or greedy generation fails on it.
    """
    key = f"hf:{folder}"
    if key not in ctx.cache:
        from caikit_core.plugins import get_registry

        spec = get_registry().get("generator", "hf")
        assert spec.config_cls is not None
        try:
            generator = spec.build(spec.config_cls(device="cpu"), model=str(folder))
            generations = generator.generate(_requests(_GREEDY)[:1])
        except Exception as exc:
            raise CheckFailed(
                f"the hf generator cannot use the {what} checkpoint {folder}: {exc}; save the "
                "model and tokenizer (with its chat template) with save_pretrained into the out "
                "folder, or return its folder as FitReport.path"
            ) from exc
        _expect(
            len(generations) == 1 and len(generations[0].texts) == 1,
            f"the {what} checkpoint {folder} loads in the hf generator but generated no text",
        )
        ctx.cache[key] = generator
    return ctx.cache[key]


def _sft(ctx: CheckContext) -> tuple[Any, Path]:
    if "sft" not in ctx.cache:
        out = ctx.path("sft")
        report = ctx.instance.sft(str(ctx.base_model()), toy_traces(), out)
        ctx.cache["sft"] = (report, out)
    result: tuple[Any, Path] = ctx.cache["sft"]
    return result


@_check("policy_optimiser", SUPPORTS_SFT)
def check_sft_loss_decreases(ctx: CheckContext) -> None:
    """SFT on a toy set lowers the loss (FitReport metrics ``loss_first``/``loss_last``)."""
    report, _ = _sft(ctx)
    metrics = _metrics(report)
    if "loss_first" not in metrics or "loss_last" not in metrics:
        raise CheckSkipped("FitReport.metrics has no loss_first/loss_last to compare")
    _expect(
        metrics["loss_last"] < metrics["loss_first"],
        f"SFT loss went from {metrics['loss_first']:.4g} to {metrics['loss_last']:.4g}; it "
        "should decrease on a toy set (check the labels mask and the learning rate)",
    )


@_check("policy_optimiser", SUPPORTS_SFT)
def check_sft_checkpoint_loads_in_hf(ctx: CheckContext) -> None:
    """The SFT checkpoint is an HF folder that the bundled ``hf`` generator loads."""
    report, out = _sft(ctx)
    _hf_on(ctx, _checkpoint(report, out), "SFT")


class LengthReward:
    """A fixed reward for the RL checks: longer responses score higher. Needs no model."""

    capabilities: frozenset[str] = frozenset()

    def fit(self, labelled: Sequence[LabelledComparison], out: Path) -> FitReport:
        return FitReport(str(out))

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [len(s.response) / 10.0 for s in samples]

    def load(self, path: Path) -> None:
        return None


#: Settings for one short PPO update, applied to the fields an optimiser's config has:
#: the ``[policy_optimiser.ppo]`` table of :mod:`caikit_core.training.settings`, or the
#: same settings as flat fields of a config that has them.
PPO_SETTINGS: dict[str, Any] = {
    "algorithm": "ppo",
    "ppo": {
        "steps": 1,
        "rollout_batch_size": 2,
        "mini_batch_size": 2,
        "epochs": 1,
        "max_new_tokens": 4,
    },
    "ppo_steps": 1,
    "rollout_batch_size": 2,
    "mini_batch_size": 2,
    "ppo_epochs": 1,
    "max_new_tokens": 4,
}


def _ppo(ctx: CheckContext) -> tuple[Any, Path]:
    """One short PPO run from the base model against :class:`LengthReward` (cached)."""
    if "ppo" not in ctx.cache:
        optimiser = _tuned(ctx, PPO_SETTINGS)
        policy = str(ctx.base_model())
        prompts = [Prompt(f"p{i}", conversation(("user", q))) for i, q in enumerate(_QUESTIONS[:2])]
        out = ctx.path("ppo")
        report = optimiser.optimise(policy, policy, LengthReward(), prompts, [], out)
        ctx.cache["ppo"] = (report, out)
    result: tuple[Any, Path] = ctx.cache["ppo"]
    return result


@_check("policy_optimiser", SUPPORTS_PPO)
def check_ppo_reports_zero_kl_before_update(ctx: CheckContext) -> None:
    """One PPO step reports ``kl_last``, which is 0 (the policy is not updated yet)."""
    report, _ = _ppo(ctx)
    metrics = _metrics(report)
    if "kl_last" not in metrics:
        raise CheckSkipped("FitReport.metrics has no kl_last to read")
    kl = metrics["kl_last"]
    _expect(
        isinstance(kl, float) and math.isfinite(kl) and abs(kl) <= 1e-6,
        f"after one PPO step kl_last is {kl!r}; the first rollout comes from the unchanged "
        "policy, so its KL to the reference (the same checkpoint) must be 0",
    )


@_check("policy_optimiser", SUPPORTS_PPO)
def check_ppo_checkpoint_loads_in_hf(ctx: CheckContext) -> None:
    """The PPO checkpoint is an HF folder that the bundled ``hf`` generator loads."""
    report, out = _ppo(ctx)
    _hf_on(ctx, _checkpoint(report, out), "PPO")


#: Settings for a short preference-loss (DPO) run, applied to the fields an optimiser's
#: config has (an optimiser that does several things picks its algorithm by config).
PREFERENCE_LOSS_SETTINGS: dict[str, Any] = {"algorithm": "dpo"}

#: (question, helpful answer, refusal): the helpful answer is preferred.
_PREFERENCES = (
    ("What is the capital of France?", "The capital of France is Paris.", "I will not say."),
    ("How do I bake bread?", "You need flour, water, salt and yeast.", "I would rather not."),
    ("Say something nice.", "You are welcome here.", "No."),
)


def toy_preferences() -> list[LabelledComparison]:
    """Helpful-vs-refusal pairs in both option orders, soft-labelled 0.9 for the helpful one."""
    out = []
    for i, (question, good, bad) in enumerate(_PREFERENCES):
        pid = f"pref-p{i}"
        messages = conversation(("user", question))
        for order, (a, b, p_a) in enumerate(((good, bad, 0.9), (bad, good, 0.1))):
            cid = f"pref-{i}-{order}"
            label = PreferenceLabel(f"l-{cid}", cid, p_a, "kit")
            out.append(LabelledComparison(Comparison(cid, pid, messages, a, b), label))
    return out


def _preference_fit(ctx: CheckContext) -> tuple[Any, Path]:
    """A short preference-loss run from the base model on :func:`toy_preferences` (cached).

    It is called as the pipeline calls it: the same policy and reference, a reward
    (which a preference loss need not use), the prompts and the labelled pairs.
    """
    if "preference-loss" not in ctx.cache:
        optimiser = _tuned(ctx, PREFERENCE_LOSS_SETTINGS)
        policy = str(ctx.base_model())
        items = toy_preferences()
        prompts = list(
            {
                lc.comparison.prompt_id: Prompt(lc.comparison.prompt_id, lc.comparison.messages)
                for lc in items
            }.values()
        )
        out = ctx.path("preference-loss")
        report = optimiser.optimise(policy, policy, LengthReward(), prompts, items, out)
        ctx.cache["preference-loss"] = (report, out)
    result: tuple[Any, Path] = ctx.cache["preference-loss"]
    return result


@_check("policy_optimiser", SUPPORTS_PREFERENCE_LOSS)
def check_preference_loss_decreases(ctx: CheckContext) -> None:
    """A preference loss on toy pairs goes down (``loss_first``/``loss_last``), and the
    chosen-over-rejected reward margin it reports (``margin_last``, if any) is positive."""
    report, _ = _preference_fit(ctx)
    metrics = _metrics(report)
    if "loss_first" not in metrics or "loss_last" not in metrics:
        raise CheckSkipped("FitReport.metrics has no loss_first/loss_last to compare")
    first, last = metrics["loss_first"], metrics["loss_last"]
    _expect(
        math.isfinite(last) and last < first,
        f"the preference loss went from {first:.4g} to {last:.4g} on {len(toy_preferences())} "
        "toy pairs; it should decrease (check that chosen and rejected are not swapped, the "
        "learning rate, and that the policy, not the reference, is trained)",
    )
    if "margin_last" in metrics:
        margin = metrics["margin_last"]
        _expect(
            math.isfinite(margin) and margin > 0.0,
            f"margin_last is {margin:.4g} after training; the implicit reward of the chosen "
            "responses should exceed the rejected ones' (it starts at 0, policy = reference)",
        )


@_check("policy_optimiser", SUPPORTS_PREFERENCE_LOSS)
def check_preference_loss_checkpoint_loads_in_hf(ctx: CheckContext) -> None:
    """The preference-loss checkpoint is an HF folder that the ``hf`` generator loads."""
    report, out = _preference_fit(ctx)
    _hf_on(ctx, _checkpoint(report, out), "preference-loss")


def _chosen_margin(generator: Any) -> float:
    """Mean of log P(chosen) - log P(rejected) over the toy pairs, by ``generator.score``."""
    requests = [
        ScoreRequest(f"pref-{i}", conversation(("user", q)), (good, bad))
        for i, (q, good, bad) in enumerate(_PREFERENCES)
    ]
    scores = generator.score(requests)
    return float(sum(s.logprobs[0] - s.logprobs[1] for s in scores) / len(scores))


@_check("policy_optimiser", SUPPORTS_PREFERENCE_LOSS)
def check_preference_loss_raises_chosen_margin(ctx: CheckContext) -> None:
    """After training, the checkpoint prefers the chosen responses more than the starting
    policy did: log P(chosen) - log P(rejected), scored by the ``hf`` generator, goes up."""
    from caikit_core.testing.fixtures import hf_generator

    report, out = _preference_fit(ctx)
    try:
        after_generator = _hf_on(ctx, _checkpoint(report, out), "preference-loss")
    except CheckFailed as exc:
        raise CheckSkipped(
            "the checkpoint does not load in the hf generator (see "
            "check_preference_loss_checkpoint_loads_in_hf)"
        ) from exc
    before = _chosen_margin(hf_generator(ctx.base_model()))
    after = _chosen_margin(after_generator)
    _expect(
        after > before,
        f"log P(chosen) - log P(rejected), averaged over the toy pairs, went from {before:.4g} "
        f"under the starting policy to {after:.4g} under the checkpoint; training on pairs "
        "labelled for the chosen response should raise it (check which response is chosen: "
        "A when p_a > 0.5, B when p_a < 0.5)",
    )


# --- executor --------------------------------------------------------------------------
# The workers below are module-level classes handed over as WorkerSpecs, as the runner
# hands over a stage's worker: an executor that ships them to other processes or
# machines can pickle them.


class KitSquare:
    """Squares each item."""

    def __call__(self, batch: list[int]) -> list[int]:
        return [x * x for x in batch]


class KitSlowEarly:
    """Adds one; early batches take longest, so a parallel executor finishes them last."""

    def __call__(self, batch: list[int]) -> list[int]:
        time.sleep(0.02 * max(0, 5 - batch[0]) if batch else 0)
        return [x + 1 for x in batch]


class KitBoom(RuntimeError):
    """The error the exception-propagation check raises inside the worker."""


class KitBoomWorker:
    """Raises :class:`KitBoom` on the batch holding record 7."""

    def __call__(self, batch: list[int]) -> list[int]:
        if 7 in batch:
            raise KitBoom("kit-boom on record 7")
        return batch


class KitWhoAmI:
    """Tags every item with this process and this worker instance."""

    def __init__(self, *, tag: str) -> None:
        self.token = f"{tag}-{os.getpid()}-{id(self)}-{random.random()}"

    def __call__(self, batch: list[int]) -> list[str]:
        return [f"{os.getpid()}:{self.token}" for _ in batch]


def _keyed(*batches: list[int]) -> dict[tuple[int, int], list[int]]:
    """Batches under keys shaped like the runner's: ``(shard, offset)`` tuples."""
    return {(i, 0): batch for i, batch in enumerate(batches)}


def _run_map(
    ctx: CheckContext, worker: type, batches: dict[tuple[int, int], list[int]], **kwargs: Any
) -> list[tuple[Any, list[Any]]]:
    from caikit_core.stages.base import WorkerSpec

    total = sum(len(b) for b in batches.values())
    result = ctx.instance.map(
        WorkerSpec(worker, kwargs), iter(batches.items()), total=total, describe="conformance"
    )
    return [(key, list(out)) for key, out in result]


def _by_key(ctx: CheckContext, got: list[tuple[Any, list[Any]]]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = {}
    for key, value in got:
        _expect(
            key not in out or out[key] == value,
            f"map yielded key {key!r} twice with different outputs {out.get(key)!r} and "
            f"{value!r}; a retried batch must give the same records",
        )
        out[key] = value
    return out


@_check("executor")
def check_executor_matches_local(ctx: CheckContext) -> None:
    """Each key's outputs equal the worker's outputs for that batch (as ``local`` gives)."""
    batches = _keyed([1, 2, 3], [4], [5, 6], [])
    expected = {k: KitSquare()(b) for k, b in batches.items()}
    got = _by_key(ctx, _run_map(ctx, KitSquare, batches))
    _expect(
        got == expected,
        f"map gave {got!r}, expected {expected!r}; yield (key, worker(batch)) for every "
        "(key, batch) given",
    )


@_check("executor")
def check_executor_results_keyed(ctx: CheckContext) -> None:
    """Outputs come back under their own batch's key, whatever order batches finish in."""
    batches = _keyed(*([i] for i in range(6)))
    got = _by_key(ctx, _run_map(ctx, KitSlowEarly, batches))
    expected = {(i, 0): [i + 1] for i in range(6)}
    _expect(
        got == expected,
        f"map yielded {got!r}, expected {expected!r}; pair each output with the key its "
        "batch came with",
    )


@_check("executor")
def check_executor_builds_worker_once_per_process(ctx: CheckContext) -> None:
    """A process builds the stage's worker once and maps all its batches with it (a
    worker loads models when built)."""
    batches = _keyed(*([i, i] for i in range(8)))
    got = _by_key(ctx, _run_map(ctx, KitWhoAmI, batches, tag="kit"))
    tokens: dict[str, set[str]] = {}
    for out in got.values():
        for item in out:
            pid, token = item.split(":", 1)
            tokens.setdefault(pid, set()).add(token)
    many = {pid: len(t) for pid, t in tokens.items() if len(t) > 1}
    _expect(
        not many and len(got) == len(batches),
        f"workers built per process: {many}; call WorkerSpec.build() once per process "
        "(or actor) and reuse the built worker for every batch it runs",
    )


@_check("executor")
def check_executor_empty(ctx: CheckContext) -> None:
    """Mapping over no batches yields nothing."""
    _expect(_run_map(ctx, KitSquare, {}) == [], "map over no batches must yield nothing")


@_check("executor")
def check_executor_propagates_exceptions(ctx: CheckContext) -> None:
    """A failing batch's error reaches the caller with its key, so the runner can
    name the batch's records."""
    from caikit_core.stages.base import BatchFailed

    try:
        _run_map(ctx, KitBoomWorker, _keyed([1, 2], [7, 8], [9]))
    except Exception as exc:
        failure = exc if isinstance(exc, BatchFailed) else exc.__cause__
        _expect(
            isinstance(failure, BatchFailed) and failure.key == (1, 0),
            f"map raised {exc!r}; re-raise the BatchFailed that the built worker raises "
            "(it carries the batch's key), or chain it as the cause",
        )
        _expect(
            "kit-boom" in str(failure),
            f"map raised {exc!r}, which hides the worker's error; keep its message",
        )
        return
    raise CheckFailed("a batch raised but map finished normally; let its exception propagate")
