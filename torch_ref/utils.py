"""Small helpers for the torch twin."""

from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of trainable scalars in `module`."""
    return sum(p.numel() for p in module.parameters())
