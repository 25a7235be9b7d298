"""Small helpers for the torch twin."""

from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of scalars in `module`'s parameters (trainable or not).

    Args:
        module: any module.

    Returns:
        The count, equal to flax_impl.utils.count_params of the twin.
    """
    return sum(p.numel() for p in module.parameters())
