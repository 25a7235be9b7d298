"""LayerNorm with a written-out gradient: the kernel behind `flax_impl.norm.LayerNorm`.

Why it exists (docs/design.md#layernorm): autodiff of the two-pass formula keeps four (..., D) float32 arrays
per norm for the backward pass, which a scan over layers stacks and copies every step; this gradient keeps x and
the per-row mean and 1/std and recomputes the normalised values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _layer_norm_fwd(
    x: jax.Array, scale: jax.Array, bias: jax.Array | None, epsilon: float, dtype: jnp.dtype
) -> tuple[jax.Array, tuple]:
    x32 = x.astype(jnp.float32)  # (..., D)
    mean = jnp.mean(x32, axis=-1, keepdims=True)  # (..., 1)
    centred = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)  # (..., 1)
    y = centred * rstd * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(epsilon: float, dtype: jnp.dtype, residuals: tuple, g: jax.Array) -> tuple:
    """dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)) with xh the normalised x and dxh = g * scale."""
    x, mean, rstd, scale, bias = residuals
    g32 = g.astype(jnp.float32)
    xh = (x.astype(jnp.float32) - mean) * rstd
    dxh = g32 * scale.astype(jnp.float32)
    dx = rstd * (dxh - jnp.mean(dxh, axis=-1, keepdims=True) - xh * jnp.mean(dxh * xh, axis=-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    dscale = jnp.sum(g32 * xh, axis=rows).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(g32, axis=rows).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array | None, epsilon: float, dtype: jnp.dtype
) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, in float32, with a written-out gradient.

    Args:
        x: (..., D).
        scale: (D,).
        bias: (D,), or None for no bias.
        epsilon: added to the biased variance.
        dtype: the output dtype.

    Returns:
        (..., D) in `dtype`. The gradient w.r.t. x comes back in x's dtype, scale's and bias' in theirs.
    """
    return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
