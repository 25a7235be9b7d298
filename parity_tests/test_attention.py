"""MultiHeadAttention, Flax vs torch_ref: every position scheme and mask form; masks against their meaning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import POSITIONS, randn, small_config, twins

import flax_impl as fi
import torch_ref as tr
from flax_impl._kernels.attention import _key_end, _row_chunks, chunked_attention
from flax_impl._kernels.dropout import keep_bits, unpack_keep_bits
from flax_impl.tolerances import BLOCK, EXACT, GRAD_REL

B, L = 2, 7


def run_both(cfg, x, mask=None):
    f, t = twins("MultiHeadAttention", cfg)
    y = np.asarray(f(jnp.asarray(x), None if mask is None else jnp.asarray(mask)))
    yt = t(torch.from_numpy(x), None if mask is None else torch.from_numpy(mask)).detach().numpy()
    return y, yt


def padding_mask():
    m = np.ones((B, L), np.int32)
    m[1, 4:] = 0
    return m


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_parity(position, causal, masked, rng):
    cfg = small_config(position=position, causal=causal)
    y, yt = run_both(cfg, randn(rng, B, L, cfg.d_model), padding_mask() if masked else None)
    np.testing.assert_allclose(y, yt, rtol=0, atol=BLOCK)


def test_mask_forms_agree_with_each_other(rng):
    """(B, S) ints, (B, 1, 1, S) bools and a float -inf/0 mask mean the same thing."""
    cfg = small_config()
    x = randn(rng, B, L, cfg.d_model)
    pad = padding_mask()
    as_bool = pad.astype(bool)[:, None, None, :]
    as_float = np.where(as_bool, 0.0, -np.inf).astype(np.float32)
    f, t = twins("MultiHeadAttention", cfg)
    outs = [np.asarray(f(jnp.asarray(x), jnp.asarray(m))) for m in (pad, as_bool, as_float)]
    outs += [t(torch.from_numpy(x), torch.from_numpy(m)).detach().numpy() for m in (pad, as_bool, as_float)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=BLOCK)


def test_padded_keys_do_not_matter(rng):
    """Changing the content at masked key positions leaves every output unchanged (a mask that leaks fails)."""
    cfg = small_config()
    f, _ = twins("MultiHeadAttention", cfg)
    x = randn(rng, B, L, cfg.d_model)
    pad = padding_mask()
    x2 = x.copy()
    x2[1, 4:] = randn(rng, L - 4, cfg.d_model)
    y1 = np.asarray(f(jnp.asarray(x), jnp.asarray(pad)))
    y2 = np.asarray(f(jnp.asarray(x2), jnp.asarray(pad)))
    np.testing.assert_allclose(y1[1, :4], y2[1, :4], rtol=0, atol=EXACT)  # masked weights are exactly 0


def test_causal_means_no_look_ahead(rng):
    cfg = small_config(causal=True)
    f, _ = twins("MultiHeadAttention", cfg)
    x = randn(rng, B, L, cfg.d_model)
    x2 = x.copy()
    x2[:, 5:] = randn(rng, B, L - 5, cfg.d_model)
    y1, y2 = np.asarray(f(jnp.asarray(x))), np.asarray(f(jnp.asarray(x2)))
    np.testing.assert_allclose(y1[:, :5], y2[:, :5], rtol=0, atol=EXACT)  # future weights are exactly 0


def test_fully_masked_rows_give_zeros_on_both_sides(rng):
    cfg = small_config(bias=False)  # no out_proj bias, so a zero attention output stays exactly zero
    x = randn(rng, B, L, cfg.d_model)
    allowed = np.ones((B, 1, L, L), bool)
    allowed[0, :, 2, :] = False  # query 2 of batch 0 may attend to nothing
    y, yt = run_both(cfg, x, allowed)
    assert np.all(y[0, 2] == 0) and np.all(yt[0, 2] == 0)
    assert np.isfinite(y).all() and np.isfinite(yt).all()
    np.testing.assert_allclose(y, yt, rtol=0, atol=BLOCK)
    # torch's own softmax would give NaN for that row: our zeros are a decision, documented
    scores = torch.full((L,), float("-inf"))
    assert torch.isnan(torch.softmax(scores, -1)).all()


def test_from_torch_mha_mask_matches_nn_multihead_attention(rng):
    """Our attention with a converted mask equals nn.MultiheadAttention with its own (True = masked out)."""
    cfg = small_config()
    f, _ = twins("MultiHeadAttention", cfg)
    mha = torch.nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True).eval()
    mha.load_state_dict({k.removeprefix(""): v for k, v in tr.from_numpy_state_dict(fi.to_numpy_state_dict(f)).items()})
    x = randn(rng, B, L, cfg.d_model)
    torch_mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)  # causal: True above the diagonal = masked
    ref, _ = mha(*(torch.from_numpy(x),) * 3, attn_mask=torch_mask, need_weights=False)
    ours = f(jnp.asarray(x), fi.from_torch_mha_mask(jnp.asarray(torch_mask.numpy()))[None, None])
    np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), rtol=0, atol=BLOCK)
    assert torch.equal(tr.from_torch_mha_mask(torch_mask), ~torch_mask)


@pytest.mark.parametrize(
    "mask, error, words",
    [
        (np.ones((B, L + 1), np.int32), ValueError, r"shape \(2, 7\)"),
        (np.ones((B, L), np.float32), TypeError, "bool or integer"),
        (np.full((B, L), 2, np.int32), ValueError, "0/1"),
        (np.ones((B, 1, L, L), np.int32), TypeError, "bool .* or float"),
        (np.ones((B, 1, L), bool), ValueError, "must be"),
        (np.ones((3, 1, L, L), bool), ValueError, r"\(2, 4, 7, 7\)"),
        (np.ones((B, 3, L, L), bool), ValueError, r"got \(2, 3, 7, 7\)"),
    ],
)
def test_bad_masks_raise(mask, error, words, rng):
    cfg = small_config()
    f, _ = twins("MultiHeadAttention", cfg)
    with pytest.raises(error, match=words):
        f(jnp.asarray(randn(rng, B, L, cfg.d_model)), jnp.asarray(mask))


def _softmax_attention_formula(q, k, v, bias, allowed, keep, rate, softcap=None):
    """softmax(cap(q.k^T) + bias, masked) (dead rows zero), dropped out with the same packed mask, . v: plain jnp;
    cap(s) = c tanh(s / c) with a soft-cap c, else s."""
    scores = jnp.einsum("bnlh,bnsh->bnls", q, k)
    scores = scores if softcap is None else softcap * jnp.tanh(scores / softcap)
    scores = scores + (0.0 if bias is None else bias)
    if allowed is not None:
        scores = jnp.where(allowed, scores, -1e30)
    p = jax.nn.softmax(scores, axis=-1)
    if allowed is not None:
        p = p * jnp.any(allowed, axis=-1, keepdims=True)
    if keep is not None:
        p = jnp.where(unpack_keep_bits(keep, p.shape), p / (1.0 - rate), 0.0)
    return jnp.einsum("bnls,bnsh->bnlh", p, v)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("case", ["plain", "bias", "mask+bias+dropout", "row-broadcast mask+bias+dropout"])
def test_written_out_gradient_matches_autodiff_of_the_formula(case, chunk, softcap, rng):
    """The einsum path's gradient (probabilities recomputed from the row log-sum-exp, dropout from the packed
    bits, query chunks, the soft-cap's tanh recomputed) against jax.grad of plain softmax attention with the same
    mask and soft-cap: q, k, v and the bias."""
    Bq, N, Lq, H, rate = 2, 3, 11, 4, 0.25
    q, k, v, w = (jnp.asarray(randn(rng, Bq, N, Lq, H)) for _ in range(4))
    q = q * 2.0  # scores up to ~10: the soft-cap of 1.5 bends most of them
    bias = jnp.asarray(randn(rng, 1, N, Lq, Lq)) if case != "plain" else None
    allowed = keep = None
    if "mask" in case:
        allowed = rng.random((Bq, 1, Lq, Lq)) > 0.3
        allowed[0, 0, 4] = False  # a query with no key: zeros, and no gradient through it
        allowed = jnp.asarray(allowed)
        keep = keep_bits(jax.random.key(0), rate, (Bq, N, Lq, Lq))
    if "row-broadcast" in case:
        bias, allowed = bias[:, :, :1], allowed[:, :, :1]
    drop = rate if keep is not None else 0.0

    def ours(q, k, v, bias):
        return jnp.sum(chunked_attention(q, k, v, bias, allowed, keep, drop, chunk, softcap=softcap) * w)

    def formula(q, k, v, bias):
        return jnp.sum(_softmax_attention_formula(q, k, v, bias, allowed, keep, drop, softcap) * w)

    y = chunked_attention(q, k, v, bias, allowed, keep, drop, chunk, softcap=softcap)
    want = _softmax_attention_formula(q, k, v, bias, allowed, keep, drop, softcap)
    np.testing.assert_allclose(y, want, rtol=0, atol=BLOCK)
    if softcap is not None:  # the cap changes the result: a kernel ignoring it fails here
        assert np.abs(np.asarray(want - _softmax_attention_formula(q, k, v, bias, allowed, keep, drop))).max() > 0.1
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads = jax.grad(ours, argnums)(q, k, v, bias)
    expected = jax.grad(formula, argnums)(q, k, v, bias)
    for name, g, e in zip("qkvb"[: len(argnums)], grads, expected, strict=True):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g, e, rtol=0, atol=GRAD_REL * float(jnp.max(jnp.abs(e))), err_msg=name)


@pytest.mark.parametrize("chunk,offset", [(16, 0), (5, 3), (8, 0)])
def test_causal_key_skipping_matches_the_formula(chunk, offset, rng):
    """`causal=(L, offset)`: each query chunk reads only the keys up to its furthest row's, over G = 2 blocks of
    L rows (grouped heads; chunks of 5 straddle the blocks), with padding, a bias, dropout and a soft-cap: values
    and the gradients of q, k, v and the bias equal autodiff of the formula over every key."""
    Bq, K, G, Lq, H, rate = 2, 2, 2, 24, 4, 0.25
    S = Lq + offset  # queries at slots offset .. offset + L - 1 of a cache
    ends = [_key_end(rows, (Lq, offset), S) for rows in _row_chunks(G * Lq, chunk)]
    assert min(ends) < S and max(ends) == S  # some chunks read fewer keys, some (straddling) all
    q = jnp.asarray(randn(rng, Bq, K, G * Lq, H)) * 2.0
    k, v = (jnp.asarray(randn(rng, Bq, K, S, H)) for _ in range(2))
    w = jnp.asarray(randn(rng, Bq, K, G * Lq, H))
    bias = jnp.asarray(randn(rng, 1, K, G * Lq, S))
    rows = np.tile(np.arange(Lq), G)[:, None] + offset  # the slot of each query row
    allowed = (np.arange(S)[None, :] <= rows)[None, None] & (rng.random((Bq, 1, 1, S)) > 0.2)
    allowed = jnp.asarray(allowed)
    keep = keep_bits(jax.random.key(0), rate, (Bq, K, G * Lq, S))

    def ours(q, k, v, bias):
        out = chunked_attention(q, k, v, bias, allowed, keep, rate, chunk, softcap=1.5, causal=(Lq, offset))
        return jnp.sum(out * w)

    def formula(q, k, v, bias):
        return jnp.sum(_softmax_attention_formula(q, k, v, bias, allowed, keep, rate, 1.5) * w)

    y = chunked_attention(q, k, v, bias, allowed, keep, rate, chunk, softcap=1.5, causal=(Lq, offset))
    np.testing.assert_allclose(y, _softmax_attention_formula(q, k, v, bias, allowed, keep, rate, 1.5), rtol=0,
                               atol=BLOCK)  # fmt: skip
    grads = jax.grad(ours, (0, 1, 2, 3))(q, k, v, bias)
    expected = jax.grad(formula, (0, 1, 2, 3))(q, k, v, bias)
    for name, g, e in zip("qkvb", grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=GRAD_REL * float(jnp.max(jnp.abs(e))), err_msg=name)


def test_backward_keeps_no_score_sized_array(rng):
    """In train mode with attention dropout, what the backward keeps is O(L) per query: q, k, v, the output,
    the row log-sum-exp and the packed mask, and no float (B, N, L, S) array (autodiff kept two)."""
    cfg = small_config(attention_dropout=0.1)
    attn = fi.MultiHeadAttention(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    attn.train()
    graph, params, rest = nnx.split(attn, nnx.Param, ...)
    x = jnp.asarray(randn(rng, B, L, cfg.d_model))

    def loss(params, x, rest):
        return jnp.sum(nnx.merge(graph, params, rest)(x))

    _, backward = jax.vjp(loss, params, x, rest)
    saved = jax.tree.leaves(backward)  # the residuals jax.vjp keeps for the backward pass
    scores_sized = [a for a in saved if a.shape[-2:] == (L, L) and jnp.issubdtype(a.dtype, jnp.floating)]
    assert not scores_sized, scores_sized
    assert any(a.dtype == jnp.uint8 and a.shape == (B, cfg.n_heads, L, 1) for a in saved)  # the packed mask


# ------------------------------------------------------------------------------------- decoder-family attention
DECODER_CASES = {
    "gqa": dict(n_kv_heads=2, position="rope", causal=True),
    "mqa": dict(n_kv_heads=1, position="alibi", causal=True),
    "qkv bias only": dict(n_kv_heads=2, bias=False, qkv_bias=True, position="rope", causal=True),
    "window": dict(sliding_window=3, position="rope", causal=True),
    "no biases": dict(bias=False, position="learned"),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_decoder_attention_forward_and_gradients_match(case, rng):
    """Grouped-query / multi-query attention, per-projection bias switches and sliding windows, Flax vs torch_ref:
    outputs on a padded batch and the gradients of x and of every parameter."""
    cfg = small_config(**DECODER_CASES[case])
    f, t = twins("MultiHeadAttention", cfg)
    x, w, mask = randn(rng, B, L, cfg.d_model), randn(rng, B, L, cfg.d_model), padding_mask()
    y = f(jnp.asarray(x), jnp.asarray(mask))
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt, torch.from_numpy(mask))
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=0, atol=BLOCK)
    (yt * torch.from_numpy(w)).sum().backward()
    g_mod, g_x = nnx.grad(lambda m, x: jnp.sum(m(x, jnp.asarray(mask)) * w), argnums=(0, 1))(f, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g_x), xt.grad.numpy(), rtol=0, atol=GRAD_REL * np.abs(xt.grad.numpy()).max())
    ours = fi.to_numpy_state_dict(_as_module(f, g_mod))
    for name, p in t.named_parameters():
        want = p.grad.numpy()
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=GRAD_REL * np.abs(want).max(), err_msg=name)
    assert set(ours) == {n for n, _ in t.named_parameters()}


def _as_module(module, grads_state):
    """The module with its parameters replaced by their gradients (to read them under the twin's key names)."""
    graph, _, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graph, grads_state, rest)


def test_grouped_query_equals_full_attention_with_repeated_kv_heads(rng):
    """K kv heads with query head n reading kv head n // (N / K) (repeat_interleave, not tile) is N-head
    attention whose k and v projections repeat each kv head N / K times in place."""
    cfg = small_config(n_kv_heads=2, position="rope", causal=True)  # N = 4, K = 2, H = 8
    N, K, H, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    gqa, _ = twins("MultiHeadAttention", cfg)
    full = fi.MultiHeadAttention(cfg.replace(n_kv_heads=N), rngs=nnx.Rngs(9))
    full.eval()
    kernel, bias = np.asarray(gqa.in_proj.kernel[...]), np.asarray(gqa.in_proj.bias[...])  # (D, (N + 2K) H)

    def repeat_heads(cols):  # (D|, K H) -> (D|, N H), head k placed at heads k*N/K .. (k+1)*N/K - 1
        heads = cols.reshape(cols.shape[:-1] + (K, H))
        return np.repeat(heads, N // K, axis=-2).reshape(cols.shape[:-1] + (N * H,))

    q, k, v = np.split(kernel, [N * H, (N + K) * H], axis=-1)
    full.in_proj.kernel[...] = jnp.asarray(np.concatenate([q, repeat_heads(k), repeat_heads(v)], axis=-1))
    qb, kb, vb = np.split(bias, [N * H, (N + K) * H])
    full.in_proj.bias[...] = jnp.asarray(np.concatenate([qb, repeat_heads(kb), repeat_heads(vb)]))
    full.out_proj.kernel[...], full.out_proj.bias[...] = gqa.out_proj.kernel[...], gqa.out_proj.bias[...]
    x = jnp.asarray(randn(rng, B, L, D))
    np.testing.assert_allclose(np.asarray(gqa(x)), np.asarray(full(x)), rtol=0, atol=BLOCK)


@pytest.mark.parametrize("side", ["flax", "torch"])
def test_sliding_window_sees_exactly_the_last_window_keys(side, rng):
    """With window W, query i's output depends on keys i - W < j <= i only: changing any other key's input leaves
    it unchanged, changing a key inside the window changes it."""
    cfg = small_config(sliding_window=3, causal=True, position="none")
    f, t = twins("MultiHeadAttention", cfg)
    run = (
        (lambda x: np.asarray(f(jnp.asarray(x))))
        if side == "flax"
        else (lambda x: t(torch.from_numpy(x)).detach().numpy())
    )
    x = randn(rng, 1, L, cfg.d_model)
    y = run(x)
    for j in range(L):
        x2 = x.copy()
        x2[0, j] += randn(rng, cfg.d_model)
        changed = np.abs(run(x2) - y).max(axis=-1)[0] > 0  # (L,) which query rows moved
        expected = np.array([i - 3 < j <= i for i in range(L)])
        np.testing.assert_array_equal(changed, expected, err_msg=f"key {j}")
