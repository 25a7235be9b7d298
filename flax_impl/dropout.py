"""Inverted dropout (Srivastava et al., 2014), with torch.nn.Dropout's semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.dropout import apply_keep_bits, keep_bits as draw_keep_bits
from flax_impl.validation import check_bool, check_float


class Dropout(nnx.Module):
    """Zero each element with probability `rate`, scale the kept ones by 1 / (1 - rate).

    The scale is computed in float64 and rounded once to x.dtype, then multiplied (torch's arithmetic), so
    kept values equal torch's bit for bit and x / (1 - rate) to within half an ulp.

    Each element is kept by its own draw of 32 random bits, with probability 1 - rate to within 2^-32
    (`keep_bits`); the gradient keeps only that mask, packed one bit per element (`apply_keep_bits`).

    Identity when deterministic (after `model.eval()`), in train mode (after `model.train()`) random; a
    `deterministic=` argument at call time overrides the mode. Takes part in `nnx.view(model, deterministic=...)`
    (`set_view`): the view is a new module in that mode sharing the model's arrays and rng streams, the model's own
    mode unchanged. rate = 1 gives zeros, as torch does. Random bits
    come from the `dropout` stream of the `nnx.Rngs` given at construction: the same seed gives the same mask,
    each call advances the stream so successive calls draw fresh masks. Any shape in, same shape out.

    Args:
        rate: the probability of zeroing an element, in [0, 1].
        deterministic: the initial mode (False: train mode, random); `eval()` / `train()` set it.
        rngs: its `dropout` stream draws the masks. Needed for train mode with 0 < rate < 1; may be None otherwise.

    Raises:
        TypeError: `rate` not a number, `deterministic` not a bool (`ArgumentTypeError`).
        ValueError: `rate` is not a number in [0, 1].

    Example:
        >>> drop = Dropout(0.5, rngs=nnx.Rngs(dropout=0))
        >>> y = drop(jnp.ones((2, 8)))          # train mode: entries are 0 or 2
        >>> drop.eval(); drop(jnp.ones((2, 8)))  # identity
        >>> nnx.view(drop, deterministic=False).deterministic, drop.deterministic
        (False, True)
    """

    def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        self.rate = check_float("dropout rate", rate, low=0.0, high=1.0)
        self.deterministic = check_bool("deterministic", deterministic)
        self.rngs = rngs["dropout"].fork() if rngs is not None and rate > 0.0 else nnx.data(None)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Set the mode on the copy that `nnx.view(model, deterministic=...)` makes (as `nnx.Dropout.set_view`).

        Args:
            deterministic: True: identity; False: random; None: keep the mode.

        Raises:
            TypeError: `deterministic` is not a bool or None.
        """
        if deterministic is not None and not isinstance(deterministic, bool):
            raise TypeError(f"deterministic={deterministic!r} must be True, False or None")
        if deterministic is not None:
            self.deterministic = deterministic

    def __call__(self, x: jax.Array, *, deterministic: bool | None = None) -> jax.Array:
        """Apply dropout to x.

        Args:
            x: any shape (...), e.g. (B, L, D).
            deterministic: True for the identity, False for random; None: the layer's mode.

        Returns:
            The shape and dtype of x (an empty x is returned as it is, in any mode).

        Raises:
            ValueError: random mode with 0 < rate < 1 and no `rngs` given at construction.
            TypeError: `deterministic` not a bool or None.
        """
        deterministic = check_bool("deterministic", deterministic, none_ok=True)
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0 or x.size == 0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        return apply_keep_bits(x, self.keep_bits(x.shape), self.rate)

    def keep_bits(self, shape: tuple[int, ...], *, deterministic: bool | None = None) -> jax.Array | None:
        """A fresh packed keep mask, for fused kernels that apply the mask themselves (attention).

        Args:
            shape: the shape (..., n) of the array the mask is for, e.g. (B, N, L, S).
            deterministic: as in `__call__`.

        Returns:
            uint8 (..., ceil(n / 8)) from `flax_impl._kernels.dropout.keep_bits`, or None when this layer is the
            identity (deterministic or rate 0).

        Raises:
            ValueError: random mode and no `rngs` given at construction.
        """
        deterministic = check_bool("deterministic", deterministic, none_ok=True)
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return None
        if self.rngs is None:
            raise ValueError("Dropout in train mode needs rngs=nnx.Rngs(dropout=...) at construction")
        return draw_keep_bits(self.rngs(), self.rate, shape)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout of x with an explicit key: the function behind `Dropout`.

    Args:
        x: any shape.
        rate: the probability of zeroing an element, in [0, 1) (rate 1 gives zeros: use `Dropout`).
        key: a jax.random key.

    Returns:
        The shape and dtype of x: kept elements times fl(1 / (1 - rate)), the others 0.

    Raises:
        TypeError: `rate` not a number.
        ValueError: `rate` outside [0, 1).
    """
    if check_float("dropout rate", rate, low=0.0, high=1.0) == 1.0:
        raise ValueError(f"dropout rate={rate!r} must be in [0, 1) here (rate 1 gives zeros: see Dropout)")
    return apply_keep_bits(x, draw_keep_bits(key, rate, x.shape), rate)
