"""Dropout's random bits, drawn once and packed: the kernels behind `flax_impl.dropout.Dropout`.

Why they exist (docs/design.md#dropout-bits): the keep mask is drawn as 32-bit integers and packed one bit per
element, so that XLA does not duplicate the random-bit generator into every consumer and the gradient keeps one
bit per element instead of a bool mask. Pure functions of a key, a rate and a shape.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def keep_bits(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Packed keep mask for an array of `shape` (..., n): uint8 (..., ceil(n / 8)), bit j of byte i = element 8i + j.

    Each element is kept by its own draw: 32 random bits u, kept if u < round((1 - rate) * 2^32), i.e. with
    probability 1 - rate to within 2^-32 (jax.random.bernoulli compares a float32 uniform instead: within 2^-23).
    The mask is packed (a sum over a trailing axis of 8) because XLA's CPU fusion duplicates a random-bit generator
    into every consumer, so an unpacked mask would be drawn twice per train step (forward and gradient), while a
    reduction is not duplicated (docs/design.md#dropout-bits).

    Args:
        key: a jax.random key.
        rate: the probability of dropping an element, in [0, 1].
        shape: the shape (..., n) of the array the mask is for; () is treated as (1,).

    Returns:
        uint8 (..., ceil(n / 8)): bit j of byte i is 1 if element 8i + j is kept.

    Raises:
        ValueError: `rate` outside [0, 1].
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"dropout rate={rate!r} must be a probability in [0, 1]")
    threshold = min(round((1.0 - rate) * 2.0**32), 2**32 - 1)
    shape = tuple(shape) or (1,)
    n = shape[-1]
    draws = jax.random.bits(key, shape[:-1] + (-(-n // 8), 8), jnp.uint32) < jnp.uint32(threshold)
    return jnp.sum(jnp.where(draws, _BIT_WEIGHTS, jnp.uint8(0)), axis=-1, dtype=jnp.uint8)  # (..., ceil(n/8))


def unpack_keep_bits(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`keep_bits`' packed uint8 (..., ceil(n / 8)) -> the bool keep mask of `shape` (..., n)."""
    full = tuple(shape) or (1,)
    if 0 in full:  # an empty array: nothing to unpack (a reshape to -1 has no answer for size 0)
        return jnp.zeros(shape, jnp.bool_)
    unpacked = (bits[..., None] >> _BIT_SHIFTS) & jnp.uint8(1)  # (..., ceil(n/8), 8)
    return unpacked.reshape(full[:-1] + (-1,))[..., : full[-1]].astype(jnp.bool_).reshape(shape)


def keep_scale(rate: float, dtype: jnp.dtype) -> float:
    """1 / (1 - rate) computed in float64 and rounded once to `dtype`, as torch does (0 for rate 1)."""
    return 0.0 if rate == 1.0 else float(np.asarray(1.0 / (1.0 - rate), dtype))


def apply_keep_bits(x: jax.Array, bits: jax.Array, rate: float) -> jax.Array:
    """where(keep, x * keep_scale(rate), 0) with the keep mask given packed (see `keep_bits`).

    Kept values are x * fl(1 / (1 - rate)), torch's arithmetic, so they equal torch's bit for bit. The gradient
    is where(keep, g * scale, 0) and keeps only the packed bits for it (one bit per element), where autodiff of
    a plain `where` keeps the unpacked bool mask, which a scan over layers stacks and copies every step.

    Args:
        x: (..., n).
        bits: `keep_bits(key, rate, x.shape)`, uint8 (..., ceil(n / 8)).
        rate: the rate the bits were drawn with.

    Returns:
        The shape and dtype of x.
    """
    return _apply_keep_bits(x, bits, keep_scale(rate, x.dtype))


def scale_kept(x: jax.Array, bits: jax.Array, scale: float) -> jax.Array:
    """where(keep, x * scale, 0), keep unpacked from `bits` to x's shape: the arithmetic of the dropout forward
    and of its gradient, for kernels that write their own backward (attention)."""
    return jnp.where(unpack_keep_bits(bits, x.shape), x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _apply_keep_bits(x: jax.Array, bits: jax.Array, scale: float) -> jax.Array:
    return scale_kept(x, bits, scale)


def _apply_keep_bits_fwd(x: jax.Array, bits: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    return scale_kept(x, bits, scale), bits


def _apply_keep_bits_bwd(scale: float, bits: jax.Array, g: jax.Array) -> tuple[jax.Array, None]:
    return scale_kept(g, bits, scale), None  # the integer bits get no cotangent


_apply_keep_bits.defvjp(_apply_keep_bits_fwd, _apply_keep_bits_bwd)


_BIT_SHIFTS = np.arange(8, dtype=np.uint8)
_BIT_WEIGHTS = np.left_shift(np.uint8(1), _BIT_SHIFTS)  # 1, 2, 4, ..., 128
