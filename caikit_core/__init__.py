"""caikit: Constitutional AI as a plugin framework.

The core imports no machine-learning framework; plugins import theirs inside
their factories.
"""

from __future__ import annotations

from caikit_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
