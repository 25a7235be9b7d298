"""Small helpers for the torch twin."""

import numpy as np
import torch
from torch import nn


def count_params(module: nn.Module) -> int:
    """Number of scalars in `module`'s parameters (trainable or not).

    Args:
        module: any module.

    Returns:
        The count, equal to flax_impl.utils.count_params of the twin.
    """
    return sum(p.numel() for p in module.parameters())


def from_numpy_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy arrays (e.g. `flax_impl.to_numpy_state_dict(model)`) as CPU tensors, for `module.load_state_dict`.

    The bridge between the twins: the Flax side hands over numpy, this side makes tensors, so neither package
    imports the other's framework.

    Args:
        state_dict: {key: array}, keys as the twin's `state_dict()`.

    Returns:
        {key: tensor} with the arrays' values and dtypes (copies, writable).
    """
    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
