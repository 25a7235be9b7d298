"""Multi-head self-attention (Vaswani et al., 2017) with RoPE / ALiBi hooks, grouped-query heads, sliding windows,
masks and attention dropout.

Mask convention (ours, both twins): `attention_mask` is either (B, S) with 1/True = real token, a bool
(B|1, N|1, L, S) with True = may attend, or a float (B|1, N|1, L, S) added to the scores (-inf = masked out).
PyTorch's nn.MultiheadAttention uses the opposite bool polarity: convert with `from_torch_mha_mask`. A query
row whose keys are all masked returns zeros (torch's softmax would give NaN).

Padding cannot leak (both twins): keys that no query may attend to are zeroed before the matmuls, so a NaN or
inf at a padded position changes no real token's output (a masked score is replaced, never multiplied by 0).
Gradients are only promised for finite values there: per-token layers multiply a zero cotangent by them. An
integer (B, S) mask holding a value other than 0/1 raises ValueError when its values are concrete; under `jit`
they cannot be inspected, so every output of that sequence is NaN instead of reading the value by truthiness.
B = 0 or L = 0 gives an empty result in both modes.

Kernels (`FlaxConfig.attention_impl`, same results to float32 rounding): "einsum" is
`flax_impl._kernels.attention.chunked_attention`, heads-major (B, N, L, H), one chunk of queries at a time, its
gradient written out (why: docs/design.md#attention). "dot_product_attention" calls
jax.nn.dot_product_attention with its default implementation (XLA's; jax does not pick cuDNN by itself),
which has no dropout. "auto" (default) takes the latter on GPU/TPU
when no attention dropout is active, the einsum path otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_impl._kernels.attention import chunked_attention, dot_product_attention, merge_heads_project
from flax_impl.cache import write
from flax_impl.config import FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.dropout import Dropout
from flax_impl.positions import alibi_slopes, rotate_qk, scheme
from flax_impl.sharding import QKV_ACTIVATION, constrain, parallel_linear


def from_torch_mha_mask(mask: jax.Array) -> jax.Array:
    """Convert an nn.MultiheadAttention bool mask (True = masked out) to ours (True = may attend)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"from_torch_mha_mask converts bool masks only, got dtype {mask.dtype}")
    return ~mask


def check_attention_mask(mask: object, batch: int, n_heads: int, q_len: int, k_len: int) -> None:
    """Raise a clear error if `mask` cannot be read as one of the three accepted forms for (B, N, L, S)."""
    shape, dtype = tuple(np.shape(mask)), jnp.result_type(mask)
    if len(shape) == 2:
        if shape != (batch, k_len):
            raise ValueError(f"a (B, S) attention_mask must have shape ({batch}, {k_len}), got {shape}")
        if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(f"a (B, S) attention_mask must be bool or integer (1 = real token), got dtype {dtype}")
        if not isinstance(mask, jax.core.Tracer):
            values = np.unique(np.asarray(mask))
            if not set(values.tolist()) <= {0, 1}:
                raise ValueError(f"a (B, S) attention_mask holds 0/1 only, got values {values[:5].tolist()}")
        return
    if len(shape) == 4:
        ok = shape[0] in (batch, 1) and shape[1] in (n_heads, 1) and shape[2] in (q_len, 1) and shape[3] == k_len
        if not ok:
            raise ValueError(
                f"a 4-d attention_mask must broadcast to (B, N, L, S) = ({batch}, {n_heads}, {q_len}, {k_len}): "
                f"each of its first three sizes equal or 1, got {shape}"
            )
        if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating)):
            raise TypeError(
                f"a 4-d attention_mask must be bool (True = may attend) or float (added to the scores), got {dtype}"
            )
        return
    raise ValueError(f"attention_mask must be (B, S) or (B|1, N|1, L, S), got shape {shape}")


def nan_rows_of_bad_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, L, D) with the sequences whose integer (B, S) mask holds a value other than 0/1 set to NaN.

    Eager calls never get here with such a mask (`check_attention_mask` raises); under `jit` its values are not
    known, and reading 2 or -1 as "real token" would silently change the result: NaN says it instead.
    """
    mask = jnp.asarray(mask)
    if mask.ndim != 2 or not jnp.issubdtype(mask.dtype, jnp.integer):
        return x
    bad = jnp.any((mask != 0) & (mask != 1), axis=-1)  # (B,)
    return jnp.where(bad[:, None, None], jnp.asarray(jnp.nan, x.dtype), x)


# A layer without a sliding window sees every earlier key: its window is larger than any slot distance.
NO_WINDOW = 2**31 - 1


class LayerKind(NamedTuple):
    """What may differ from one layer to the next, as data: a scanned stack reads it per layer like the weights.

    Attributes:
        window: () int32, the sliding window W of a causal layer (query at slot i sees keys i - W < j <= i),
            NO_WINDOW for full attention; or None when no layer of the model has a window (nothing to compute).
    """

    window: jax.Array | int | None = None


def layer_kinds(config: TransformerConfig) -> LayerKind:
    """Every layer's kind, stacked: each field (n_layers,) (or None when it is the same nothing for all)."""
    window = None
    if config.sliding_window is not None:
        window = jnp.full((config.n_layers,), config.sliding_window, jnp.int32)
    return LayerKind(window=window)


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


class MultiHeadAttention(nnx.Module):
    """Self-attention over x (B, L, D) -> (B, L, D), with an optional KV cache.

    Parameters: `in_proj` (D -> (N + 2K) H, columns [q (N H) | k (K H) | v (K H)], head h = columns h*H:(h+1)*H
    of each; with K = N the transpose of nn.MultiheadAttention's `in_proj_weight` (3D, D)) and `out_proj`
    (D -> D). Scores q.k / sqrt(H), softmax in float32, dropout on the probabilities (train mode), RoPE on q and
    k and ALiBi on the scores according to `config.position`, causal masking if `config.causal` (within the last
    `config.sliding_window` positions if set; `mask_rules`). Grouped-query attention (K = `n_kv_heads` < N):
    query head n reads kv head n // (N / K); the kv heads are never repeated: the G = N / K query heads of a kv
    head are attended as G blocks of query rows.

    Without a cache the keys are x's own. With `cache=(k, v)` (B, K, S, H) the new tokens' keys and values are
    written at slots cache_index .. cache_index + L - 1 and the queries attend over every slot, by the same
    rules: prefill is this forward on a whole prompt, decoding the same on one token.
    """

    def __init__(self, config: TransformerConfig, *, flax_config: FlaxConfig | None = None, rngs: nnx.Rngs):
        config, flax_config = as_config(config), as_flax_config(flax_config)
        D = config.d_model
        self.config, self.flax_config = config, flax_config
        N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
        # Megatron tensor parallelism under a mesh (flax_impl.sharding): in_proj column-, out_proj row-parallel.
        self.in_proj = parallel_linear(
            flax_config, D, (N + 2 * K) * H, "column", use_bias=config.qkv_bias, rngs=rngs
        )
        self.out_proj = parallel_linear(flax_config, D, D, "row", use_bias=config.out_bias, rngs=rngs)
        self.dropout = Dropout(config.attention_dropout, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        kind: LayerKind | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attend x to itself, or to the cache it is written into.

        Args:
            x: (B, L, D).
            attention_mask: without a cache, any form of `mask_rules` (None: every key); with one, (B, S) bool,
                True = a real token sits at that slot once this call's tokens are written (padding False).
            positions: (L,) or (B, L) RoPE positions; None: 0 .. L - 1.
            kind: this layer's `LayerKind`; None: the config's (the same for every layer).
            cache: (k, v) each (B, K, S, H), keys after RoPE; zero at every slot `attention_mask` marks False.
            cache_index: () int32, the slot of x's first token (with a cache).
        Returns:
            (B, L, D); with a cache, (out, (k, v) with the new tokens written).
        Raises:
            ValueError / TypeError: x not (B, L, D) of width d_model; a malformed mask (`check_attention_mask`).
        """
        cfg = self.config
        B, L, D = x.shape
        if D != cfg.d_model:
            raise ValueError(f"attention input width {D} != d_model={cfg.d_model}")
        window = (layer_kinds(cfg) if kind is None else kind).window
        window = window[0] if kind is None and window is not None else window
        if cache is None:
            if attention_mask is not None:
                check_attention_mask(attention_mask, B, cfg.n_heads, L, L)
                x = nan_rows_of_bad_mask(x, attention_mask)
            q, k, v = self._project(x, positions)  # (B, L, N, H), (B, L, K, H), (B, L, K, H)
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, L, H)
            q_slots = jnp.arange(L)
        else:
            if jnp.ndim(attention_mask) != 2 or jnp.shape(attention_mask)[0] != B:
                shape = jnp.shape(attention_mask)
                raise ValueError(f"with a cache, attention_mask must be the (B, S) slot mask, got shape {shape}")
            q, k, v = self._project(x, positions)
            real = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, L, axis=1)  # (B, L)
            keys, values = write(cache[0], cache[1], k, v, real, cache_index)  # (B, K, S, H)
            q_slots = cache_index + jnp.arange(L)
        slopes = alibi_slopes(cfg.n_heads, cfg.alibi_max_bias) if scheme(cfg.position).biases_scores else None
        allowed, bias = mask_rules(
            attention_mask, q_slots, keys.shape[2], causal=cfg.causal, window=window, slopes=slopes
        )
        out = self._attend(q, keys, values, bias, allowed, keys_zeroed=cache is not None)
        return out if cache is None else (out, (keys, values))

    def _project(self, x: jax.Array, positions: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q (B, L, N, H), k and v (B, L, K, H), RoPE applied to q and k."""
        cfg = self.config
        B, L, _ = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if K == N:
            qkv = self.in_proj(x).reshape(B, L, 3, N, H)  # (B, L, 3, N, H)
            qkv = constrain(qkv, QKV_ACTIVATION)  # under a mesh: whole heads per device (no-op without one)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, N, H)
        else:
            qkv = self.in_proj(x)  # (B, L, (N + 2K) H)
            q = qkv[..., : N * H].reshape(B, L, N, H)
            k = qkv[..., N * H : (N + K) * H].reshape(B, L, K, H)
            v = qkv[..., (N + K) * H :].reshape(B, L, K, H)
        q, k = rotate_qk(cfg, q, k, jnp.arange(L) if positions is None else positions)
        return q, k, v

    def _attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        bias: jax.Array | None,
        allowed: jax.Array | None,
        keys_zeroed: bool,
    ) -> jax.Array:
        """softmax(q.k^T / sqrt(H) + bias, masked).v through the configured kernel, then out_proj.

        q (B, L, N, H); k, v (B, K, S, H); `keys_zeroed`: keys no query may read are zero already (a cache).
        """
        B, L, N, H = q.shape
        K, S = k.shape[1], k.shape[2]
        q = q * jnp.asarray(H**-0.5, q.dtype)
        if self._use_dot_product_attention():
            kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, S, K, H)
            out = dot_product_attention(q, kt, vt, bias, allowed)  # (B, L, N, H)
            return self.out_proj(out.reshape(B, L, N * H))
        G = N // K  # the query heads of kv head k are G blocks of L rows: (B, K, G L, H), a free reshape
        qg = q.transpose(0, 2, 1, 3).reshape(B, K, G * L, H)
        keep = self.dropout.keep_bits((B, N, L, S))  # (B, N, L, ceil(S / 8)) packed, or None
        keep = None if keep is None else keep.reshape(B, K, G * L, keep.shape[-1])
        out = chunked_attention(
            qg, k, v, group_rows(bias, K, G, L), group_rows(allowed, K, G, L), keep, self.dropout.rate,
            zero_dead=not keys_zeroed,
        )  # fmt: skip
        # The backward pass redoes the (B, N, L, H) -> (B, L, D) transpose for out_proj's weight gradient, so that
        # only the heads-major output, which the attention gradient keeps anyway, is kept.
        return merge_heads_project(self.out_proj, out.reshape(B, N, L, H))

    def _use_dot_product_attention(self) -> bool:
        """`attention_impl`: "auto" takes jax.nn.dot_product_attention on GPU/TPU unless attention dropout is
        active (it has no dropout), the einsum path on CPU (docs/design.md#attention)."""
        impl = self.flax_config.attention_impl
        dropout_active = not self.dropout.deterministic and 0.0 < self.dropout.rate
        if impl == "dot_product_attention" and dropout_active:
            raise ValueError(
                "attention_impl='dot_product_attention' has no attention dropout: set attention_dropout=0, call "
                "model.eval(), or use attention_impl='einsum' / 'auto'"
            )
        if impl == "auto":
            return not dropout_active and jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
        return impl == "dot_product_attention"
