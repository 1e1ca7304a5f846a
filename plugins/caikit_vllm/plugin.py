"""The ``vllm`` generator: vLLM's offline ``LLM`` engine, run in-process.

This module is what the ``caikit`` entry point names. It holds the plugin's
factory and registration (the settings are :mod:`caikit_vllm.config`'s
:class:`VLLMGeneratorConfig`, re-exported here), and imports neither vllm nor
torch: :mod:`caikit_vllm.generator` imports them when the factory runs.

vLLM pins its own torch and transformers, so it is installed in an environment
of its own (``make setup-vllm`` makes ``.venv-vllm``); in any other environment
the factory raises one :class:`~caikit_core.errors.PluginError` saying so.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from caikit_core.errors import PluginError
from caikit_core.hookspecs import Register, hookimpl
from caikit_core.interfaces import CAN_SCORE, ROLLOUTS, SEEDED
from caikit_vllm.config import DTYPES, TRUNCATION_POLICIES, VLLMGeneratorConfig

if TYPE_CHECKING:
    from caikit_vllm.generator import VLLMGenerator

__all__ = [
    "DTYPES",
    "MISSING_VLLM",
    "TRUNCATION_POLICIES",
    "VLLMGeneratorConfig",
    "build_generator",
    "register_generators",
    "vllm_missing",
]

#: The error of ``plugin = "vllm"`` where vLLM is not installed.
MISSING_VLLM = (
    "vllm generator: vLLM is not installed in this Python environment. vLLM pins its own "
    "torch and transformers, so it has an environment of its own: make it with "
    "`make setup-vllm` (it creates .venv-vllm) and run caikit from there "
    "(.venv-vllm/bin/caikit)"
)


def vllm_missing() -> str | None:
    """The preflight: why vLLM cannot run here (not installed), or ``None``."""
    if importlib.util.find_spec("vllm") is None:
        return MISSING_VLLM.removeprefix("vllm generator: ")
    return None


def build_generator(config: VLLMGeneratorConfig, *, model: str) -> VLLMGenerator:
    """Start a vLLM engine on ``model`` (a local checkpoint folder or a hub id).

    :raises caikit_core.errors.PluginError: vLLM is not installed here (the message
        names ``make setup-vllm``), the folder is missing, or vLLM cannot load the
        model from it.
    """
    if importlib.util.find_spec("vllm") is None:
        raise PluginError(MISSING_VLLM)
    from caikit_vllm.generator import VLLMGenerator

    return VLLMGenerator(config, model=model)


@hookimpl
def register_generators(register: Register) -> None:
    """Register the ``vllm`` generator."""
    register(
        "vllm",
        build_generator,
        config=VLLMGeneratorConfig,
        capabilities={CAN_SCORE, ROLLOUTS, SEEDED},
        preflight=vllm_missing,
        description="vLLM offline engine (local folder or hub id), in-process; needs .venv-vllm",
        # Small enough for the kit on a CPU: fp32 like the hf generator's checks, no
        # CUDA graphs or compilation (a start in under a minute), a small KV cache.
        check_settings={
            "dtype": "float32",
            "enforce_eager": True,
            "gpu_memory_utilization": 0.3,
        },
    )
