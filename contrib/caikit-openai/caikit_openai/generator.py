"""The ``openai`` generator: requests to an OpenAI-compatible ``/chat/completions``.

Each :class:`~caikit_core.records.GenerationRequest` becomes one POST to
``{base_url}/chat/completions`` with ``model``, ``messages``, ``n``, ``seed``,
``max_tokens``, ``temperature``, ``top_p`` and (when given) ``stop``; up to
``concurrency`` requests run at once, and the results come back in request order
with the server's choices sorted by ``index``.

Finish reasons are mapped to caikit's: ``"length"`` is ``length``; ``"stop"`` is
``stop`` when the server names the stop string that ended the text (vLLM's
``stop_reason``) and ``eos`` otherwise; anything else (e.g. ``"content_filter"``)
is ``stop`` with a warning.

Only the standard library is used (:mod:`urllib.request`). The API key is read
from the environment on every request and kept in no attribute.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from caikit_core.errors import PluginError
from caikit_core.interfaces import SEEDED
from caikit_core.records import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    GenerationRequest,
    Score,
    ScoreRequest,
)

from caikit_openai.config import OpenAIConfig

__all__ = ["OpenAIGenerator"]

logger = logging.getLogger("caikit.openai")

#: HTTP statuses worth another attempt.
_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: The longest wait a ``Retry-After`` header may impose, in seconds.
_MAX_RETRY_AFTER = 30.0
#: How much of a server's error message is quoted in an error.
_MAX_DETAIL = 300


class OpenAIGenerator:
    """A model behind an OpenAI-compatible server, in the ``Generator`` role.

    :param config: the plugin settings.
    :param model: the model name sent in each request's ``model`` field.
    """

    capabilities: frozenset[str] = frozenset({SEEDED})

    def __init__(self, config: OpenAIConfig, *, model: str) -> None:
        self.config = config
        self.model = model
        self.url = config.base_url.rstrip("/") + "/chat/completions"

    def __repr__(self) -> str:
        return f"OpenAIGenerator(model={self.model!r}, url={self.url!r})"

    # --- the role ---------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """``n`` completions per request, in request order.

        :raises PluginError: the server could not be reached, answered with an HTTP
            error (after the retries), or sent something that is not a chat completion.
        """
        requests = list(requests)
        if not requests:
            return []
        workers = min(self.config.concurrency, len(requests))
        if workers == 1:
            return [self._generate_one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caikit-openai") as pool:
            return list(pool.map(self._generate_one, requests))

    def score(self, requests: Sequence[ScoreRequest]) -> list[Score]:
        """Not supported: this generator does not declare the ``score`` capability."""
        raise PluginError("openai generator: score() is not supported (no 'score' capability)")

    # --- one request ------------------------------------------------------------------

    def payload(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body sent for ``request``."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {}
        prefix = request.response_prefix
        if prefix and self.config.prefix_mode == "prefill":
            messages.append({"role": "assistant", "content": prefix})
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        elif prefix:
            note = f"Begin your answer with exactly: {prefix}"
            if messages:
                last = messages[-1]
                messages[-1] = {"role": last["role"], "content": f"{last['content']}\n\n{note}"}
            else:
                messages.append({"role": "user", "content": note})
        sampling = request.sampling
        body.update(
            {
                "model": self.model,
                "messages": messages,
                "n": request.n,
                "seed": request.seed,
                "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
            }
        )
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return body

    def _generate_one(self, request: GenerationRequest) -> Generation:
        if request.n < 1:
            return Generation(request.id, ())
        data = self._post(self.payload(request), request.id)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) != request.n:
            found = len(choices) if isinstance(choices, list) else "no"
            raise PluginError(
                f"openai generator: {self.url} returned {found} choices for request "
                f"{request.id!r}, expected n={request.n} (does the server support 'n'?)"
            )
        ordered = sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        texts: list[str] = []
        reasons: list[str] = []
        warnings: list[str] = []
        for i, choice in enumerate(ordered):
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise PluginError(
                    f"openai generator: {self.url} returned a non-text message for request "
                    f"{request.id!r}"
                )
            prefix = request.response_prefix
            if prefix and self.config.prefix_mode == "instruct":
                stripped = content.lstrip()
                if stripped.startswith(prefix):
                    content = stripped[len(prefix) :]
                else:
                    warnings.append(f"completion {i} does not start with the response prefix")
            reason, warning = _finish_reason(choice)
            if warning:
                warnings.append(f"completion {i}: {warning}")
            texts.append(content)
            reasons.append(reason)
        return Generation(request.id, tuple(texts), tuple(reasons), tuple(warnings))

    # --- HTTP -------------------------------------------------------------------------

    def _headers(self) -> tuple[dict[str, str], str]:
        """The request headers, and the key they carry ("" when none)."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.config.api_key_env, "") if self.config.api_key_env else ""
        key = key.strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers, key

    def _post(self, body: dict[str, Any], request_id: str) -> Any:
        """POST ``body`` as JSON and return the decoded answer, retrying transient failures."""
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        attempts = self.config.max_retries + 1
        problem = ""
        for attempt in range(attempts):
            headers, key = self._headers()
            logger.debug(
                "POST %s (request %s, attempt %d/%d)", self.url, request_id, attempt + 1, attempts
            )
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            wait = self.config.retry_backoff * (2**attempt)
            try:
                with urllib.request.urlopen(req, timeout=self.config.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as exc:
                detail = _scrub(_error_detail(exc), key)
                problem = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
                if exc.code not in _RETRY_STATUSES:
                    break
                wait = _retry_after(exc, wait)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                problem = _scrub(f"connection failed: {reason}", key)
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise PluginError(
                        f"openai generator: POST {self.url} returned a body that is not JSON "
                        f"(request {request_id!r})"
                    ) from None
            if attempt + 1 < attempts:
                logger.warning(
                    "openai generator: POST %s failed (%s); retrying in %.1f s",
                    self.url,
                    problem,
                    wait,
                )
                time.sleep(wait)
        raise PluginError(
            f"openai generator: POST {self.url} failed for request {request_id!r}: {problem}"
        )


def _finish_reason(choice: dict[str, Any]) -> tuple[str, str]:
    """caikit's finish reason for an OpenAI choice, and a warning ("" when none)."""
    reason = choice.get("finish_reason")
    if reason == "length":
        return FINISH_LENGTH, ""
    if reason == "stop" or reason is None:
        return (FINISH_STOP if isinstance(choice.get("stop_reason"), str) else FINISH_EOS), ""
    return FINISH_STOP, f"the server's finish reason was {reason!r}"


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        raw = exc.read().decode("utf-8", errors="replace")
    except Exception:
        return str(exc.reason or "")
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            raw = error["message"]
        elif isinstance(error, str):
            raw = error
        elif isinstance(parsed.get("message"), str):
            raw = parsed["message"]
    raw = " ".join(raw.split())
    return raw[:_MAX_DETAIL] + ("..." if len(raw) > _MAX_DETAIL else "")


def _scrub(text: str, key: str) -> str:
    """``text`` with the API key (should a server echo it) masked."""
    return text.replace(key, "***") if key else text


def _retry_after(exc: urllib.error.HTTPError, default: float) -> float:
    """The wait a numeric ``Retry-After`` header asks for, else ``default``."""
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return min(max(float(value), 0.0), _MAX_RETRY_AFTER) if value else default
    except ValueError:
        return default
