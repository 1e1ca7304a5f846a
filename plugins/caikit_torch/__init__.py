"""caikit's PyTorch backend (the ``torch`` plugins): SFT, PPO, DPO, RLOO/GRPO and a
soft-label preference model, with TRL where TRL has the trainer.

Importing this package does not import torch, transformers or TRL;
:class:`TorchOptimiser` is loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from caikit_torch.plugin import TorchOptimiserConfig, build_optimiser

if TYPE_CHECKING:
    from caikit_torch.optimiser import TorchOptimiser

__all__ = ["TorchOptimiser", "TorchOptimiserConfig", "build_optimiser"]


def __getattr__(name: str) -> Any:
    """Import :class:`TorchOptimiser` (and with it torch) only when it is asked for."""
    if name == "TorchOptimiser":
        from caikit_torch.optimiser import TorchOptimiser

        return TorchOptimiser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
