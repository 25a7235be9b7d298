"""RoPE frequencies as the families compute them: each `rope_type` a pure function of the config, and a table per
layer (layers without RoPE, a base per layer type), so that a scanned stack reads them as data.

What `flax_impl.positions.apply_rope` rotates by: pair i at position p turns by p * f_i with f the (r/2,) inverse
frequencies below (r = the rotated width), and cos and sin are multiplied by an attention factor (1 unless yarn or
longrope). theta_i = base^(-2i/r). By `rope_type` (transformers' `ROPE_INIT_FUNCTIONS` of the same names):
- "linear": theta_i / rope_scale (Chen et al., 2023; rope_scale 1 is plain RoPE, transformers' "default");
- "llama3": theta_i / rope_scale where the wavelength 2 pi / theta_i exceeds L0 / rope_low_freq_factor, theta_i
  where it is below L0 / rope_high_freq_factor, a linear mix in L0 / wavelength between (L0 = rope_original_max_len);
- "yarn" (Peng et al., 2023): theta_i / rope_scale mixed with theta_i by a linear ramp over the dims between the
  correction dims of rope_beta_fast and rope_beta_slow rotations in L0 (floor / ceil if rope_truncate); attention
  factor rope_attention_factor, else 0.1 ln(rope_scale) + 1;
- "dynamic" (NTK): theta_i at lengths s <= L0; past it the base becomes base (rope_scale s / L0 - rope_scale + 1)
  ^ (r / (r - 2)), s = the largest position of the call + 1 (over the batch, as transformers);
- "longrope" (Phi-3): theta_i / rope_short_factor_i at s <= L0, theta_i / rope_long_factor_i past it; attention
  factor rope_attention_factor, else sqrt(1 + ln(rope_scale) / ln(L0)) (1 if rope_scale <= 1).
"dynamic" and "longrope" depend on s, so cached decoding rotates each call's new keys by the frequencies of that
call's s and keeps them (transformers' generate does the same): past L0 the cache holds keys of several tables,
and a cached run then differs from one full forward, in both libraries.

Per layer (`layer_rope`): a layer off in `rope_layers` gets zero frequencies (no rotation) and factor 1; a sliding
layer (`attention_config.sliding_layers`) with `rope_local_base` set gets plain RoPE of that base (Gemma 3); every
other layer the table of `rope_type`. Tables are computed in float64 and rounded once to float32; the dynamic base
is computed in float32 at run time (from a traced length), as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_impl.attention_config import sliding_layers
from flax_impl.config import TransformerConfig, rope_width


def theta(rotated: int, base: float) -> np.ndarray:
    """theta_i = base^(-2i/r), i = 0 .. r/2 - 1, float64 (r/2,)."""
    return 1.0 / np.power(float(base), np.arange(0, rotated, 2, dtype=np.float64) / rotated)


def _llama3(t: np.ndarray, cfg: TransformerConfig) -> np.ndarray:
    L0, factor = cfg.rope_original_max_len, cfg.rope_scale
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / t
    out = np.where(wavelength > L0 / low, t / factor, t)
    smooth = (L0 / wavelength - low) / (high - low)
    medium = ~(wavelength < L0 / high) & ~(wavelength > L0 / low)
    return np.where(medium, (1 - smooth) * out / factor + smooth * out, out)


def _yarn(t: np.ndarray, cfg: TransformerConfig, rotated: int) -> np.ndarray:
    L0, base = cfg.rope_original_max_len, cfg.rope_base

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in L0
        return rotated * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotated - 1)
    high = high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(rotated // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return t / cfg.rope_scale * ramp + t * (1.0 - ramp)


def inv_freq(cfg: TransformerConfig, *, long: bool = False) -> np.ndarray:
    """The (r/2,) float64 inverse frequencies of `cfg.rope_type` (module docstring) at short lengths, or with
    `long` past rope_original_max_len (only "longrope" changes there; "dynamic" is `dynamic_inv_freq`)."""
    r = rope_width(cfg.head_dim, cfg.rope_fraction)
    t = theta(r, cfg.rope_base)
    if cfg.rope_type == "linear":
        return t / cfg.rope_scale
    if cfg.rope_type == "llama3":
        return _llama3(t, cfg)
    if cfg.rope_type == "yarn":
        return _yarn(t, cfg, r)
    if cfg.rope_type == "longrope":
        return t / np.asarray(cfg.rope_long_factor if long else cfg.rope_short_factor, np.float64)
    return t  # dynamic, at lengths up to rope_original_max_len


def attention_factor(cfg: TransformerConfig) -> float:
    """The factor on cos and sin (so on the scores, squared) of `cfg.rope_type`: 1 unless yarn or longrope."""
    factor, L0 = cfg.rope_scale, cfg.rope_original_max_len
    if cfg.rope_type not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    if factor <= 1.0:
        return 1.0
    return 0.1 * math.log(factor) + 1.0 if cfg.rope_type == "yarn" else math.sqrt(1 + math.log(factor) / math.log(L0))


def layer_rope(cfg: TransformerConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every layer's RoPE as data.

    Returns:
        (inv_freq (n_layers, r/2) float32, zero rows for layers without RoPE; factor (n_layers,) float32;
        scaled (n_layers,) bool: the layer follows rope_type's length rule ("dynamic" / "longrope")).
    """
    r = rope_width(cfg.head_dim, cfg.rope_fraction)
    table, factor = inv_freq(cfg), attention_factor(cfg)
    local = None if cfg.rope_local_base is None else theta(r, cfg.rope_local_base)
    rows, factors, scaled = [], [], []
    for n, sliding in enumerate(sliding_layers(cfg)):
        if cfg.rope_layers is not None and not cfg.rope_layers[n]:
            rows.append(np.zeros(r // 2)), factors.append(1.0), scaled.append(False)
        elif sliding and local is not None:
            rows.append(local), factors.append(1.0), scaled.append(False)
        else:
            rows.append(table), factors.append(factor), scaled.append(True)
    return np.stack(rows).astype(np.float32), np.asarray(factors, np.float32), np.asarray(scaled)


def dynamic_inv_freq(cfg: TransformerConfig, seq_len: jax.Array) -> jax.Array:
    """"dynamic" NTK frequencies (r/2,) float32 for a call whose largest position is seq_len - 1, in float32 as
    transformers: the base grows past rope_original_max_len, the plain table below (where the formula gives 1)."""
    r = rope_width(cfg.head_dim, cfg.rope_fraction)
    s = jnp.asarray(seq_len, jnp.float32)
    grown = cfg.rope_base * (cfg.rope_scale * s / cfg.rope_original_max_len - (cfg.rope_scale - 1)) ** (r / (r - 2))
    dynamic = 1.0 / grown ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r)
    return jnp.where(s > cfg.rope_original_max_len, dynamic, jnp.asarray(theta(r, cfg.rope_base), jnp.float32))


def frequencies(
    cfg: TransformerConfig, positions: jax.Array, row: Any = None
) -> tuple[jax.Array | np.ndarray, jax.Array | float]:
    """(inv_freq (r/2,), attention factor) of one layer for a call at `positions` (L,) or (B, L).

    Args:
        cfg: the architecture (position "rope").
        positions: the call's positions (their maximum + 1 is the length "dynamic" and "longrope" read).
        row: the layer's `flax_impl.masks.LayerKind` (its rope fields, each None when every layer has the same), or
            None: the config's table, the same on every layer.
    Returns:
        The frequencies, a constant unless the layer's row or the length rule makes them data; the factor, a
        Python float when it is the same on every layer.
    """
    table = jnp.asarray(row.inv_freq) if row is not None and row.inv_freq is not None else None
    if table is None:
        table = inv_freq(cfg).astype(np.float32)
    factor = attention_factor(cfg) if row is None or row.rope_factor is None else row.rope_factor
    if cfg.rope_type in ("dynamic", "longrope"):
        seq_len = jnp.max(positions, initial=-1) + 1  # (initial: an empty call has length 0)
        long = seq_len > cfg.rope_original_max_len
        if row is not None and row.rope_scaled is not None:
            long = long & row.rope_scaled
        alt = dynamic_inv_freq(cfg, seq_len) if cfg.rope_type == "dynamic" else inv_freq(cfg, long=True)
        table = jnp.where(long, jnp.asarray(alt, jnp.float32), table)
    return table, factor
