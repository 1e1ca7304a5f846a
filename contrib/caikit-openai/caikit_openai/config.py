"""Settings of the ``openai`` generator (:class:`OpenAIConfig`).

:mod:`caikit_openai.plugin` registers it; :mod:`caikit_openai.generator` reads it.

The API key is never a setting: :attr:`OpenAIConfig.api_key_env` names the
environment variable that holds it, and the generator reads that variable on
each request. So the key appears in no run file, manifest, repr or log line.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import attrs
from caikit_core import validators
from caikit_core.converter import InvalidValue

__all__ = ["PREFIX_MODES", "OpenAIConfig"]

#: Accepted values of :attr:`OpenAIConfig.prefix_mode`.
PREFIX_MODES = ("prefill", "instruct")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def base_url(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        raise InvalidValue(attribute.name, f"expected a URL string, found {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValue(
            attribute.name,
            f"expected an http:// or https:// URL such as 'http://127.0.0.1:8000/v1', "
            f"found {value!r}",
        )
    if parts.username is not None or parts.password is not None:
        # Do not echo the value: it holds credentials.
        raise InvalidValue(
            attribute.name, "must not contain credentials; put the key in the api_key_env variable"
        )
    if parts.query or parts.fragment:
        raise InvalidValue(attribute.name, f"must not have a query or fragment, found {value!r}")


def env_name(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or (value and not _ENV_NAME.match(value)):
        raise InvalidValue(
            attribute.name,
            f"expected the name of an environment variable (or '' for no key), found {value!r}",
        )


@attrs.frozen
class OpenAIConfig:
    """Settings of the ``openai`` generator.

    :ivar base_url: the server's OpenAI API root, ending in ``/v1`` (vLLM:
        ``http://HOST:8000/v1``; llama.cpp's ``llama-server``: ``http://HOST:8080/v1``).
        Must not contain credentials.
    :ivar api_key_env: the name of the environment variable holding the API key,
        sent as ``Authorization: Bearer KEY``. When the variable is unset or empty,
        or this is ``""``, no ``Authorization`` header is sent (local servers).
    :ivar timeout: seconds to wait for one HTTP response.
    :ivar max_retries: extra attempts after a connection error, a timeout, or an
        HTTP 408, 409, 429 or 5xx answer. Other errors fail at once.
    :ivar retry_backoff: seconds before the first retry; doubled on each retry
        (a numeric ``Retry-After`` header, capped at 30 s, takes precedence).
    :ivar concurrency: how many requests are in flight at once (a thread pool).
    :ivar prefix_mode: how a request's ``response_prefix`` is sent. ``"prefill"``
        sends it as a final, open assistant message with vLLM's
        ``continue_final_message=true, add_generation_prompt=false`` (llama.cpp's
        server also continues a final assistant message): exact. ``"instruct"`` is
        for servers without prefill: it asks, at the end of the last message, for
        an answer starting with the prefix, and strips the prefix from the
        completions (with a warning on a completion that does not start with it).
    """

    base_url: str = attrs.field(default="http://127.0.0.1:8000/v1", validator=base_url)
    api_key_env: str = attrs.field(default="OPENAI_API_KEY", validator=env_name)
    timeout: float = attrs.field(default=120.0, validator=validators.positive_number)
    max_retries: int = attrs.field(default=2, validator=validators.non_negative_int)
    retry_backoff: float = attrs.field(default=0.5, validator=validators.non_negative_number)
    concurrency: int = attrs.field(default=4, validator=validators.positive_int)
    prefix_mode: str = attrs.field(default="prefill", validator=validators.one_of(PREFIX_MODES))
