"""Cached generation (flax_impl.generation, torch_ref.generation): the cached logits of every step equal the full
causal forward's logits for that prefix; the twins generate the same tokens (greedy tokens against transformers'
`generate`: test_generation_hf.py); the sampling filters match their definitions; seeds, stop tokens, streaming
and bad input.

Reference for the full forward: the same model on each row alone, unpadded, without a cache (another program,
another attention kernel).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from helpers import small_config

import flax_impl as fi
import torch_ref as tr
import torch_ref.generation as tg
from flax_impl.generation import bucket, choose, filter_logits, generate, prompt_bucket
from flax_impl.tolerances import DECODE_REL, SAMPLING_SIGMAS

PROMPTS = [[5, 6, 7, 8, 9, 3, 4, 11, 12], [10, 11], [20, 21, 22, 23, 24]]  # lengths 9, 2, 5: left-padded
NEW = 12
# Each config also exercises one thing the cache must get right: where RoPE, learned and sinusoidal positions
# continue; ALiBi's absolute distance; the keys a sliding window drops; grouped kv heads; the layer loop unrolled.
CONFIGS = {
    "rope-gqa": dict(position="rope", n_kv_heads=2),
    "learned-postln-unscanned": dict(position="learned", norm_first=False),
    "sinusoidal-parallel": dict(position="sinusoidal", parallel_residual=True),
    "alibi-window": dict(position="alibi", sliding_window=3, n_heads=2),
    "rope-gated-unscanned": dict(position="rope", mlp="gated", norm="rmsnorm", n_kv_heads=1, activation="silu"),
}


def _perturbed(cfg: fi.TransformerConfig, scan: bool, seed: int) -> fi.Transformer:
    """A model with every parameter (norm scales and biases included) moved off its init."""
    model = fi.Transformer(cfg, flax_config=fi.FlaxConfig(scan_layers=scan), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var[...])
        var[...] = (value + 0.3 * rng.standard_normal(value.shape)).astype(value.dtype)
    model.eval()
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    name = request.param
    cfg = small_config(causal=True, **CONFIGS[name])
    model = _perturbed(cfg, scan="unscanned" not in name, seed=len(name))
    out = generate(model, PROMPTS, max_new_tokens=NEW, return_logits=True)
    return name, cfg, model, out


def test_cached_logits_equal_the_full_forward(case):
    """Step t's logits = the full forward's logits at the last position of prompt + tokens[:t], row by row."""
    _, _, model, out = case
    assert out.tokens.shape == (len(PROMPTS), NEW) and out.logits.shape == (len(PROMPTS), NEW, 97)
    for b, prompt in enumerate(PROMPTS):
        seq = np.asarray([prompt + out.tokens[b].tolist()], np.int32)  # (1, P + T): no padding, no cache
        full = np.asarray(model.logits(model(seq)))[0, len(prompt) - 1 : len(prompt) - 1 + NEW]  # (T, V)
        scale = np.abs(full).max()
        assert scale > 1.0
        np.testing.assert_allclose(out.logits[b], full, rtol=0, atol=DECODE_REL * scale, err_msg=f"row {b}")
        np.testing.assert_array_equal(out.tokens[b], full.argmax(-1))


def test_twins_generate_the_same(case):
    """torch_ref's eager loop (no bucketing, its own cache) gives the same tokens and logits."""
    _, cfg, model, out = case
    twin = tr.Transformer(cfg)
    twin.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(model)))
    theirs = tg.generate(twin, PROMPTS, max_new_tokens=NEW, return_logits=True)
    np.testing.assert_array_equal(out.tokens, theirs.tokens.numpy())
    scale = np.abs(out.logits).max()
    np.testing.assert_allclose(out.logits, theirs.logits.numpy(), rtol=0, atol=DECODE_REL * scale)


def test_padding_and_buckets_change_nothing(case):
    """A (B, P) array with extra left padding and its mask, or one row alone, gives the same tokens."""
    _, _, model, out = case
    P = 40  # another prompt bucket (40 instead of 16)
    ids = np.full((len(PROMPTS), P), 7, np.int32)  # padding holds a real id: the mask must hide it
    mask = np.zeros((len(PROMPTS), P), np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = p, 1
    assert prompt_bucket(P) != prompt_bucket(max(map(len, PROMPTS)))
    padded = generate(model, ids, mask=mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(padded.tokens, out.tokens)
    alone = generate(model, [PROMPTS[1]], max_new_tokens=NEW)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[1])


def test_buckets_follow_their_formulas():
    """New-token slots: the next power of two >= 16. Prompts: the smallest m * 2**k >= n with m in 4..7 (>= 16),
    so padding adds less than a quarter of the prompt; checked against a brute-force search of that set."""
    lengths = range(1, 3000)
    assert [bucket(n) for n in lengths] == [max(16, min(2**k for k in range(13) if 2**k >= n)) for n in lengths]
    allowed = sorted({m << k for m in range(4, 8) for k in range(12)})
    for n in lengths:
        padded = prompt_bucket(n)
        assert padded == max(16, min(a for a in allowed if a >= n)), n
        assert padded == 16 or 4 * (padded - n) < n, n


def test_stop_tokens_end_rows_and_streaming_sees_every_step(case):
    _, _, model, out = case
    stop = int(out.tokens[0, 3])  # row 0 produces it at step 3 (or earlier)
    seen = []
    got = generate(model, PROMPTS, max_new_tokens=NEW, stop_tokens=[stop], pad_id=1, on_token=seen.append)
    for b in range(len(PROMPTS)):
        hits = np.flatnonzero(out.tokens[b] == stop)
        n = hits[0] + 1 if hits.size else NEW
        assert got.lengths[b] == n
        np.testing.assert_array_equal(got.tokens[b, :n], out.tokens[b, :n])
        assert (got.tokens[b, n:] == 1).all()
    assert got.tokens.shape[1] == (NEW if (got.lengths == NEW).any() else got.lengths.max())
    np.testing.assert_array_equal(np.stack(seen, axis=1), got.tokens)


# ---------------------------------------------------------------------------------------------------- sampling
def _filter_definition(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The kept set written from the definitions, in float64: top-k by rank (ties with the k-th kept), then the
    smallest prefix of the remaining tokens by decreasing probability whose sum reaches top_p."""
    keep = np.ones_like(logits, bool)
    for b, row in enumerate(logits):
        if top_k:
            keep[b] &= row >= np.sort(row)[::-1][min(top_k, row.size) - 1]
        if top_p < 1:
            kept = np.where(keep[b], row, -np.inf)
            p = np.exp(kept - kept.max())
            p /= p.sum()
            order = np.argsort(-p, kind="stable")
            before = np.cumsum(p[order]) - p[order]
            keep[b, order[before >= top_p]] = False
    return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (100, 0.3)])
def test_filters_match_their_definitions(top_k, top_p):
    logits = np.random.default_rng(top_k + int(10 * top_p)).standard_normal((6, 40)).astype(np.float32) * 3
    expected = _filter_definition(logits.astype(np.float64), top_k, top_p)
    ours = np.isfinite(np.asarray(filter_logits(logits, top_k, top_p)))
    twin = torch.isfinite(tg.filter_logits(torch.from_numpy(logits), top_k, top_p)).numpy()
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(twin, expected)
    assert ours.any(axis=1).all()  # never an empty row


def test_samples_follow_the_filtered_softmax():
    """n draws of `choose` at temperature T, top-k, top-p: each token's frequency within SAMPLING_SIGMAS binomial
    standard deviations of softmax(filtered logits / T)."""
    import jax

    logits = np.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]], np.float32)
    T, k, p, n = 0.7, 4, 0.9, 20_000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(lambda key: choose(logits, key, True, T, k, p))(keys))[:, 0]
    expected = _filter_definition(logits / T, k, p)[0]
    probs = np.where(expected, np.exp(logits[0] / T), 0.0)
    probs /= probs.sum()
    freq = np.bincount(draws, minlength=logits.shape[1]) / n
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert (freq[~expected] == 0).all()
    assert (np.abs(freq - probs) <= SAMPLING_SIGMAS * sigma + 1e-12).all(), (freq, probs)


@pytest.fixture(scope="module")
def rope_model():
    return _perturbed(small_config(causal=True, position="rope"), scan=True, seed=0)


def test_seed_decides_the_samples(rope_model):
    model = rope_model
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    a, b, c = (generate(model, PROMPTS, seed=s, **kw).tokens for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(prompts=[[1, 2], []]), ValueError, "prompt 1 is empty"),
        (dict(prompts=[]), TypeError, "non-empty list"),
        (dict(prompts=[[1] * 61]), ValueError, "61 tokens plus max_new_tokens=4 exceeds the model's max_len=64"),
        (dict(prompts=[[1] * 65], max_new_tokens=1), ValueError, "65 tokens plus"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens=0 must be an integer >= 1"),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens=True must be an integer"),
        (dict(do_sample=True, temperature=0.0), ValueError, "temperature=0.0 must be a finite number > 0"),
        (dict(do_sample=True, temperature=-1.0), ValueError, "temperature=-1.0"),
        (dict(do_sample=True, temperature=float("nan")), ValueError, "temperature=nan"),
        (dict(do_sample="yes"), TypeError, "do_sample='yes' must be a bool"),
        (dict(do_sample=True, top_p=0.0), ValueError, "top_p=0.0"),
        (dict(do_sample=True, top_k=-1), ValueError, "top_k=-1 must be an integer >= 0"),
        (dict(seed=-1), ValueError, "seed=-1 must be an integer >= 0"),
        (dict(prompts=[[1, 97]]), IndexError, "prompt id 97 is outside the vocabulary"),
        (dict(stop_tokens=[-1]), ValueError, r"stop_tokens\[0\]=-1 must be an integer >= 0"),
        (dict(stop_tokens=[97]), IndexError, "stop token 97 is outside"),
        (dict(top_k=1.5), TypeError, "top_k=1.5 must be an integer"),
        (dict(prompts=[[1, 2.0]]), TypeError, "prompt ids must be ints"),
        (dict(prompts="abc"), TypeError, "non-empty list"),
        (dict(pad_id=200), IndexError, "pad_id 200"),
        (dict(prompts=np.ones((2, 3), np.int32), mask=np.array([[1, 0, 1], [1, 1, 1]])), ValueError, "left padding"),
        (dict(prompts=np.ones((2, 3), np.int32), mask=np.array([[0, 0, 0], [1, 1, 1]])), ValueError, "left padding"),
    ],
)
def test_bad_input_is_refused_before_work(rope_model, kwargs, error, match):
    model = rope_model
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        generate(model, args.pop("prompts"), **args)


def test_an_encoder_cannot_generate():
    model = fi.Transformer(small_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal"):
        generate(model, [[1, 2]], max_new_tokens=2)


def test_nan_at_padding_reaches_no_real_token():
    """Padded slots hold id 0; with a NaN embedding row for id 0 (untied head, so no logit reads that row), the
    left-padded rows give the same tokens and logits as with a finite row: nothing at a padded slot leaks."""
    cfg = small_config(causal=True, position="learned", lm_head="untied")
    clean = _perturbed(cfg, scan=True, seed=5)
    poisoned = nnx.clone(clean)
    poisoned.input.embed.weight[...] = poisoned.input.embed.weight[...].at[0].set(np.nan)
    a = generate(clean, PROMPTS, max_new_tokens=NEW, return_logits=True)
    b = generate(poisoned, PROMPTS, max_new_tokens=NEW, return_logits=True)
    assert (a.tokens != 0).all()  # the premise: no real or generated token reads the NaN row
    np.testing.assert_array_equal(b.tokens, a.tokens)
    np.testing.assert_array_equal(b.logits, a.logits)
