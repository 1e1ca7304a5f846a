"""The jax plugins' tests compile into a temporary cache, never the user's
(``$CAIKIT_CACHE/jax-compilation``, :mod:`caikit_jax.compilation`)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("CAIKIT_JAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="caikit-xla-"))
