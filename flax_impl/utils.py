"""Small helpers for the Flax side."""

import numpy as np
from flax import nnx


def count_params(module: nnx.Module) -> int:
    """Number of trainable scalars (nnx.Param) in `module`; a scanned stack counts every layer.

    Args:
        module: any module.

    Returns:
        The count, equal to torch_ref.utils.count_params of the twin.
    """
    return sum(int(np.prod(v[...].shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
