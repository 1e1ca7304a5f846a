"""The core's tests: the shared fixtures come from :mod:`tests.shared` (registered by the
root conftest.py); its helpers are re-exported here for ``from tests.conftest import``."""

from __future__ import annotations

from tests.shared import (
    ECHO_RUN,
    FIXTURES,
    PROMPTS,
    ROOT,
    SHARED_DATA,
    pip_install_target,
    run_cli,
)

__all__ = [
    "ECHO_RUN",
    "FIXTURES",
    "PROMPTS",
    "ROOT",
    "SHARED_DATA",
    "pip_install_target",
    "run_cli",
]
