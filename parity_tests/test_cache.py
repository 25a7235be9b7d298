"""The KV cache (flax_impl.cache, torch_ref.cache) and the model's one forward with it: the cache's bookkeeping
against its definition on both twins; a prompt fed in chunks through the cache equals the whole prompt's forward
(Flax and torch, stacked and per-layer caches); bad caches are refused before any work.

The full forward (no cache) is the reference: another program, another mask path, the same weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import perturbed_twins, small_config

import flax_impl as fi
import torch_ref as tr
from flax_impl.cache import advance, write
from flax_impl.tolerances import BLOCK, EXACT

IDS = np.asarray([[0, 0, 5, 6, 7, 8, 9, 3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]], np.int32)  # (B, L) = (2, 9)
MASK = np.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], np.int32)  # row 0 left-padded


def test_init_cache_is_empty_on_both_twins():
    cfg = small_config(causal=True, n_kv_heads=2, position_offset=2)
    for stacked in (False, True):
        c = fi.init_cache(cfg, 3, 10, stacked=stacked)
        shapes = [np.shape(a) for a in (c.k if not stacked else [c.k])]
        assert shapes == ([(3, 2, 10, 8)] * 2 if not stacked else [(2, 3, 2, 10, 8)])
        assert not np.asarray(c.key_mask).any() and int(c.index) == 0 and c.max_len == 10
        np.testing.assert_array_equal(c.next_position, [2, 2, 2])
    t = tr.init_cache(cfg, 3, 10)
    assert [tuple(a.shape) for a in t.k] == [(3, 2, 10, 8)] * 2 and t.index == 0 and not t.key_mask.any()
    np.testing.assert_array_equal(t.next_position.numpy(), [2, 2, 2])


def test_advance_and_write_follow_their_definition_on_both_twins():
    """Positions = next_position + cumsum(real) - 1 (padding at the row's previous position, at least 0); the
    new slots are marked; padding is written as zeros; twice in a row continues where the first call stopped."""
    cfg = small_config(causal=True)
    real = MASK[:, :6].astype(bool)
    f, t = fi.init_cache(cfg, 2, 12), tr.init_cache(cfg, 2, 12)
    f, fpos = advance(f, jnp.asarray(real))
    tpos = tr.cache.advance(t, torch.from_numpy(real))
    want = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    np.testing.assert_array_equal(fpos, want)
    np.testing.assert_array_equal(tpos.numpy(), want)
    f, fpos = advance(f, jnp.ones((2, 2), bool))
    tpos = tr.cache.advance(t, torch.ones(2, 2, dtype=torch.bool))
    np.testing.assert_array_equal(fpos, [[4, 5], [6, 7]])
    np.testing.assert_array_equal(tpos.numpy(), [[4, 5], [6, 7]])
    for c in (f, t):
        key_mask = np.asarray(c.key_mask)
        np.testing.assert_array_equal(key_mask[:, :8], np.concatenate([real, np.ones((2, 2), bool)], axis=1))
        assert not key_mask[:, 8:].any() and int(c.index) == 8
    k = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)  # (B, L, K, H)
    k[0, 0] = np.nan  # a padded token's key
    pad = np.asarray([[False, True, True], [True, True, True]])
    kc, _ = write(jnp.zeros((2, 4, 6, 8)), jnp.zeros((2, 4, 6, 8)), jnp.asarray(k), jnp.asarray(k), jnp.asarray(pad), 2)
    kc = np.asarray(kc)
    np.testing.assert_array_equal(kc[0, :, 2], 0)  # padding written as zeros, not NaN
    np.testing.assert_array_equal(kc[:, :, 3:5], k.transpose(0, 2, 1, 3)[:, :, 1:])
    assert not kc[:, :, :2].any() and not kc[:, :, 5:].any()


CHUNKS = {"prompt then 1 + 3": (5, 6), "token by token": tuple(range(1, 9))}


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("chunks", sorted(CHUNKS))
def test_a_prompt_in_chunks_equals_the_whole_forward(scan, chunks, rng):
    """Feeding the left-padded prompt through the cache in pieces gives the whole forward's hidden states at every
    real token, on both twins (RoPE + grouped kv heads + a window shorter than the prompt + ALiBi-free; the
    positions of the left-padded row come from its mask, so the reference is each row alone, unpadded)."""
    cfg = small_config(causal=True, position="rope", n_kv_heads=2, sliding_window=4)
    f, t = perturbed_twins("Transformer", cfg, rng, flax_config=fi.FlaxConfig(scan_layers=scan))
    cuts = (0, *CHUNKS[chunks], IDS.shape[1])
    fc, tc, f_out, t_out = f.init_cache(2, 12), t.init_cache(2, 12), [], []
    for a, b in zip(cuts, cuts[1:], strict=False):
        h, fc = f(jnp.asarray(IDS[:, a:b]), jnp.asarray(MASK[:, a:b]), cache=fc)
        f_out.append(np.asarray(h))
        with torch.no_grad():
            th, tc = t(torch.from_numpy(IDS[:, a:b]).long(), torch.from_numpy(MASK[:, a:b]), cache=tc)
        t_out.append(th.numpy())
    f_out, t_out = np.concatenate(f_out, axis=1), np.concatenate(t_out, axis=1)
    for row in range(2):
        real = MASK[row].astype(bool)
        alone = np.asarray(f(jnp.asarray(IDS[row : row + 1, real])))[0]  # (P, D): no padding, no cache
        np.testing.assert_allclose(f_out[row, real], alone, rtol=0, atol=BLOCK)
        np.testing.assert_allclose(t_out[row, real], f_out[row, real], rtol=0, atol=BLOCK)
    assert int(fc.index) == tc.index == 9
    np.testing.assert_array_equal(fc.next_position, [7, 9])
    k_f = np.asarray(fc.k[0])  # layer 0: its own array, or row 0 of the stack
    np.testing.assert_allclose(k_f, tc.k[0].numpy(), rtol=0, atol=BLOCK)  # layer 0's keys, after RoPE
    np.testing.assert_array_equal(k_f[0, :, :2], EXACT)  # row 0's padding


@pytest.fixture(scope="module")
def decoder():
    cfg = small_config(causal=True)
    return fi.Transformer(cfg, rngs=__import__("flax").nnx.Rngs(0))


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda m: {"cache": (1, 2)}, TypeError, "must be a flax_impl.KVCache"),
        (lambda m: {"cache": fi.init_cache(m.config, 2, 8, stacked=False)}, ValueError, "laid out for layers"),
        (lambda m: {"cache": m.init_cache(3, 8)}, ValueError, "holds 3 rows"),
        (lambda m: {"cache": m.init_cache(2, 8), "positions": jnp.arange(4)}, ValueError, "come from the cache"),
        (lambda m: {"cache": m.init_cache(2, 8), "mask": jnp.ones((2, 1, 4, 4), bool)}, ValueError, r"\(B, L\)"),
    ],
)
def test_bad_caches_are_refused(decoder, make, error, words):
    kw = make(decoder)
    mask = kw.pop("mask", None)
    with pytest.raises(error, match=words):
        decoder(jnp.ones((2, 4), jnp.int32), mask, **kw)


def test_an_encoder_has_no_cache():
    with pytest.raises(ValueError, match="needs a causal model"):
        fi.init_cache(small_config(), 2, 8)
    with pytest.raises(ValueError, match="needs a causal model"):
        tr.init_cache(small_config(), 2, 8)
