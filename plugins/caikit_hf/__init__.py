"""caikit's Hugging Face transformers generator (the ``hf`` plugin).

Importing this package does not import torch or transformers; :class:`HFGenerator`
is loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caikit_hf.config import HFGeneratorConfig
from caikit_hf.plugin import build_generator

if TYPE_CHECKING:
    from caikit_hf.generator import HFGenerator

__all__ = ["HFGenerator", "HFGeneratorConfig", "build_generator"]


def __getattr__(name: str) -> Any:
    """Import :class:`HFGenerator` (and with it torch) only when it is asked for."""
    if name == "HFGenerator":
        from caikit_hf.generator import HFGenerator

        return HFGenerator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
