"""In-process fixtures for the conformance kit: a tiny model, an ``hf`` generator on it.

Everything is built offline and cached per process (the tiny model in a temporary
folder), so plugin authors need no hub access. torch is imported only when a model
is built.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from caikit_core.constitution import Constitution

__all__ = ["default_constitution", "hf_generator", "tiny_model"]

_cache: dict[str, Any] = {}


def tiny_model() -> Path:
    """A tiny random Llama checkpoint (built once per process in a temporary folder).

    Its context (2048 positions) fits the default constitution's prompts.
    """
    path = _cache.get("tiny_model")
    if path is None:
        from caikit_core.testing.tiny_models import build_tiny_llama

        folder = Path(tempfile.mkdtemp(prefix="caikit-kit-")) / "tiny-llama"
        path = build_tiny_llama(folder, seed=0, max_position_embeddings=2048)
        _cache["tiny_model"] = path
    assert isinstance(path, Path)
    return path


def tiny_generator_model() -> Path:
    """The model the generator checks build a registered generator on: the tiny Llama
    with attention heads of size 32 (hidden 64, 2 heads), which vLLM's CPU kernels
    support (they lack the default's size 8), so ``caikit check generator vllm`` runs
    on a CPU."""
    path = _cache.get("tiny_generator_model")
    if path is None:
        from caikit_core.testing.tiny_models import build_tiny_llama

        folder = Path(tempfile.mkdtemp(prefix="caikit-kit-")) / "tiny-llama-h32"
        path = build_tiny_llama(
            folder,
            seed=0,
            hidden_size=64,
            heads=2,
            kv_heads=1,
            intermediate_size=128,
            max_position_embeddings=2048,
        )
        _cache["tiny_generator_model"] = path
    assert isinstance(path, Path)
    return path


def hf_generator(model: Path | None = None) -> Any:
    """The bundled ``hf`` generator on ``model`` (the tiny model by default), on CPU."""
    folder = str(model if model is not None else tiny_model())
    key = f"hf:{folder}"
    if key not in _cache:
        from caikit_core.plugins import get_registry

        spec = get_registry().get("generator", "hf")
        assert spec.config_cls is not None
        _cache[key] = spec.build(spec.config_cls(device="cpu"), model=folder)
    return _cache[key]


def default_constitution() -> Constitution:
    """The constitution caikit ships (``load_constitution(None)``)."""
    if "constitution" not in _cache:
        from caikit_core.constitutions import load_constitution

        _cache["constitution"] = load_constitution(None)
    constitution = _cache["constitution"]
    assert isinstance(constitution, Constitution)
    return constitution
