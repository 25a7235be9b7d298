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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_impl._kernels.attention import chunked_attention, dot_product_attention, merge_heads_project
from flax_impl.config import FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.dropout import Dropout
from flax_impl.positions import alibi_slopes, rotate_qk, scheme, score_bias
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


def _allowed_and_additive(
    mask: jax.Array | None, q_len: int, k_len: int, causal: bool, window: int | None = None
) -> tuple[jax.Array | None, jax.Array | None]:
    """Split a mask into a bool 'may attend' (broadcastable to (B, N, L, S)) and an additive float part."""
    allowed, additive = None, None
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim == 2:
            allowed = mask.astype(jnp.bool_)[:, None, None, :]  # (B, 1, 1, S)
        elif mask.dtype == jnp.bool_:
            allowed = mask
        else:
            additive = mask.astype(jnp.float32)
            allowed = ~jnp.isneginf(additive)
            additive = jnp.where(allowed, additive, 0.0)
    if causal:
        i = jnp.arange(k_len - q_len, k_len)[:, None]  # (L, 1) absolute query positions
        j = jnp.arange(k_len)[None, :]  # (1, S)
        tril = j <= i
        if window is not None:  # sliding window: the last `window` positions, the query's own included
            tril = tril & (i - j < window)
        tril = tril[None, None]  # (1, 1, L, S)
        allowed = tril if allowed is None else allowed & tril
    return allowed, additive


class MultiHeadAttention(nnx.Module):
    """Self-attention over x (B, L, D) -> (B, L, D).

    Parameters: `in_proj` (D -> (N + 2K) H, columns [q (N H) | k (K H) | v (K H)], head h = columns h*H:(h+1)*H
    of each; with K = N the transpose of nn.MultiheadAttention's `in_proj_weight` (3D, D)) and `out_proj`
    (D -> D). Scores q.k / sqrt(H), softmax in float32, dropout on the probabilities (train mode), RoPE on q and
    k and ALiBi on the scores according to `config.position`, causal masking if `config.causal` (within the last
    `config.sliding_window` positions if set). Grouped-query attention (K = `n_kv_heads` < N): query head n
    reads kv head n // (N / K).
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
        self, x: jax.Array, attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None
    ) -> jax.Array:
        """x (B, L, D) -> (B, L, D). `positions`: (L,) or (B, L) RoPE positions, default 0 .. L - 1."""
        return self._forward(x, attention_mask, positions)[0]

    def prefill(
        self, x: jax.Array, attention_mask: jax.Array | None, positions: jax.Array, cache_len: int
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The forward of a whole prompt, also returning its keys and values as a cache of `cache_len` slots.

        Args:
            x: (B, L, D), the prompt at slots 0 .. L - 1.
            attention_mask: as for `__call__` ((B, L) 1 = real token for left-padded prompts), or None.
            positions: (B, L) RoPE positions (for a left-padded row, its first real token is position 0).
            cache_len: S >= L, the slots the cache holds.
        Returns:
            (out (B, L, D), (k, v)): k and v (B, K, S, H), after RoPE; padded slots (a (B, L) mask's zeros)
            and slots L .. S - 1 are zero.
        """
        out, (k, v) = self._forward(x, attention_mask, positions)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, L, H)
        if attention_mask is not None and jnp.ndim(attention_mask) == 2:  # padding enters the cache as zeros,
            real = jnp.asarray(attention_mask).astype(bool)[:, None, :, None]  # so a NaN there cannot reach a
            k, v = jnp.where(real, k, 0), jnp.where(real, v, 0)  # real token through 0 * NaN
        pad = ((0, 0), (0, 0), (0, cache_len - x.shape[1]), (0, 0))
        return out, (jnp.pad(k, pad), jnp.pad(v, pad))

    def decode(
        self,
        x: jax.Array,
        kv: tuple[jax.Array, jax.Array],
        index: jax.Array,
        key_mask: jax.Array,
        positions: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of L new tokens at slots index .. index + L - 1 over the cache, which they are written into.

        The new token at slot i attends to the cached slots j <= i that `key_mask` marks real (and, with a
        sliding window W, i - j < W); ALiBi's distance is i - j. The kv heads stay grouped: query head n reads
        kv head n // (N / K) without repeating the cache.

        Args:
            x: (B, L, D).
            kv: (k, v), each (B, K, S, H), from `prefill` or a previous `decode`.
            index: int32 scalar, the first slot written (traced under jit; index + L <= S is the caller's).
            key_mask: (B, S) bool, True = a real token is (or is now being) written at that slot.
            positions: (B, L) RoPE positions of the new tokens.
        Returns:
            (out (B, L, D), (k, v) with the new tokens written).
        """
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = self._project(x, positions)  # (B, L, N, H), (B, L, K, H), (B, L, K, H)
        k_cache = jax.lax.dynamic_update_slice(kv[0], k.transpose(0, 2, 1, 3).astype(kv[0].dtype), (0, 0, index, 0))
        v_cache = jax.lax.dynamic_update_slice(kv[1], v.transpose(0, 2, 1, 3).astype(kv[1].dtype), (0, 0, index, 0))
        S = k_cache.shape[2]
        q = (q * jnp.asarray(H**-0.5, q.dtype)).reshape(B, L, K, N // K, H)  # head n = (n // G, n % G)
        scores = jnp.einsum("blkgh,bksh->bkgls", q, k_cache, preferred_element_type=jnp.float32)  # (B, K, G, L, S)
        i = index + jnp.arange(L)[:, None]  # (L, 1) slots of the new tokens
        j = jnp.arange(S)[None, :]  # (1, S)
        allowed = (j <= i) & key_mask[:, None, :]  # (B, L, S)
        if cfg.sliding_window is not None:
            allowed = allowed & (i - j < cfg.sliding_window)
        if scheme(cfg.position).biases_scores:  # ALiBi: -m (i - j) for the keys j <= i that remain
            slopes = jnp.asarray(alibi_slopes(N, cfg.alibi_max_bias)).reshape(1, K, N // K, 1, 1)
            scores = scores - slopes * (i - j).astype(jnp.float32)
        allowed = allowed[:, None, None]  # (B, 1, 1, L, S)
        scores = jnp.where(allowed, scores, -jnp.inf)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        e = jnp.where(allowed, jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        probs = e / jnp.where(denom > 0, denom, 1.0)  # a row with no key: zeros
        out = jnp.einsum("bkgls,bksh->blkgh", probs.astype(v_cache.dtype), v_cache)  # (B, L, K, G, H)
        return self.out_proj(out.reshape(B, L, D)), (k_cache, v_cache)

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

    def _forward(
        self, x: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """(out (B, L, D), (k, v) (B, L, K, H)): self-attention of x over itself."""
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        if D != cfg.d_model:
            raise ValueError(f"attention input width {D} != d_model={cfg.d_model}")
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, N, L, L)
            x = nan_rows_of_bad_mask(x, attention_mask)
        q, k_kv, v_kv = self._project(x, positions)
        # grouped-query: query head n reads kv head n // (N / K) (repeat, not tile)
        k = k_kv if K == N else jnp.repeat(k_kv, N // K, axis=2)  # (B, L, N, H)
        v = v_kv if K == N else jnp.repeat(v_kv, N // K, axis=2)  # (B, L, N, H)
        q = q * jnp.asarray(H**-0.5, q.dtype)
        bias = score_bias(cfg, L, L)  # (N, L, S) or None
        allowed, additive = _allowed_and_additive(attention_mask, L, L, cfg.causal, cfg.sliding_window)
        if bias is not None:
            bias = bias[None] if additive is None else bias[None] + additive  # (B|1, N|1, L|1, S)
        elif additive is not None:
            bias = additive
        if self._use_dot_product_attention():
            out = dot_product_attention(q, k, v, bias, allowed)  # (B, L, N, H)
            return self.out_proj(out.reshape(B, L, D)), (k_kv, v_kv)
        out = chunked_attention(
            q.transpose(0, 2, 1, 3),  # (B, N, L, H)
            k.transpose(0, 2, 1, 3),  # (B, N, S, H)
            v.transpose(0, 2, 1, 3),  # (B, N, S, H)
            bias,
            allowed,
            self.dropout.keep_bits((B, N, L, L)),
            self.dropout.rate,
        )  # (B, N, L, H)
        # The backward pass redoes the (B, N, L, H) -> (B, L, D) transpose for out_proj's weight gradient, so that
        # only the heads-major output, which the attention gradient keeps anyway, is kept.
        return merge_heads_project(self.out_proj, out), (k_kv, v_kv)

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
