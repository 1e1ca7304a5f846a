"""caikit's vLLM generator (the ``vllm`` plugin).

Importing this package does not import vllm or torch; :class:`VLLMGenerator` is
loaded on first access (and needs the vLLM environment, ``make setup-vllm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caikit_vllm.config import VLLMGeneratorConfig
from caikit_vllm.plugin import build_generator

if TYPE_CHECKING:
    from caikit_vllm.generator import VLLMGenerator

__all__ = ["VLLMGenerator", "VLLMGeneratorConfig", "build_generator"]


def __getattr__(name: str) -> Any:
    """Import :class:`VLLMGenerator` (and with it vllm and torch) only when asked for."""
    if name == "VLLMGenerator":
        from caikit_vllm.generator import VLLMGenerator

        return VLLMGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
