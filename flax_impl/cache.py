"""The key/value cache of cached decoding: allocated once by `init_cache`, written by every call of a causal
`Transformer` given `cache=` (a prompt, then one token at a time), read by every layer's attention.

An explicit pytree (a NamedTuple of arrays), not `nnx.Cache` variables inside the modules: the decode loop of
`flax_impl.generate` carries it through `jax.lax.while_loop` and `jax.jit` as an ordinary value, a scanned stack
scans over it beside the stacked weights, and the model stays a pure function of (weights, cache) -> (output,
cache), so that prefill and decode are the same forward (docs/design.md#the-decoder-core).

Slots are the cache's time axis: the first call writes slots 0 .. L - 1 (a left-padded prompt), each later call
the next ones. Positions are per row: a row's first real token is position `position_offset` (0 unless the
family shifts them), as transformers' generate derives them from the mask (cumsum - 1), so a left-padded row and
the same prompt alone see the same positions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flax_impl.config import TransformerConfig
from flax_impl.validation import check_choice, check_int


class KVCache(NamedTuple):
    """The decoding state of a causal Transformer (a pytree).

    Attributes:
        k: the keys after RoPE, only the K kv heads (grouped-query attention stores no copy): a tuple of n_layers
            arrays (B, K, S, H) for a model whose layers are separate modules, or one (n_layers, B, K, S, H)
            array for a scanned stack (`FlaxConfig.scan_layers`), so that each is read as its weights are.
        v: the values, as `k`.
        key_mask: (B, S) bool, True = a real token sits at that slot (padding and unwritten slots are False).
        index: () int32, the next slot to write: a NumPy scalar in a fresh cache (`init_cache`), so that a prefill
            traced with it knows that it starts at slot 0 and attends over its own keys only.
        next_position: (B,) int32, the position of each row's next real token.

    Invariant (the attention relies on it instead of masking twice): a slot whose `key_mask` is False holds
    zeros in `k` and `v`, so a NaN at a padded position never reaches a real token through 0 * NaN.
    """

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    key_mask: jax.Array
    index: jax.Array
    next_position: jax.Array

    @property
    def max_len(self) -> int:
        """S, the slots the cache holds."""
        return self.key_mask.shape[1]


def init_cache(
    config: TransformerConfig, batch: int, max_len: int, *, stacked: bool = False, dtype: str = "float32"
) -> KVCache:
    """An empty cache of `max_len` slots for `batch` rows: zeros, no slot real, index 0.

    Args:
        config: the model's architecture (n_layers, n_kv_heads, head_dim, position_offset); causal.
        batch: B >= 1.
        max_len: S >= 1, the prompt plus every token to decode.
        stacked: one (n_layers, B, K, S, H) array for k and for v (a scanned stack) instead of n_layers arrays.
        dtype: the arrays' dtype ("float32", "bfloat16", "float16"): the model's compute dtype.
    Returns:
        The KVCache.
    Raises:
        TypeError / ValueError: a non-causal config, batch or max_len not an int >= 1, an unknown dtype.
    """
    if not config.causal:
        raise ValueError("a KV cache needs a causal model (config.causal=True): an encoder sees every token")
    batch, max_len = check_int("batch", batch, low=1), check_int("max_len", max_len, low=1)
    dtype = jnp.dtype(check_choice("dtype", dtype, ("float32", "bfloat16", "float16")))
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    if stacked:
        k = v = jnp.zeros((config.n_layers, *shape), dtype)
    else:
        k = v = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(
        k,
        v,
        jnp.zeros((batch, max_len), bool),
        np.zeros((), np.int32),  # concrete, even inside a trace (the attention's `starts_at_zero`)
        jnp.full((batch,), config.position_offset, jnp.int32),
    )


def check_cache(
    cache: object, config: TransformerConfig, stacked: bool, batch: int, mask: jax.Array | None
) -> None:
    """Refuse, before any work, a cache a model call cannot use.

    Raises:
        TypeError: `cache` is not a KVCache.
        ValueError: a non-causal model; a cache laid out for the other storage of layers (`stacked`) or another
            batch; a mask that is not (B, L).
    """
    if not config.causal:
        raise ValueError("a KV cache needs a causal model (config.causal=True): an encoder sees every token")
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a flax_impl.KVCache (from model.init_cache), got {type(cache).__name__}")
    layout = {True: "stacked (scan_layers=True)", False: "one array per layer (scan_layers=False)"}
    if (not isinstance(cache.k, tuple)) != stacked:
        raise ValueError(
            f"the cache is laid out for layers {layout[not stacked]}, the model's are {layout[stacked]}: make it "
            "with this model's init_cache"
        )
    if cache.key_mask.shape[0] != batch:
        raise ValueError(f"the cache holds {cache.key_mask.shape[0]} rows, the ids {batch}")
    if mask is not None and jnp.ndim(mask) != 2:
        raise ValueError(f"with a cache, attention_mask must be (B, L), 1 = real token, got shape {jnp.shape(mask)}")


def advance(cache: KVCache, real: jax.Array) -> tuple[KVCache, jax.Array]:
    """The bookkeeping of one call that writes L new tokens at slots index .. index + L - 1.

    Args:
        cache: the cache before the call.
        real: (B, L) bool, True = a real token (a prompt's left padding is False; decoded tokens are all True).
    Returns:
        (the cache with `key_mask`, `index` and `next_position` advanced and k, v unchanged (each layer writes its
        own); positions (B, L) int32 of the new tokens: next_position + cumsum(real) - 1, padding at the row's
        previous position, clamped at 0).
    """
    steps = jnp.cumsum(real.astype(jnp.int32), axis=1)  # (B, L)
    positions = jnp.maximum(cache.next_position[:, None] + steps - 1, 0)
    key_mask = jax.lax.dynamic_update_slice(cache.key_mask, real, (0, cache.index))
    cache = cache._replace(
        key_mask=key_mask, index=cache.index + real.shape[1], next_position=cache.next_position + steps[:, -1]
    )
    return cache, positions


def starts_at_zero(cache_index: jax.Array | int) -> bool:
    """Whether the slot of a call's first token is known, at trace time, to be 0: a fresh cache's index is a
    NumPy scalar (`init_cache`), which stays concrete inside the trace that made it (the prefill
    of `flax_impl.generate`); a cache passed into a jitted function arrives traced, and is read as unknown."""
    if isinstance(cache_index, jax.core.Tracer):
        return False
    return int(np.asarray(cache_index)) == 0


def write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, real: jax.Array, index: jax.Array):
    """One layer's cache with L new keys and values written at slots index .. index + L - 1.

    Args:
        k_cache, v_cache: (B, K, S, H).
        k, v: (B, L, K, H), the new tokens' keys (after RoPE) and values.
        real: (B, L) bool; padding is written as zeros (the cache's invariant).
        index: () int32, the first slot (index + L <= S is the caller's: under jit a write past the end is
            clamped by `dynamic_update_slice`).
    Returns:
        (k_cache, v_cache) updated.
    """
    keep = real[:, :, None, None]  # (B, L, 1, 1)
    k = jnp.where(keep, k, 0).transpose(0, 2, 1, 3).astype(k_cache.dtype)  # (B, K, L, H)
    v = jnp.where(keep, v, 0).transpose(0, 2, 1, 3).astype(v_cache.dtype)
    at = (0, 0, index, 0)
    return jax.lax.dynamic_update_slice(k_cache, k, at), jax.lax.dynamic_update_slice(v_cache, v, at)
