"""The four position schemes: sinusoidal, learned, RoPE, ALiBi (and "none"), as pure functions plus one
uniform interface (`SCHEMES`, `scheme`, `rotate_qk`) so that the rest of the model branches on the scheme name
in this file only (the attention adds ALiBi's bias from `alibi_slopes` in its mask rules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_impl.config import ROPE_STYLES, TransformerConfig, rope_width
from flax_impl.rope import frequencies
from flax_impl.sharding import REPLICATED_MATRIX, param_metadata
from flax_impl.validation import check_bool, check_choice, check_float, check_int


@dataclass(frozen=True)
class Scheme:
    """What a position scheme does at each of the three places position can enter."""

    at_input: str | None  # "table" (fixed, added), "param" (learned, added) or None (input unchanged)
    rotates_qk: bool  # RoPE rotates q and k inside attention
    biases_scores: bool  # ALiBi adds a bias to the attention scores


SCHEMES: dict[str, Scheme] = {
    "sinusoidal": Scheme(at_input="table", rotates_qk=False, biases_scores=False),
    "learned": Scheme(at_input="param", rotates_qk=False, biases_scores=False),
    "rope": Scheme(at_input=None, rotates_qk=True, biases_scores=False),
    "alibi": Scheme(at_input=None, rotates_qk=False, biases_scores=True),
    "none": Scheme(at_input=None, rotates_qk=False, biases_scores=False),
}


def scheme(name: str) -> Scheme:
    """The Scheme for a position name; unknown names raise ValueError."""
    if name not in SCHEMES:
        raise ValueError(f"position={name!r} is not one of {list(SCHEMES)}")
    return SCHEMES[name]


@lru_cache(maxsize=32)
def _sinusoidal_np(length: int, d_model: int) -> np.ndarray:
    pos = np.arange(length, dtype=np.float64)[:, None]  # (L, 1)
    i = np.arange((d_model + 1) // 2, dtype=np.float64)[None, :]  # (1, ceil(D/2))
    angle = pos / np.power(10_000.0, 2.0 * i / d_model)  # (L, ceil(D/2))
    table = np.empty((length, 2 * angle.shape[1]), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    out = table[:, :d_model].astype(np.float32)
    out.flags.writeable = False
    return out


def sinusoidal_table(length: int, d_model: int) -> jax.Array:
    """Fixed sinusoidal positions (Vaswani et al., 2017, sec. 3.5), interleaved layout: (L, D) float32.

    PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(pos / 10000^(2i/D)). Any length. An odd D keeps
    the sine of the last pair and drops its cosine. Computed in float64 and rounded once to float32.

    Args:
        length: L, the number of positions (rows), >= 0.
        d_model: D, the width of each row, >= 1.

    Returns:
        The table (L, D) float32; row p is position p.

    Raises:
        TypeError: length or d_model not an integer (`flax_impl.validation.ArgumentTypeError`).
        ValueError: length < 0 or d_model < 1.
    """
    length, d_model = check_int("length", length, low=0), check_int("d_model", d_model, low=1)
    return jnp.asarray(_sinusoidal_np(length, d_model))


class LearnedPositions(nnx.Module):
    """Learned absolute positions (BERT, GPT-2): a `weight` (max_len, D), initialised N(0, 1) as nn.Embedding.

    `pos(length, offset=0)` returns rows offset .. offset + length - 1, (L, D). Past max_len raises IndexError.

    Raises:
        TypeError: max_len or d_model not an integer (here), length or offset not an integer (at call).
        ValueError: max_len or d_model < 1 (here), length or offset < 0 (at call).
    """

    def __init__(self, max_len: int, d_model: int, *, param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        max_len, d_model = check_int("max_len", max_len, low=1), check_int("d_model", d_model, low=1)
        self.max_len = max_len
        w = jax.random.normal(rngs.params(), (max_len, d_model), param_dtype)
        self.weight = nnx.Param(w, **param_metadata(REPLICATED_MATRIX))  # replicated under a mesh

    def __call__(self, length: int, offset: int = 0) -> jax.Array:
        length, offset = check_int("length", length, low=0), check_int("offset", offset, low=0)
        if offset + length > self.max_len:
            raise IndexError(
                f"learned positions cover max_len={self.max_len} positions; positions {offset}..{offset + length - 1}"
                f" (sequence length {length}) are out of range"
            )
        return self.weight[offset : offset + length]  # (L, D)


def _rope_inv_freq(rotated: int, base: float, scale: float = 1.0) -> np.ndarray:
    """theta_i / scale, theta_i = base^(-2i/r), i = 0 .. r/2 - 1, computed in float64, rounded to float32: (r/2,).

    The scale is folded in here because XLA's float32 division on CPU is not correctly rounded (p / 2.5 can be
    off by an ulp, 1e-4 rad at p ~ 3000), while a float64 fold plus one float32 product is the same everywhere.
    """
    theta = 1.0 / np.power(base, np.arange(0, rotated, 2, dtype=np.float64) / rotated)
    return (theta / scale).astype(np.float32)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    base: float = 10_000.0,
    style: str = "half",
    fraction: float = 1.0,
    scale: float = 1.0,
    inv_freq: jax.Array | np.ndarray | None = None,
    factor: jax.Array | float = 1.0,
) -> jax.Array:
    """Rotary position embedding (Su et al., 2021, "RoFormer") of x (B, L, N, H) at `positions` (L,) or (B, L).

    Pair (a, b) at position p is rotated by p * (theta_i / scale), theta_i = base^(-2i/r) over the r rotated dims:
    `style="half"` pairs x[i] with x[i + r/2] (GPT-NeoX, Llama's rotate_half); `"interleaved"` pairs x[2i] with
    x[2i+1] (RoFormer, GPT-J). `fraction` < 1 rotates only the first r = round(fraction * H) dims and passes the
    rest through (GPT-NeoX partial rotary). `scale` > 1 is linear position interpolation (Chen et al., 2023).
    Positions may start at any offset. theta_i / scale is computed in float64 and rounded once to float32; the
    angle p * (theta_i / scale) and the rotation are computed in float32, the result cast back to x.dtype.
    `inv_freq` (r/2,), when given, replaces theta_i / scale (a scaled `rope_type` or one layer's table, from
    `flax_impl.rope`; zeros rotate nothing), and `factor` multiplies cos and sin (yarn / longrope's attention
    factor: the rotated dims are scaled by it, the passed-through ones are not, as transformers does).

    Args:
        x: queries or keys (B, L, N, H), any float dtype.
        positions: the position of each row, (L,) shared by the batch or (B, L) per sequence; integers.
        base: the RoPE base (10,000 in RoFormer and Llama 1/2; 5e5 in Llama 3).
        style: "half" or "interleaved" (which dims form a pair).
        fraction: the share of H that rotates, in (0, 1].
        scale: linear position interpolation, > 0 (1 = off).
        inv_freq: (r/2,) angular speeds replacing theta_i / scale, or None.
        factor: a scalar multiplying cos and sin (1 = off).

    Returns:
        x rotated, (B, L, N, H), x's dtype.

    Raises:
        TypeError: base, fraction or scale not a number, style not a str (`ArgumentTypeError`).
        ValueError: base <= 1, fraction outside (0, 1], scale <= 0, any of them not finite, an unknown style;
            x not (B, L, N, H); positions not (L,) or (B, L); an odd or zero rotated width; inv_freq not (r/2,).
    """
    base, fraction, scale, style = _rope_args(base, fraction, scale, style)
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x of shape (B, L, N, H), got {x.shape}")
    B, L, N, H = x.shape
    r = rope_width(H, fraction)
    if r % 2 or r == 0:
        raise ValueError(f"RoPE rotates pairs: rotated width {r} (H={H} x fraction={fraction}) must be even and > 0")
    positions = jnp.asarray(positions)
    if positions.shape not in ((L,), (B, L)):
        raise ValueError(f"positions must have shape (L,)=({L},) or (B, L)=({B}, {L}), got {positions.shape}")
    if inv_freq is None:
        inv_freq = _rope_inv_freq(r, base, scale)
    elif jnp.shape(inv_freq) != (r // 2,):
        raise ValueError(f"inv_freq must have shape (r/2,) = ({r // 2},), got {jnp.shape(inv_freq)}")
    pos = positions.astype(jnp.float32)
    angle = pos[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (L, r/2) or (B, L, r/2)
    angle = angle[..., None, :]  # (L, 1, r/2) or (B, L, 1, r/2): broadcast over heads
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if not (isinstance(factor, (int, float)) and factor == 1.0):
        cos, sin = cos * factor, sin * factor
    xr = x[..., :r].astype(jnp.float32)  # (B, L, N, r)
    if style == "half":
        a, b = xr[..., : r // 2], xr[..., r // 2 :]
        rotated = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(xr.shape)
    rotated = rotated.astype(x.dtype)
    return rotated if r == H else jnp.concatenate([rotated, x[..., r:]], axis=-1)


def _rope_args(base: object, fraction: object, scale: object, style: object) -> tuple[float, float, float, str]:
    """apply_rope's scalar arguments checked by type and range (the rules of TransformerConfig's rope_* fields)."""
    return (
        check_float("base", base, low=1.0, low_open=True),
        check_float("fraction", fraction, low=0.0, high=1.0, low_open=True),
        check_float("scale", scale, low=0.0, low_open=True),
        check_choice("style", style, ROPE_STYLES),
    )


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> np.ndarray:
    """Per-head ALiBi slopes m_h (Press et al., 2022, "Train Short, Test Long").

    For n_heads a power of two: m_h = 2^(-max_bias * h / n_heads), h = 1..n_heads. Otherwise the slopes of the
    closest lower power of two, then every other slope of the next power of two, up to n_heads: BLOOM's order.
    MPT's `gen_slopes` (the next power of two's slopes, odd-indexed ones first) gives the same list; MPT exposes
    `max_bias` as `alibi_bias_max`.

    Args:
        n_heads: N >= 1.
        max_bias: the 8 of the paper; > 0, finite.
    Returns:
        (N,) float32.
    Raises:
        TypeError: n_heads not an integer, max_bias not a number (`ArgumentTypeError`).
        ValueError: n_heads < 1, or max_bias not a finite number > 0.
    """
    n_heads = check_int("n_heads", n_heads, low=1)
    max_bias = check_float("max_bias", max_bias, low=0.0, low_open=True)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-max_bias * h / n) for h in range(1, n + 1)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


def alibi_bias(q_len: int, k_len: int, slopes: jax.Array, *, causal: bool = False) -> jax.Array:
    """ALiBi score bias (N, L, S) float32 for slopes (N,).

    Queries are the last q_len of the k_len positions (i = k_len - q_len + row), keys j = 0 .. k_len - 1.
    Bidirectional: -m * |i - j| (symmetric). Causal: -m * (i - j) for j <= i and 0 for j > i (the causal mask
    removes those keys separately). Any length: extrapolation is the point of ALiBi.

    Args:
        q_len: L, the number of query rows (the last L of the k_len positions).
        k_len: S, the number of key positions, >= q_len.
        slopes: the per-head slopes m (N,), e.g. `alibi_slopes(N)`.
        causal: the causal form (zero for future keys) instead of the symmetric one.

    Returns:
        The bias (N, L, S) float32, added to the attention scores before the softmax.

    Raises:
        TypeError: q_len or k_len not an integer, causal not a bool.
        ValueError: unless 0 <= q_len <= k_len.
    """
    q_len, k_len = check_int("q_len", q_len, low=0), check_int("k_len", k_len, low=0)
    causal = check_bool("causal", causal)
    if k_len < q_len:
        raise ValueError(f"alibi_bias needs 0 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    i = jnp.arange(k_len - q_len, k_len, dtype=jnp.float32)[:, None]  # (L, 1)
    j = jnp.arange(k_len, dtype=jnp.float32)[None, :]  # (1, S)
    dist = jnp.where(j <= i, i - j, 0.0) if causal else jnp.abs(i - j)  # (L, S)
    return -jnp.asarray(slopes, jnp.float32)[:, None, None] * dist[None]  # (N, L, S)


def rotate_qk(
    config: TransformerConfig, q: jax.Array, k: jax.Array, positions: jax.Array, kind: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Apply the scheme's q/k rotation: RoPE for "rope" (the layer's frequencies and factor from
    `flax_impl.rope.frequencies`, `kind` its LayerKind or None), identity otherwise. q (B, L, N, H), k (B, L, K, H).
    """
    if not scheme(config.position).rotates_qk:
        return q, k
    inv_freq, factor = frequencies(config, positions, kind)
    kw = dict(style=config.rope_style, fraction=config.rope_fraction, inv_freq=inv_freq, factor=factor)
    return apply_rope(q, positions, **kw), apply_rope(k, positions, **kw)
