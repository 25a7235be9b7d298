"""Inverted dropout (Srivastava et al., 2014), with torch.nn.Dropout's semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Dropout(nnx.Module):
    """Zero each element with probability `rate`, scale the kept ones by 1 / (1 - rate).

    The scale is computed in float64 and rounded once to x.dtype, then multiplied (torch's arithmetic), so
    kept values equal torch's bit for bit and x / (1 - rate) to within half an ulp.

    Identity when deterministic (after `model.eval()`), in train mode (after `model.train()`) random; a
    `deterministic=` argument at call time overrides the mode. rate = 1 gives zeros, as torch does. Random bits
    come from the `dropout` stream of the `nnx.Rngs` given at construction: the same seed gives the same mask,
    each call advances the stream so successive calls draw fresh masks. Any shape in, same shape out.

    Example:
        >>> drop = Dropout(0.5, rngs=nnx.Rngs(dropout=0))
        >>> y = drop(jnp.ones((2, 8)))          # train mode: entries are 0 or 2
        >>> drop.eval(); drop(jnp.ones((2, 8)))  # identity
    """

    def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"dropout rate={rate!r} must be a probability in [0, 1]")
        self.rate = float(rate)
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork() if rngs is not None and rate > 0.0 else nnx.data(None)

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        if self.rngs is None:
            raise ValueError("Dropout in train mode needs rngs=nnx.Rngs(dropout=...) at construction")
        return dropout(x, self.rate, self.rngs())


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout of x (any shape) with the given key, 0 <= rate < 1: the function behind `Dropout`.

    Each element is kept with probability 1 - rate by its own Bernoulli draw (jax.random.bernoulli). The keep
    mask is packed eight elements to a uint8 by a sum over a trailing axis of 8, then unpacked where it is used.
    Why: XLA's CPU fusion treats the random-bit generator as cheap elementwise code and duplicates it into every
    consumer, so a plain mask was drawn twice per train step (in the forward select and again in its gradient);
    a reduction is not duplicated, so the bits are drawn once and the backward pass reads one bit per element.
    Measured on the 6 x 512 encoder's train step (CPU, B=4, L=512, unrolled layers): 1.12x torch eager against
    1.03x with the plain mask; no difference at B=8, L=128.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate={rate!r} must be in [0, 1) here (rate 1 gives zeros: see Dropout)")
    keep = 1.0 - rate
    shape = x.shape or (1,)
    n = shape[-1]
    draws = jax.random.bernoulli(key, p=keep, shape=shape[:-1] + (-(-n // 8), 8))  # (..., ceil(n/8), 8)
    packed = jnp.sum(jnp.where(draws, _BIT_WEIGHTS, jnp.uint8(0)), axis=-1, dtype=jnp.uint8)  # (..., ceil(n/8))
    bits = (packed[..., None] >> _BIT_SHIFTS) & jnp.uint8(1)  # (..., ceil(n/8), 8)
    mask = bits.reshape(shape[:-1] + (-1,))[..., :n].astype(jnp.bool_).reshape(x.shape)
    # x * fl(1 / keep), the scale rounded once from float64, as torch does: bit-equal kept values.
    return jnp.where(mask, x * jnp.asarray(1.0 / keep, x.dtype), jnp.zeros_like(x))


_BIT_SHIFTS = np.arange(8, dtype=np.uint8)
_BIT_WEIGHTS = np.left_shift(np.uint8(1), _BIT_SHIFTS)  # 1, 2, 4, ..., 128
