"""The feed-forward recompute region: the kernel behind `flax_impl.block.TransformerBlock.feed_forward`.

Why it exists (docs/design.md#feed-forward): the backward pass recomputes dropout(activation(h)) from the hidden
h (B, L, F) and the packed keep bits, so training keeps one (B, L, F) array per block instead of two.
"""

from __future__ import annotations

import jax
from flax import nnx

from flax_impl._kernels.dropout import apply_keep_bits


@nnx.remat(static_argnums=(4,))  # the backward pass recomputes it from h and the bits
def activation_dropout_linear(
    activation: nnx.Module, linear: nnx.Linear, h: jax.Array, bits: jax.Array | None, rate: float
) -> jax.Array:
    """linear(dropout(activation(h))), recomputed in the backward pass from h and the packed bits.

    Args:
        activation: the block's activation module.
        linear: the second feed-forward Linear, F -> D.
        h: (B, L, F), the first Linear's output.
        bits: `keep_bits(key, rate, h.shape)`, uint8 (B, L, ceil(F / 8)), or None for no dropout.
        rate: the dropout rate the bits were drawn with.

    Returns:
        (B, L, D).
    """
    a = activation(h)
    return linear(a if bits is None else apply_keep_bits(a, bits, rate))
