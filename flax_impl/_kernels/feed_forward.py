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
    """linear(dropout(activation(h))), the keep mask given packed (None: no dropout): (B, L, F) -> (B, L, D)."""
    a = activation(h)
    return linear(a if bits is None else apply_keep_bits(a, bits, rate))
