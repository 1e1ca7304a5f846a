"""The ``hf`` generator: a Hugging Face transformers causal LM, run in-process.

This module is what the ``caikit`` entry point names. It holds the plugin's
factory and registration (the settings are :mod:`caikit_hf.config`'s
:class:`HFGeneratorConfig`, re-exported here), and imports neither torch
nor transformers: those are imported by :mod:`caikit_hf.generator` when the
factory runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from caikit_core.hookspecs import Register, RegisterCommand, hookimpl
from caikit_core.interfaces import CAN_SCORE, ROLLOUTS, SEEDED
from caikit_hf.config import DTYPES, TRUNCATION_POLICIES, HFGeneratorConfig

if TYPE_CHECKING:
    from caikit_hf.generator import HFGenerator

__all__ = [
    "DTYPES",
    "TRUNCATION_POLICIES",
    "HFGeneratorConfig",
    "build_generator",
    "register_generators",
]


def build_generator(config: HFGeneratorConfig, *, model: str) -> HFGenerator:
    """Load ``model`` (a local checkpoint folder or a hub id) as a generator.

    :raises caikit_core.errors.PluginError: the folder is missing, or has no
        tokenizer or model that transformers can load.
    """
    from caikit_hf.generator import HFGenerator

    return HFGenerator(config, model=model)


@hookimpl
def register_generators(register: Register) -> None:
    """Register the ``hf`` generator."""
    register(
        "hf",
        build_generator,
        config=HFGeneratorConfig,
        capabilities={CAN_SCORE, ROLLOUTS, SEEDED},
        description="Hugging Face transformers causal LM (local folder or hub id), in-process",
        check_settings={"device": "cpu"},
    )


@hookimpl
def register_commands(register: RegisterCommand) -> None:
    """Add ``caikit models fetch|list|path`` (:mod:`caikit_hf.models`, imported here)."""
    from caikit_hf.models import register_models_command

    register_models_command(register)
