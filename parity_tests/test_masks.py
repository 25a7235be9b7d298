"""Masks and layer kinds (flax_impl/masks.py, torch_ref/masks.py): the mask rules on both twins against their
formula; per-layer kinds (layer_types, rope_layers, a local RoPE base) against the config; whole models mixing
kinds (with the attention features of issue 24 on) Flax vs torch_ref, scanned and unrolled, forward and every
gradient, and cached decoding against the full forward with a window shorter than the prompt.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import ALIBI_SLOPES, alibi_bias_formula, perturbed_twins, randn, small_config

import flax_impl as fi
from flax_impl.masks import NO_WINDOW, layer_kinds, mask_rules
from flax_impl.tolerances import BLOCK, EXACT, GRAD_REL
from torch_ref.masks import layer_kinds as torch_layer_kinds, mask_rules as torch_mask_rules


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 3)])
def test_mask_rules_twins_formula_and_cached_rows(alibi, causal, window):
    """The one place the mask rules live, on both twins: the same allowed keys and ALiBi bias; the bias is Press et
    al.'s formula; a cached call's queries at slots 5..8 get exactly rows 5..8 of the full call's rules."""
    slopes = np.asarray(ALIBI_SLOPES[3], np.float32) if alibi else None
    keys = np.ones((2, 9), np.int32)
    keys[1, :2] = 0  # a left-padded row
    rules = dict(causal=causal, window=window)
    allowed, bias = mask_rules(jnp.asarray(keys), jnp.arange(9), 9, slopes=slopes, **rules)
    t_allowed, t_bias = torch_mask_rules(
        torch.from_numpy(keys), torch.arange(9), 9, slopes=None if slopes is None else torch.from_numpy(slopes), **rules
    )
    full = np.broadcast_to(np.asarray(allowed), (2, 1, 9, 9))
    np.testing.assert_array_equal(full, np.broadcast_to(t_allowed.numpy(), (2, 1, 9, 9)))
    i, j = np.arange(9)[:, None], np.arange(9)[None, :]
    want = keys.astype(bool)[:, None, None, :] & ((j <= i) if causal else True) & ((i - j < window) if window else True)
    np.testing.assert_array_equal(full, np.broadcast_to(want, (2, 1, 9, 9)))
    assert (bias is None) == (t_bias is None) == (not alibi)
    if alibi:
        np.testing.assert_array_equal(np.asarray(bias)[0], alibi_bias_formula(9, 9, slopes, causal))
        np.testing.assert_array_equal(np.asarray(bias), t_bias.numpy())
    cached_allowed, cached_bias = mask_rules(jnp.asarray(keys), 5 + jnp.arange(4), 9, slopes=slopes, **rules)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(cached_allowed), (2, 1, 4, 9)), full[:, :, 5:])
    if alibi:
        np.testing.assert_array_equal(np.asarray(cached_bias), np.asarray(bias)[:, :, 5:])


def test_layer_types_put_the_window_on_sliding_layers_only():
    """layer_types: the window on "sliding_attention" layers, none on "full_attention" ones (both twins); without
    layer_types every layer has the window (Mistral); with no window anywhere, no per-layer data at all."""
    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    cfg = small_config(causal=True, n_layers=4, layer_types=types, sliding_window=5)
    np.testing.assert_array_equal(layer_kinds(cfg).window, [5, NO_WINDOW, NO_WINDOW, 5])
    assert [k["window"] for k in torch_layer_kinds(cfg)] == [5, None, None, 5]
    everywhere = small_config(causal=True, n_layers=2, sliding_window=5)
    np.testing.assert_array_equal(layer_kinds(everywhere).window, [5, 5])
    assert [k["window"] for k in torch_layer_kinds(everywhere)] == [5, 5]
    assert layer_kinds(small_config(causal=True, layer_types=["full_attention"] * 2)).window is None
    with pytest.raises(ValueError, match="set sliding_window"):
        small_config(causal=True, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="layer_types=.* of length 2"):
        small_config(causal=True, layer_types=["full_attention"] * 3)


# Whole models mixing layer kinds, each with attention features on (head_dim != D / N, QK-norm, a score scale,
# soft-capping, a RoPE scaling type), every parameter perturbed.
MODEL_CASES = {
    "gemma3-like": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3, rope_local_base=100.0,
                        rope_scale=4.0, head_dim=12, n_kv_heads=2, qk_norm="rmsnorm", norm_offset=1.0,
                        query_pre_attn_scalar=10.0, attn_logit_softcap=2.0),
    "nope llama3, per-head norm": dict(rope_layers=[False, True], rope_type="llama3", rope_scale=8.0,
                                       rope_original_max_len=4, qk_norm="layernorm_per_head", n_kv_heads=2,
                                       attention_multiplier=0.3),
    "yarn, full-width norm, mqa": dict(layer_types=["full_attention", "sliding_attention"], sliding_window=3,
                                       rope_type="yarn", rope_scale=4.0, rope_original_max_len=16, head_dim=16,
                                       qk_norm="rmsnorm_full_width", n_kv_heads=1),
}  # fmt: skip
IDS = np.asarray([[0, 0, 5, 6, 7, 8, 9, 3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]], np.int32)  # (B, L) = (2, 9)
MASK = np.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], np.int32)  # row 0 left-padded


def model_config(case: str):
    return small_config(causal=True, position="rope", norm="rmsnorm", **MODEL_CASES[case])


def _grads_as_module(module, grads_state):
    graph, _, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graph, grads_state, rest)


MODEL_RUNS = [(case, True) for case in MODEL_CASES] + [("gemma3-like", False)]  # the unrolled walk: one case
RUN_IDS = [f"{case}-{'scanned' if scan else 'unrolled'}" for case, scan in MODEL_RUNS]


@pytest.mark.parametrize("case, scan", MODEL_RUNS, ids=RUN_IDS)
def test_mixed_kind_models_match_forward_and_gradients(case, scan, rng):
    """Flax (scanned or unrolled) vs torch_ref on a padded batch: the hidden states at the real tokens and the
    gradient of every parameter (QK-norm weights included) of a loss on them."""
    cfg = model_config(case)
    f, t = perturbed_twins("Transformer", cfg, rng, flax_config=fi.FlaxConfig(scan_layers=scan))
    w = randn(rng, *IDS.shape, cfg.d_model) * MASK[..., None]

    @nnx.jit
    def forward_and_grads(model):
        def loss(m):
            y = m(jnp.asarray(IDS), jnp.asarray(MASK))
            return jnp.sum(y * w), y

        return nnx.grad(loss, has_aux=True)(model)

    g, y = forward_and_grads(f)
    yt = t(torch.from_numpy(IDS).long(), torch.from_numpy(MASK))
    (yt * torch.from_numpy(w)).sum().backward()
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(y)[real], yt.detach().numpy()[real], rtol=0, atol=BLOCK)
    grads = fi.to_numpy_state_dict(_grads_as_module(f, g))
    assert set(grads) == {n for n, _ in t.named_parameters()}
    assert {"blocks.1.attn.q_norm.weight", "blocks.1.attn.k_norm.weight"} <= set(grads)
    for name, p in t.named_parameters():
        want = p.grad.numpy()
        np.testing.assert_allclose(grads[name], want, rtol=0, atol=GRAD_REL * np.abs(want).max(), err_msg=name)


CACHE_CASES = [(case, True) for case in MODEL_CASES] + [("gemma3-like", False)]  # the walk's slicing: one case
CACHE_IDS = [f"{case}-{'stacked' if scan else 'per-layer'}" for case, scan in CACHE_CASES]


@pytest.mark.parametrize("case, scan", CACHE_CASES, ids=CACHE_IDS)
def test_mixed_kind_cached_decoding_equals_the_whole_forward(case, scan, rng):
    """A sliding and a full layer (window 3 shorter than the 7-token prompt), or a layer without RoPE: the
    left-padded prompt fed through the cache (5 tokens, then 1, then 3) gives each row's unpadded full forward at
    every real token, on both twins; a stacked cache for every case, a per-layer one for the first."""
    cfg = model_config(case)
    f, t = perturbed_twins("Transformer", cfg, rng, flax_config=fi.FlaxConfig(scan_layers=scan))
    fc, tc, f_out, t_out = f.init_cache(2, 12), t.init_cache(2, 12), [], []
    step = nnx.jit(lambda model, ids, mask, cache: model(ids, mask, cache=cache))
    for a, b in ((0, 5), (5, 6), (6, 9)):
        h, fc = step(f, jnp.asarray(IDS[:, a:b]), jnp.asarray(MASK[:, a:b]), fc)
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
    np.testing.assert_array_equal(np.asarray(fc.k[0])[0, :, :2], EXACT)  # row 0's padding
