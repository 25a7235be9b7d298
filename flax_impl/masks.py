"""Masks and layer kinds of the attention: the one place the mask rules live (`mask_rules`: causal, sliding
window, ALiBi), and what differs from one layer to the next (`LayerKind`, `layer_kinds`: the window and the RoPE
frequencies, as data a scanned stack reads per layer). The attention checks a mask's form first
(`flax_impl.attention.check_attention_mask`).

Mask convention (ours, both twins): `attention_mask` is either (B, S) with 1/True = real token, a bool
(B|1, N|1, L, S) with True = may attend, or a float (B|1, N|1, L, S) added to the scores (-inf = masked out).
PyTorch's nn.MultiheadAttention uses the opposite bool polarity: convert with `from_torch_mha_mask`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_impl.attention_config import sliding_layers
from flax_impl.config import TransformerConfig
from flax_impl.positions import scheme
from flax_impl.rope import layer_rope


def from_torch_mha_mask(mask: jax.Array) -> jax.Array:
    """Convert an nn.MultiheadAttention bool mask (True = masked out) to ours (True = may attend).

    Args:
        mask: a bool `attn_mask` or `key_padding_mask` as torch's nn.MultiheadAttention takes it, any shape.

    Returns:
        The same shape, bool, True where attention is allowed (its negation).

    Raises:
        TypeError: a mask that is not bool (torch's float masks are additive; convert them yourself).
    """
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"from_torch_mha_mask converts bool masks only, got dtype {mask.dtype}")
    return ~mask


# A layer without a sliding window sees every earlier key: its window is larger than any slot distance.
NO_WINDOW = 2**31 - 1


class LayerKind(NamedTuple):
    """What may differ from one layer to the next, as data: a scanned stack reads it per layer like the weights.

    Each field is stacked (n_layers, ...) by `layer_kinds`, one layer's slice inside the walk over the layers, or
    None when every layer has the same (then nothing is read per layer: the attention takes the config's constants).

    Attributes:
        window: () int32, the sliding window W of a causal layer (query at slot i sees keys i - W < j <= i),
            NO_WINDOW on a layer without one (`layer_types` "full_attention").
        inv_freq: (r/2,) float32, the layer's RoPE inverse frequencies (`flax_impl.rope.layer_rope`; zeros: the
            layer does not rotate).
        rope_factor: () float32, the factor on the layer's cos and sin.
        rope_scaled: () bool, the layer follows the length rule of rope_type "dynamic" / "longrope".
    """

    window: jax.Array | int | None = None
    inv_freq: jax.Array | None = None
    rope_factor: jax.Array | None = None
    rope_scaled: jax.Array | None = None


def _per_layer(rows: np.ndarray) -> jax.Array | None:
    """rows (n_layers, ...) as an array, or None when every layer's row is the same."""
    return None if (rows == rows[:1]).all() else jnp.asarray(rows)


def layer_kinds(config: TransformerConfig) -> LayerKind:
    """Every layer's kind, stacked: each field (n_layers, ...), or None when it is the same for every layer."""
    window = None
    sliding = sliding_layers(config)
    if any(sliding):
        window = jnp.asarray([config.sliding_window if s else NO_WINDOW for s in sliding], jnp.int32)
    if not scheme(config.position).rotates_qk:
        return LayerKind(window=window)
    inv_freq, factor, scaled = (_per_layer(a) for a in layer_rope(config))
    return LayerKind(window=window, inv_freq=inv_freq, rope_factor=factor, rope_scaled=scaled)


def first_layer_kind(config: TransformerConfig) -> LayerKind:
    """Layer 0's kind (a module applied on its own, outside a Transformer, is its first layer)."""
    return jax.tree.map(lambda a: a[0], layer_kinds(config))


def mask_rules(
    attention_mask: jax.Array | None,
    q_slots: jax.Array,
    k_len: int,
    *,
    causal: bool,
    window: jax.Array | int | None = None,
    slopes: jax.Array | None = None,
) -> tuple[jax.Array | None, jax.Array | None]:
    """Which keys each query may attend to, and what is added to its scores: the one place the rules live.

    Queries sit at slots `q_slots`, keys at slots 0 .. S - 1: without a cache both are 0 .. L - 1; with one the
    new tokens sit at index .. index + L - 1 and the keys are the cache's slots. Causal: j <= i; with a sliding
    window W also i - j < W. ALiBi (`slopes`, Press et al., 2022): -m (i - j) for the keys a causal query sees,
    -m |i - j| without `causal`.

    Args:
        attention_mask: None; (B, S) 1/True = real key; bool (B|1, N|1, L, S) True = may attend; or float
            (B|1, N|1, L, S) added to the scores (-inf = masked out).
        q_slots: (L,) int32.
        k_len: S.
        causal: mask future keys.
        window: () int32 W, or None (no window).
        slopes: (N,) ALiBi slopes, or None.
    Returns:
        (allowed: bool broadcastable to (B, N, L, S), or None for every key; bias: float32 broadcastable to
        (B, N, L, S), or None).
    """
    allowed, bias = None, None
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask)
        if mask.ndim == 2:
            allowed = mask.astype(jnp.bool_)[:, None, None, :]  # (B, 1, 1, S)
        elif mask.dtype == jnp.bool_:
            allowed = mask
        else:
            bias = mask.astype(jnp.float32)
            allowed = ~jnp.isneginf(bias)
            bias = jnp.where(allowed, bias, 0.0)
    i = q_slots[:, None]  # (L, 1)
    j = jnp.arange(k_len)[None, :]  # (1, S)
    if causal:
        rule = j <= i
        if window is not None:  # the last W slots, the query's own included
            rule = rule & (i - j < window)
        rule = rule[None, None]  # (1, 1, L, S)
        allowed = rule if allowed is None else allowed & rule
    if slopes is not None:
        dist = (i - j).astype(jnp.float32)  # (L, S)
        dist = jnp.where(dist >= 0, dist, 0.0) if causal else jnp.abs(dist)
        alibi = -jnp.asarray(slopes, jnp.float32)[None, :, None, None] * dist  # (1, N, L, S)
        bias = alibi if bias is None else alibi + bias
    return allowed, bias


def group_rows(x: jax.Array | None, n_kv: int, groups: int, q_len: int) -> jax.Array | None:
    """A (B|1, N|1, L|1, S) mask or bias laid out for grouped queries (B|1, K|1, G L|1, S): head n = (n // G,
    n % G) and the G query heads of kv head k become G blocks of L query rows (a free reshape of (B, N, L, S))."""
    if x is None or (x.shape[1] == 1 and x.shape[2] == 1):
        return x
    b, n, _, s = x.shape
    if n == 1:  # one row set for every head: repeat it for each of the G heads sharing a kv head
        x = jnp.broadcast_to(x[:, :, None], (b, 1, groups, q_len, s))
        return x.reshape(b, 1, groups * q_len, s)
    return jnp.broadcast_to(x, (b, n, q_len, s)).reshape(b, n_kv, groups * q_len, s)
