"""Attention kernels behind `flax_impl.attention.MultiHeadAttention`: pure functions, heads-major.

Why they exist (docs/design.md#attention): `chunked_attention` computes softmax(q.k^T + bias).v one block of
queries at a time, so that a block's float32 scores stay in cache, and writes its gradient out (FlashAttention's
recomputation), so that training keeps no (B, N, L, S) array per layer. `dot_product_attention` wraps
`jax.nn.dot_product_attention` (its default implementation, XLA's) with our fully-masked-row convention.
`merge_heads_project` is a recompute region: the backward pass redoes the heads merge instead of keeping a second
copy of the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.dropout import keep_scale, scale_kept


def merge_heads_project(out_proj: nnx.Linear, out: jax.Array) -> jax.Array:
    """out_proj of the heads-major attention output: (B, N, L, H) -> (B, L, N * H) -> (B, L, D), as a recompute
    region (`jax.checkpoint` over the layer's split state, so that nothing is written back to the module: it may
    be called inside a loop body). A layer that draws random bits (a LoRA adapter's dropout, flax_impl.lora) is
    called as it is instead, so that its rng stream advances."""
    if nnx.state(out_proj, nnx.RngState):
        B, N, L, H = out.shape
        return out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, N * H))
    graphdef, state = nnx.split(out_proj)

    @jax.checkpoint
    def project(state: nnx.State, out: jax.Array) -> jax.Array:
        B, N, L, H = out.shape
        return nnx.merge(graphdef, state)(out.transpose(0, 2, 1, 3).reshape(B, L, N * H))

    return project(state, out)


# Query chunking of the einsum path: the float32 score block (B, N, c, S) of one chunk is kept under this size, so
# that it stays in cache between the q.k^T matmul, the softmax and the probs.v matmul; why and how the size was
# chosen: docs/design.md#attention.
SCORE_BLOCK_BYTES = 8 << 20
MAX_QUERY_CHUNKS = 16  # chunks are unrolled at trace time: bound the program size


def query_chunk(batch: int, n_heads: int, q_len: int, k_len: int) -> int:
    """Queries per chunk of the einsum path: the largest power of two c (>= 16) with B*N*c*S*4 bytes <=
    SCORE_BLOCK_BYTES, but at least ceil(L / MAX_QUERY_CHUNKS); L itself (one chunk) if that covers L; >= 1."""
    c = 16
    while c < q_len and batch * n_heads * (2 * c) * k_len * 4 <= SCORE_BLOCK_BYTES:
        c *= 2
    c = max(c, -(-q_len // MAX_QUERY_CHUNKS))
    return max(min(c, q_len), 1)  # at least 1, so that L = 0 still has a (empty) chunk size


def _rows(x: jax.Array | None, rows: slice) -> jax.Array | None:
    """Slice the query axis (2) of a (B|1, N|1, L|1, S) mask or bias; a broadcast (size 1) axis stays."""
    if x is None or x.shape[2] == 1:
        return x
    return x[:, :, rows]


def _keys(x: jax.Array | None, end: int) -> jax.Array | None:
    """The first `end` keys (last axis) of a (..., S) mask or bias; None stays None."""
    return x if x is None or x.shape[-1] == end else x[..., :end]


def _key_end(rows: slice, causal: tuple[int, int] | None, k_len: int) -> int:
    """How many keys a chunk of query rows can attend to: S, or with `causal` = (L, offset), where row r is the
    query at position r % L (G blocks of L rows) and sees keys 0 .. r % L + offset, up to the chunk's furthest
    row's last key, rounded up to a multiple of 8 (dropout bits are packed 8 keys to a byte)."""
    if causal is None:
        return k_len
    q_len, offset = causal
    first, last = rows.start, rows.stop - 1
    furthest = last % q_len if first // q_len == last // q_len else q_len - 1
    return min(k_len, -(-(furthest + offset + 1) // 8) * 8)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None = None,
    allowed: jax.Array | None = None,
    keep: jax.Array | None = None,
    rate: float = 0.0,
    chunk: int | None = None,
    *,
    zero_dead: bool = True,
    softcap: float | None = None,
    causal: tuple[int, int] | None = None,
) -> jax.Array:
    """softmax(q.k^T + bias, masked), dropped out, . v, heads-major, with a written-out gradient.

    Computed one chunk of `chunk` queries at a time (default `query_chunk`): scores in float32,
    e = exp(s - rowmax), dropout on e, out = (e . v) / rowsum(e), the normalisation applied to the (c, H) output
    rather than the (c, S) probabilities (the same value: dropout(p) = dropout(e) / rowsum(e)). Rows with no key
    to attend to give zeros.

    The gradient is written out (as in FlashAttention, Dao et al. 2022) rather than left to autodiff: the
    backward keeps q, k, v, the output and the row log-sum-exp, and recomputes each chunk's probabilities from
    them. Autodiff keeps two (B, N, L, S) float32 arrays per layer instead (the probabilities before and after
    dropout), which a scan over layers stacks and copies every step.

    Args:
        q: (B, N, L, H), already scaled: the kernel applies no 1/sqrt(H).
        k: (B, N, S, H).
        v: (B, N, S, H).
        bias: float (B|1, N|1, L|1, S) added to the scores, or None.
        allowed: bool, broadcast as `bias`; True = may attend. None: every key.
        keep: the packed dropout mask of (B, N, L, S) from `flax_impl._kernels.dropout.keep_bits`, or None for
            no dropout.
        rate: the dropout rate `keep` was drawn with (sets the 1 / (1 - rate) scale).
        chunk: queries per chunk; None: `query_chunk(B, N, L, S)`.
        zero_dead: zero the keys no query may attend to first (below); False where the caller guarantees they
            are zero (a KV cache holds zeros at padded and unwritten slots), saving a pass over k and v.
        softcap: c > 0 replaces the scores s = q.k^T by c tanh(s / c) before the bias and the mask (Gemma 2's
            attention logit soft-capping); None: the scores as they are. Its gradient is written out too:
            d s = d(c tanh(s / c)) (1 - tanh(s / c)^2).
        causal: (Lq, offset) when `allowed` masks every key after a query's own: the rows of q are blocks of Lq
            query positions (grouped heads: G blocks) and the query at position l sees at most keys 0 .. l +
            offset. Each chunk then reads only the keys its rows can see (a causal prompt does about half the
            work); the result is the same, since the keys left out are masked. None: every chunk reads every key.

    Returns:
        (B, N, L, H) in v's dtype. Empty (zeros of that shape) when B, N, L or S is 0.

    Keys that no query may attend to (padding) are zeroed in k and v before use, so that a NaN or inf there
    never reaches a real query through 0 * NaN in the matmuls.
    """
    B, N, L, H = q.shape
    if 0 in (B, N, L, k.shape[2]):  # nothing to attend to, or no one asking: no chunk, no softmax
        return jnp.zeros((B, N, L, v.shape[-1]), v.dtype)
    if zero_dead:
        k, v = zero_dead_keys(k, allowed, key_axis=2), zero_dead_keys(v, allowed, key_axis=2)
    chunk = chunk or query_chunk(B, N, L, k.shape[2])
    return _attention(q, k, v, bias, allowed, keep, rate, chunk, softcap, causal)


def zero_dead_keys(x: jax.Array, allowed: jax.Array | None, key_axis: int) -> jax.Array:
    """x (keys or values) with the keys that no query may attend to set to 0.

    Args:
        x: heads-major (B, N, S, H) (`key_axis` 2) or (B, S, N, H) (`key_axis` 1); with K < N kv heads,
            (B, K, S, H) or (B, S, K, H), key k read by query heads k G .. k G + G - 1 (G = N / K).
        allowed: bool (B|1, N|1, L|1, S), True = may attend; None: every key is live (x returned as is).
        key_axis: where S is in x.

    Returns:
        x's shape and dtype; a masked-out score is replaced anyway, and a zero there keeps 0 * value finite.
    """
    if allowed is None:
        return x
    live = jnp.any(allowed, axis=2)  # (B|1, N|1, S): some query may read this key
    heads = x.shape[1] if key_axis == 2 else x.shape[2]
    if live.shape[1] not in (1, heads):  # per query head, x per kv head (grouped): live if one head reads it
        live = jnp.any(live.reshape(live.shape[0], heads, -1, live.shape[-1]), axis=2)
    live = live[..., None] if key_axis == 2 else jnp.moveaxis(live, 1, 2)[..., None]  # broadcast as x
    return jnp.where(live, x, jnp.zeros((), x.dtype))


def _row_chunks(q_len: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, q_len)) for start in range(0, q_len, chunk)]


def _chunk_scores(
    q_c: jax.Array, k: jax.Array, bias: jax.Array | None, allowed: jax.Array | None, rows: slice,
    softcap: float | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Scores (B, N, c, S) in float32 of one query chunk, soft-capped, bias added, masked entries at float32 min;
    its mask; tanh(s / c) of the soft-cap (for its gradient), or None."""
    scores = jnp.einsum("bnlh,bnsh->bnls", q_c, k, preferred_element_type=jnp.float32)
    capped = None
    if softcap is not None:
        capped = jnp.tanh(scores / softcap)
        scores = capped * softcap
    if bias is not None:
        scores = scores + _rows(bias, rows)
    mask = _rows(allowed, rows)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return scores, mask, capped


_Residuals = tuple[jax.Array, ...]


def _attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    allowed: jax.Array | None,
    keep: jax.Array | None,
    rate: float,
    chunk: int,
    softcap: float | None,
    causal: tuple[int, int] | None,
) -> tuple[jax.Array, _Residuals]:
    scale = keep_scale(rate, v.dtype)
    outs, lses = [], []
    for rows in _row_chunks(q.shape[2], chunk):
        end = _key_end(rows, causal, k.shape[2])  # the keys this chunk's rows can see: 0 .. end - 1
        k_c, v_c, bias_c, allowed_c = k[:, :, :end], v[:, :, :end], _keys(bias, end), _keys(allowed, end)
        scores, mask, _ = _chunk_scores(q[:, :, rows], k_c, bias_c, allowed_c, rows, softcap)
        rowmax = jnp.max(scores, axis=-1, keepdims=True)  # (B, N, c, 1)
        e = jnp.exp(scores - rowmax)  # (B, N, c, S), <= 1
        denom = jnp.sum(e, axis=-1, keepdims=True)  # (B, N, c, 1), >= 1
        e = e.astype(v.dtype)
        if keep is not None:
            e = scale_kept(e, keep[:, :, rows, : -(-end // 8)], scale)
        out = jnp.einsum("bnls,bnsh->bnlh", e, v_c, preferred_element_type=jnp.float32) / denom  # (B, N, c, H)
        if mask is not None:  # a row with no key to attend to gives zeros, not a uniform average
            out = jnp.where(jnp.any(mask, axis=-1, keepdims=True), out, 0.0)
        outs.append(out.astype(v.dtype))
        lses.append(rowmax + jnp.log(denom))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)  # (B, N, L, H)
    lse = lses[0] if len(lses) == 1 else jnp.concatenate(lses, axis=2)  # (B, N, L, 1)
    return out, (q, k, v, bias, allowed, keep, out, lse)


def _attention_bwd(
    rate: float, chunk: int, softcap: float | None, causal: tuple[int, int] | None, residuals: _Residuals,
    d_out: jax.Array,
) -> tuple:
    """dV = Pd^T dO, dPd = dO V^T, dP = dropout(dPd), dS = P (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q; with a
    soft-cap the bias gets dS and q, k get dS (1 - tanh(s / c)^2).

    dK and dV are accumulated transposed, (B, N, H, S) = Q^T dS and dO^T Pd, and transposed once at the end
    (behind an optimisation barrier, so that XLA does not fold the transpose back into the matmuls): XLA's CPU
    matmul contracts a small transposed (c, H) operand well, a large (c, S) operand over its rows poorly
    (docs/design.md#attention).
    """
    q, k, v, bias, allowed, keep, out, lse = residuals  # out (B, N, L, H), lse (B, N, L, 1)
    scale = keep_scale(rate, v.dtype)
    B, N, S, H = k.shape
    dq, dbias = [], []
    dk_t, dv_t = jnp.zeros((B, N, H, S), jnp.float32), jnp.zeros((B, N, H, S), jnp.float32)  # dK^T, dV^T
    for rows in _row_chunks(q.shape[2], chunk):
        end = _key_end(rows, causal, S)  # as the forward: the keys 0 .. end - 1 this chunk can see
        k_c, v_c, bias_c, allowed_c = k[:, :, :end], v[:, :, :end], _keys(bias, end), _keys(allowed, end)
        q_c, do_c = q[:, :, rows], d_out[:, :, rows]  # (B, N, c, H)
        scores, mask, capped = _chunk_scores(q_c, k_c, bias_c, allowed_c, rows, softcap)
        p = jnp.exp(scores - lse[:, :, rows])  # (B, N, c, S) probabilities
        if mask is not None:  # rows with no key gave zeros: no gradient flows through them
            do_c = jnp.where(jnp.any(mask, axis=-1, keepdims=True), do_c, jnp.zeros((), do_c.dtype))
        dp = jnp.einsum("bnlh,bnsh->bnls", do_c, v_c, preferred_element_type=jnp.float32)  # (B, N, c, end)
        pd = p.astype(v.dtype)
        if keep is not None:  # the forward's dropout, and its gradient
            keep_c = keep[:, :, rows, : -(-end // 8)]
            pd, dp = scale_kept(pd, keep_c, scale), scale_kept(dp, keep_c, scale)
        row_dot = jnp.sum(do_c.astype(jnp.float32) * out[:, :, rows].astype(jnp.float32), -1, keepdims=True)
        ds = p * (dp - row_dot)  # (B, N, c, end) gradient of the (capped) scores
        dv_t = dv_t.at[..., :end].add(jnp.einsum("bnlh,bnls->bnhs", do_c, pd, preferred_element_type=jnp.float32))
        ds_q = (ds if capped is None else ds * (1.0 - capped * capped)).astype(q.dtype)  # of q.k^T
        dq.append(jnp.einsum("bnls,bnsh->bnlh", ds_q, k_c, preferred_element_type=jnp.float32).astype(q.dtype))
        dk_t = dk_t.at[..., :end].add(jnp.einsum("bnlh,bnls->bnhs", q_c, ds_q, preferred_element_type=jnp.float32))
        if bias is not None:  # undo the broadcast of bias to (B, N, c, S); the keys past `end` get 0
            ds_full = ds if end == S else jnp.pad(ds, ((0, 0), (0, 0), (0, 0), (0, S - end)))
            dbias.append(_sum_to(ds_full, bias.shape[:2] + (1 if bias.shape[2] == 1 else ds.shape[2], S)))
    dq = dq[0] if len(dq) == 1 else jnp.concatenate(dq, axis=2)
    dk_t, dv_t = jax.lax.optimization_barrier((dk_t, dv_t))
    dk, dv = jnp.swapaxes(dk_t, 2, 3), jnp.swapaxes(dv_t, 2, 3)
    if bias is not None:
        dbias = sum(dbias) if bias.shape[2] == 1 else jnp.concatenate(dbias, axis=2)
        dbias = dbias.astype(bias.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dbias if bias is not None else None, None, None


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the axes where `shape` has size 1 (undo a broadcast), keeping them."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape, strict=True)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    allowed: jax.Array | None,
    keep: jax.Array | None,
    rate: float,
    chunk: int,
    softcap: float | None,
    causal: tuple[int, int] | None,
) -> jax.Array:
    return _attention_fwd(q, k, v, bias, allowed, keep, rate, chunk, softcap, causal)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, allowed: jax.Array | None
) -> jax.Array:
    """jax.nn.dot_product_attention (implementation=None: XLA), no dropout, with our fully-masked-row convention.

    Rows with no key to attend to give zeros (jax.nn.dot_product_attention itself returns the mean of v there);
    keys no query may attend to are zeroed first (`zero_dead_keys`); empty shapes give an empty result.

    Args:
        q: (B, L, N, H), already scaled: the kernel applies no 1/sqrt(H).
        k: (B, S, K, H), K dividing N (grouped-query: query head n reads kv head n // (N / K)).
        v: (B, S, K, H).
        bias: float (B|1, N|1, L|1, S) added to the scores, or None.
        allowed: bool (B|1, N|1, L|1, S); True = may attend. None: every key.

    Returns:
        (B, L, N, H).
    """
    if 0 in q.shape[:3] or k.shape[1] == 0:
        return jnp.zeros(q.shape[:3] + (v.shape[-1],), v.dtype)
    k, v = zero_dead_keys(k, allowed, key_axis=1), zero_dead_keys(v, allowed, key_axis=1)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], q.shape[1], k.shape[1])).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=allowed, scale=1.0)  # (B, L, N, H)
    if allowed is not None:
        live = jnp.any(allowed, axis=-1)  # (B|1, N|1, L|1)
        out = jnp.where(jnp.moveaxis(live, 1, 2)[..., None], out, 0.0)  # (B|1, L|1, N|1, 1)
    return out
