"""The ``openai`` generator's registration and settings.

This module is what the ``caikit`` entry point names. It imports nothing beyond
caikit and the standard library; :mod:`caikit_openai.generator` is imported when
the factory runs.

The API key is never a setting: :attr:`OpenAIConfig.api_key_env` names the
environment variable that holds it, and the generator reads that variable on
each request. So the key appears in no run file, manifest, repr or log line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from caikit_core.hookspecs import Register, hookimpl
from caikit_core.interfaces import SEEDED

from caikit_openai.config import PREFIX_MODES, OpenAIConfig

if TYPE_CHECKING:
    from caikit_openai.generator import OpenAIGenerator

__all__ = ["PREFIX_MODES", "OpenAIConfig", "build_generator", "register_generators"]


def build_generator(config: OpenAIConfig, *, model: str) -> OpenAIGenerator:
    """Talk to the OpenAI-compatible server at ``base_url``, asking for ``model``.

    ``model`` is sent as the request's ``model`` field (the name the server serves
    the model under, e.g. vLLM's ``--served-model-name``).
    """
    from caikit_openai.generator import OpenAIGenerator

    return OpenAIGenerator(config, model=model)


@hookimpl
def register_generators(register: Register) -> None:
    """Register the ``openai`` generator."""
    register(
        "openai",
        build_generator,
        config=OpenAIConfig,
        capabilities={SEEDED},
        description="an OpenAI-compatible chat-completions server (vLLM, llama.cpp, ...)",
    )
