"""caikit-openai: a caikit generator backed by an OpenAI-compatible HTTP server.

The ``openai`` generator sends each :class:`caikit_core.records.GenerationRequest`
to ``{base_url}/chat/completions`` (vLLM, llama.cpp's ``llama-server``, or any
server speaking the OpenAI chat-completions API). See :mod:`caikit_openai.plugin`
for its settings and :mod:`caikit_openai.generator` for the wire format.
"""

from __future__ import annotations

__version__ = "0.1.0"
