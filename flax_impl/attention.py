"""Multi-head self-attention (Vaswani et al., 2017) with RoPE / ALiBi hooks, grouped-query heads, sliding windows,
QK-norm, the families' score scales and soft-capping, masks and attention dropout.

Mask convention (ours, both twins): `attention_mask` is either (B, S) with 1/True = real token, a bool
(B|1, N|1, L, S) with True = may attend, or a float (B|1, N|1, L, S) added to the scores (-inf = masked out);
`check_attention_mask` refuses anything else. The mask rules and the per-layer kinds live in `flax_impl.masks`
(their names are importable from here too). A query row whose keys are all masked returns zeros (torch's softmax
would give NaN).

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
which has neither dropout nor soft-capping: asked for with `attn_logit_softcap` set it is refused when the
module is built. "auto" (default) takes it on GPU/TPU when no attention dropout is active and no soft-cap is set,
the einsum path otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_impl._kernels.attention import chunked_attention, dot_product_attention, merge_heads_project
from flax_impl.cache import starts_at_zero, write
from flax_impl.config import FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.dropout import Dropout
from flax_impl.masks import (  # noqa: F401  (re-exported: the attention's mask and kind names)
    NO_WINDOW,
    LayerKind,
    first_layer_kind,
    from_torch_mha_mask,
    group_rows,
    layer_kinds,
    mask_rules,
)
from flax_impl.norm import LayerNorm, RMSNorm
from flax_impl.positions import alibi_slopes, rotate_qk, scheme
from flax_impl.sharding import (
    QKV_ACTIVATION,
    REPLICATED_MATRIX,
    REPLICATED_VECTOR,
    constrain,
    parallel_linear,
    param_metadata,
)


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


def attention_scale(config: TransformerConfig) -> float:
    """The factor on q.k: `attention_multiplier` if set (Granite), else 1 / sqrt(`query_pre_attn_scalar`) (Gemma
    2/3), else 1 / sqrt(head_dim)."""
    if config.attention_multiplier is not None:
        return config.attention_multiplier
    return (config.query_pre_attn_scalar or config.head_dim) ** -0.5


class LayerNormPerHead(nnx.Module):
    """LayerNorm over H of x (..., heads, H) with each head's own `scale` (heads, H) and no bias, in float32
    (StableLM's StableLmLayerNormPerHead, one nn.LayerNorm(H, bias=False) per head; Cohere's CohereLayerNorm);
    times (offset + scale), `scale` starting at 1 - offset (as `flax_impl.norm`'s norms)."""

    def __init__(
        self, heads: int, head_dim: int, *, epsilon: float, offset: float = 0.0, param_dtype: jnp.dtype = jnp.float32
    ):
        self.epsilon, self.offset = epsilon, offset
        scale = jnp.full((heads, head_dim), 1.0 - offset, param_dtype)
        self.scale = nnx.Param(scale, **param_metadata(REPLICATED_MATRIX))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)  # (..., heads, H)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.epsilon)
        return (y * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def make_qk_norms(config: TransformerConfig, flax_config: FlaxConfig) -> tuple[Any, Any]:
    """(q_norm, k_norm) for `config.qk_norm` (flax_impl.attention_config.QK_NORMS), or (None, None); epsilon
    `norm_eps`, offset `norm_offset` (Gemma 3's (1 + w) QK-norm: norm_offset 1) as every other norm."""
    name, N, K, H, eps = config.qk_norm, config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    dtype, offset = jnp.dtype(flax_config.param_dtype), config.norm_offset
    if name == "none":
        return None, None
    if name == "layernorm_per_head":
        return tuple(LayerNormPerHead(n, H, epsilon=eps, offset=offset, param_dtype=dtype) for n in (N, K))
    meta = param_metadata(REPLICATED_VECTOR)
    if name == "layernorm":
        kw = dict(epsilon=eps, offset=offset, use_bias=config.norm_bias, param_dtype=dtype, scale_metadata=meta,
                  bias_metadata=meta)  # fmt: skip
        return LayerNorm(H, **kw), LayerNorm(H, **kw)
    widths = (N * H, K * H) if name == "rmsnorm_full_width" else (H, H)
    return tuple(RMSNorm(w, epsilon=eps, offset=offset, param_dtype=dtype, scale_metadata=meta) for w in widths)


class MultiHeadAttention(nnx.Module):
    """Self-attention over x (B, L, D) -> (B, L, D), with an optional KV cache.

    Parameters: `in_proj` (D -> (N + 2K) H, columns [q (N H) | k (K H) | v (K H)], head h = columns h*H:(h+1)*H
    of each; with K = N and H = D / N the transpose of nn.MultiheadAttention's `in_proj_weight` (3D, D)),
    `out_proj` (N H -> D; H = `head_dim`, D / N unless set), and with `qk_norm` the norms `q_norm`, `k_norm`
    (`make_qk_norms`), applied to q and k before RoPE: per head after the split into heads, or over the whole
    projection width before it ("rmsnorm_full_width"). Scores q.k * `attention_scale(config)` (1 / sqrt(H) by
    default), soft-capped to c tanh(s / c) if `attn_logit_softcap` = c, then the bias and the mask; softmax in
    float32, dropout on the probabilities (train mode). RoPE on q and k and ALiBi on the scores according to
    `config.position`, causal masking if `config.causal`, within the last `sliding_window` positions on the
    layers that have one; both per layer from the layer's `LayerKind` (`mask_rules`, `flax_impl.rope`).
    Grouped-query attention (K = `n_kv_heads` < N): query head n reads kv head n // (N / K); the kv heads are
    never repeated: the G = N / K query heads of a kv head are attended as G blocks of query rows.

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
        self.out_proj = parallel_linear(flax_config, N * H, D, "row", use_bias=config.out_bias, rngs=rngs)
        self.q_norm, self.k_norm = (nnx.data(n) if n is None else n for n in make_qk_norms(config, flax_config))
        self.dropout = Dropout(config.attention_dropout, rngs=rngs)
        if flax_config.attention_impl == "dot_product_attention" and config.attn_logit_softcap is not None:
            raise ValueError(
                f"attention_impl='dot_product_attention' has no soft-capping (attn_logit_softcap="
                f"{config.attn_logit_softcap!r}): use attention_impl='einsum' or 'auto'"
            )

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
            kind: this layer's `LayerKind`; None: the config's first layer's.
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
        kind = first_layer_kind(cfg) if kind is None else kind
        causal = (L, 0) if cfg.causal else None  # query slot l sees keys 0 .. l + offset: the kernel skips the rest
        if cache is None:
            if attention_mask is not None:
                check_attention_mask(attention_mask, B, cfg.n_heads, L, L)
                x = nan_rows_of_bad_mask(x, attention_mask)
            q, k, v = self._project(x, positions, kind)  # (B, L, N, H), (B, L, K, H), (B, L, K, H)
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, L, H)
            q_slots = jnp.arange(L)
        else:
            if jnp.ndim(attention_mask) != 2 or jnp.shape(attention_mask)[0] != B:
                shape = jnp.shape(attention_mask)
                raise ValueError(f"with a cache, attention_mask must be the (B, S) slot mask, got shape {shape}")
            q, k, v = self._project(x, positions, kind)
            real = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, L, axis=1)  # (B, L)
            keys, values = written = write(cache[0], cache[1], k, v, real, cache_index)  # (B, K, S, H) each
            q_slots = cache_index + jnp.arange(L)
            causal = (L, 0) if starts_at_zero(cache_index) else None  # else traced: every chunk reads every slot
            if causal:  # a fresh cache: the only keys are this call's own, at slots 0 .. L - 1
                keys, values, attention_mask = keys[:, :, :L], values[:, :, :L], attention_mask[:, :L]
        slopes = alibi_slopes(cfg.n_heads, cfg.alibi_max_bias) if scheme(cfg.position).biases_scores else None
        allowed, bias = mask_rules(
            attention_mask, q_slots, keys.shape[2], causal=cfg.causal, window=kind.window, slopes=slopes
        )
        out = self._attend(q, keys, values, bias, allowed, keys_zeroed=cache is not None, causal=causal)
        return out if cache is None else (out, written)

    def _project(
        self, x: jax.Array, positions: jax.Array | None, kind: LayerKind
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q (B, L, N, H), k and v (B, L, K, H), QK-norm and RoPE applied to q and k."""
        cfg = self.config
        B, L, _ = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if cfg.qk_norm == "rmsnorm_full_width":  # OLMo 2: over all of q's and k's projection width
            qkv = self.in_proj(x)  # (B, L, (N + 2K) H)
            q = self.q_norm(qkv[..., : N * H]).reshape(B, L, N, H)
            k = self.k_norm(qkv[..., N * H : (N + K) * H]).reshape(B, L, K, H)
            v = qkv[..., (N + K) * H :].reshape(B, L, K, H)
        elif K == N:
            qkv = self.in_proj(x).reshape(B, L, 3, N, H)  # (B, L, 3, N, H)
            qkv = constrain(qkv, QKV_ACTIVATION)  # under a mesh: whole heads per device (no-op without one)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, N, H)
        else:
            qkv = self.in_proj(x)  # (B, L, (N + 2K) H)
            q = qkv[..., : N * H].reshape(B, L, N, H)
            k = qkv[..., N * H : (N + K) * H].reshape(B, L, K, H)
            v = qkv[..., (N + K) * H :].reshape(B, L, K, H)
        if self.q_norm is not None and cfg.qk_norm != "rmsnorm_full_width":  # per head, over H
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_qk(cfg, q, k, jnp.arange(L) if positions is None else positions, kind)
        return q, k, v

    def _attend(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        bias: jax.Array | None,
        allowed: jax.Array | None,
        keys_zeroed: bool,
        causal: tuple[int, int] | None = None,
    ) -> jax.Array:
        """softmax(cap(q.k^T * scale) + bias, masked).v through the configured kernel, then out_proj.

        q (B, L, N, H); k, v (B, K, S, H); `keys_zeroed`: keys no query may read are zero already (a cache);
        `causal`: (L, offset) if query l sees no key after slot l + offset (the einsum kernel skips those).
        """
        B, L, N, H = q.shape
        K, S = k.shape[1], k.shape[2]
        q = q * jnp.asarray(attention_scale(self.config), q.dtype)
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
            zero_dead=not keys_zeroed, softcap=self.config.attn_logit_softcap, causal=causal,
        )  # fmt: skip
        # The backward pass redoes the (B, N, L, H) -> (B, L, D) transpose for out_proj's weight gradient, so that
        # only the heads-major output, which the attention gradient keeps anyway, is kept.
        return merge_heads_project(self.out_proj, out.reshape(B, N, L, H))

    def _use_dot_product_attention(self) -> bool:
        """`attention_impl`: "auto" takes jax.nn.dot_product_attention on GPU/TPU unless attention dropout is
        active or a soft-cap is set (it has neither), the einsum path on CPU (docs/design.md#attention)."""
        impl = self.flax_config.attention_impl
        dropout_active = not self.dropout.deterministic and 0.0 < self.dropout.rate
        if impl == "dot_product_attention" and dropout_active:
            raise ValueError(
                "attention_impl='dot_product_attention' has no attention dropout: set attention_dropout=0, call "
                "model.eval(), or use attention_impl='einsum' / 'auto'"
            )
        if impl == "auto":
            plain = not dropout_active and self.config.attn_logit_softcap is None
            return plain and jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")
        return impl == "dot_product_attention"
