"""RoPE frequencies by rope_type and per layer (flax_impl/rope.py, torch_ref/rope.py): each type against
transformers' own `ROPE_INIT_FUNCTIONS`, the length rules of "dynamic" / "longrope" against transformers' rotary
module over a decoding run, Gemma 3's per-layer tables against its rotary module, and the twins against each other.

transformers computes its tables in float32 and ours are float64 rounded once: a few float32 ulps apart, compared
element-wise relative (FLOAT32_REL).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import perturbed_twins, small_config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import flax_impl.rope as fr
import torch_ref.rope as trope
from flax_impl import positions as fp
from flax_impl.masks import layer_kinds
from flax_impl.tolerances import BLOCK, ELEMENTWISE, EXACT, FLOAT32_REL
from torch_ref import positions as tp
from torch_ref.masks import layer_kinds as torch_layer_kinds

PAIRS = 16  # H = 32: enough pairs for llama3's three bands and yarn's ramp to have interior points
LONGROPE = dict(
    rope_short_factor=tuple(1.0 + 0.1 * i for i in range(PAIRS)), rope_long_factor=tuple(2.0 + i for i in range(PAIRS))
)
CASES = {
    "plain": dict(),
    "linear": dict(rope_scale=2.5),
    "linear partial": dict(rope_scale=4.0, rope_fraction=0.5),
    "llama3": dict(rope_type="llama3", rope_base=500_000.0, rope_scale=8.0, rope_original_max_len=64,
                   rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),
    "yarn": dict(rope_type="yarn", rope_scale=4.0, rope_original_max_len=256),
    "yarn untruncated, own betas and factor": dict(rope_type="yarn", rope_scale=8.0, rope_original_max_len=512,
                                                   rope_truncate=False, rope_beta_fast=16.0, rope_beta_slow=2.0,
                                                   rope_attention_factor=1.3),
    "dynamic": dict(rope_type="dynamic", rope_scale=4.0, rope_original_max_len=8),
    "longrope": dict(rope_type="longrope", rope_scale=4.0, rope_original_max_len=8, **LONGROPE),
}  # fmt: skip


ROPE_HEADS = dict(position="rope", causal=True, d_model=64, n_heads=2, head_dim=32)


def rope_config(case: str, **changes):
    return small_config(**ROPE_HEADS, **{**CASES[case], **changes})


def hf_config(cfg):
    """The transformers LlamaConfig whose rope_parameters say what `cfg` says (dynamic reads max_position_embeddings
    as its original length, the others original_max_position_embeddings)."""
    p = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_base, "factor": cfg.rope_scale}
    if cfg.rope_type == "linear" and cfg.rope_scale == 1.0:
        p = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_fraction != 1.0:
        p["partial_rotary_factor"] = cfg.rope_fraction
    if cfg.rope_type in ("llama3", "yarn", "longrope"):
        p["original_max_position_embeddings"] = cfg.rope_original_max_len
    if cfg.rope_type == "llama3":
        p.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_type == "yarn":
        p.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow, truncate=cfg.rope_truncate)
    if cfg.rope_type == "longrope":
        p.update(short_factor=list(cfg.rope_short_factor), long_factor=list(cfg.rope_long_factor))
    if cfg.rope_attention_factor is not None:
        p["attention_factor"] = cfg.rope_attention_factor
    L0 = cfg.rope_original_max_len
    max_pos = L0 if cfg.rope_type == "dynamic" else int((L0 or 64) * cfg.rope_scale)
    return transformers.LlamaConfig(
        hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, head_dim=cfg.head_dim, num_hidden_layers=1,
        max_position_embeddings=max_pos, rope_parameters=p,
    )  # fmt: skip


def assert_table(ours, theirs, err_msg=""):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=FLOAT32_REL,
                               atol=0, err_msg=err_msg)  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_tables_and_factors_match_transformers(case):
    """At short lengths (and longrope's long table past L0): our inverse frequencies (both twins) and attention
    factor are transformers' ROPE_INIT_FUNCTIONS' (its default's for "plain")."""
    cfg = rope_config(case)
    hf = hf_config(cfg)
    kind = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(kind)
    if init is None:  # "default": LlamaRotaryEmbedding's own
        init = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters
    want, want_factor = init(hf, device="cpu")
    ours = fr.inv_freq(cfg).astype(np.float32)
    assert_table(ours, want.numpy(), case)
    assert_table(trope.inv_freq(cfg).float().numpy(), want.numpy(), case)
    assert fr.attention_factor(cfg) == pytest.approx(want_factor, rel=1e-12) == trope.attention_factor(cfg)
    if cfg.rope_type == "longrope":
        want_long, _ = init(hf, device="cpu", seq_len=cfg.rope_original_max_len + 1)
        assert_table(fr.inv_freq(cfg, long=True).astype(np.float32), want_long.numpy())
        assert_table(trope.inv_freq(cfg, long=True).float().numpy(), want_long.numpy())
    plain = fr.theta(int(32 * cfg.rope_fraction), cfg.rope_base)
    assert np.abs(ours - plain).max() > 1e-3 or case in ("plain", "dynamic")  # a scaling type scales


@pytest.mark.parametrize("case", ["dynamic", "longrope", "yarn"])
def test_length_rules_follow_transformers_over_a_decoding_run(case):
    """A fresh transformers rotary module and our pure function, call after call of a left-padded batch decoding
    past L0 = 8 (a 6-token prompt, then 1 token at a time): the same frequencies and factor at every call, on both
    twins, jitted or not. transformers keeps state (a grown dynamic table stays until a call below L0); over a run
    whose length only grows, as generate's, that state is our function of the call's largest position."""
    cfg = rope_config(case)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config(cfg))
    calls = [np.array([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])] + [np.array([[4 + t], [6 + t]]) for t in range(5)]
    jitted = jax.jit(lambda p: fr.frequencies(cfg, p))
    switched = []
    for pos in calls:
        rotary(torch.zeros(1), torch.from_numpy(pos))
        want = rotary.inv_freq.numpy()
        for ours, factor in (fr.frequencies(cfg, jnp.asarray(pos)), jitted(jnp.asarray(pos)),
                             trope.frequencies(cfg, torch.from_numpy(pos))):  # fmt: skip
            assert_table(np.asarray(ours), want, f"positions {pos.tolist()}")
            assert float(factor) == pytest.approx(rotary.attention_scaling, rel=1e-7)
        switched.append(np.abs(want - fr.inv_freq(cfg)).max() > 1e-6)
    assert switched == ([False] * 3 + [True] * 3 if case != "yarn" else [False] * 6)  # past L0 from position 8


def test_gemma3_per_layer_tables_match_its_rotary_module():
    """layer_types [sliding, full] with a local base (plain RoPE on sliding layers) and linear scaling on the full
    ones: each layer's row is transformers' Gemma3RotaryEmbedding table of its layer type; both twins."""
    cfg = small_config(position="rope", causal=True, d_model=64, n_heads=2, head_dim=32, n_layers=3,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4,
                       rope_base=1e6, rope_local_base=1e4, rope_scale=8.0)  # fmt: skip
    hf = transformers.Gemma3TextConfig(
        hidden_size=64, num_attention_heads=2, head_dim=32, num_hidden_layers=3, layer_types=list(cfg.layer_types),
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    )  # fmt: skip
    rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(hf)
    kinds, t_kinds = layer_kinds(cfg), torch_layer_kinds(cfg)
    for n, layer_type in enumerate(cfg.layer_types):
        want = getattr(rotary, f"{layer_type}_inv_freq").numpy()
        assert_table(np.asarray(kinds.inv_freq[n]), want, layer_type)
        t_table, t_factor = trope.frequencies(cfg, torch.arange(5), t_kinds[n]["rope"])
        assert_table(t_table.numpy(), want, layer_type)
        assert t_factor == 1.0
    assert kinds.rope_factor is None  # the same factor (1) on every layer: no per-layer data
    np.testing.assert_array_equal(kinds.window, [4, 2**31 - 1, 4])
    assert [k["window"] for k in t_kinds] == [4, None, 4]


def test_layer_data_is_none_when_every_layer_is_alike_and_zero_rows_do_not_rotate(rng):
    """No per-layer data (nothing read per layer) unless layers differ; a layer off in rope_layers has a zero row,
    and zero frequencies leave q exactly as it is; the factor multiplies the rotated dims only."""
    plain = layer_kinds(rope_config("yarn", n_layers=3))
    assert plain.inv_freq is None and plain.rope_factor is None and plain.rope_scaled is None and plain.window is None
    cfg = rope_config("yarn", n_layers=3, rope_layers=[True, False, True])
    kinds = layer_kinds(cfg)
    np.testing.assert_array_equal(kinds.inv_freq[1], 0.0)
    assert_table(np.asarray(kinds.inv_freq[0]), fr.inv_freq(cfg).astype(np.float32))
    factor = np.float32(fr.attention_factor(cfg))
    np.testing.assert_array_equal(kinds.rope_factor, [factor, 1.0, factor])
    assert [k["rope"] for k in torch_layer_kinds(cfg)] == ["global", None, "global"]
    x = rng.uniform(-1, 1, (2, 5, 3, 16)).astype(np.float32)
    pos = np.arange(5) + 7
    np.testing.assert_array_equal(np.asarray(fp.apply_rope(x, pos, inv_freq=np.zeros(8, np.float32))), x)
    for mod, arr in ((fp, np.asarray), (tp, torch.from_numpy)):
        kw = dict(fraction=0.5, inv_freq=arr(np.asarray(fr.theta(8, 10_000.0), np.float32)))
        plain_out = np.asarray(mod.apply_rope(arr(x), arr(pos), **kw))
        scaled = np.asarray(mod.apply_rope(arr(x), arr(pos), factor=1.25, **kw))
        np.testing.assert_allclose(scaled[..., :8], 1.25 * plain_out[..., :8], rtol=FLOAT32_REL, atol=ELEMENTWISE)
        np.testing.assert_array_equal(scaled[..., 8:], x[..., 8:])


def test_attention_factor_scales_cos_and_sin_as_transformers(rng):
    """Partial rotary with a yarn factor: apply_rope (both twins) against transformers' apply_rotary_pos_emb on
    the rotated dims with its cos and sin (times the factor), the rest passed through unscaled (as PhiAttention)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = rope_config("yarn", rope_fraction=0.5)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config(cfg))
    q = rng.uniform(-1, 1, (2, 9, 2, 32)).astype(np.float32)  # (B, L, N, H)
    pos = np.stack([np.arange(9) + 3, np.arange(9)])
    cos, sin = rotary(torch.zeros(1), torch.from_numpy(pos))
    qt = torch.from_numpy(q).transpose(1, 2)  # (B, N, L, H)
    rot, _ = apply_rotary_pos_emb(qt[..., :16], qt[..., :16], cos, sin)
    want = torch.cat([rot, qt[..., 16:]], dim=-1).transpose(1, 2).numpy()
    inv, factor = rotary.inv_freq.numpy(), rotary.attention_scaling
    ours = fp.apply_rope(q, pos, fraction=0.5, inv_freq=inv, factor=factor)
    theirs = tp.apply_rope(torch.from_numpy(q), torch.from_numpy(pos), fraction=0.5, inv_freq=torch.from_numpy(inv),
                           factor=factor)  # fmt: skip
    for out in (np.asarray(ours), theirs.numpy()):
        np.testing.assert_allclose(out, want, rtol=0, atol=ELEMENTWISE)
        np.testing.assert_array_equal(out[..., 16:], q[..., 16:])
    assert factor > 1.1


@pytest.mark.parametrize("case", list(CASES))
def test_twins_per_layer_frequencies_agree(case):
    """Flax's per-layer data (with a sliding layer of local base and a layer without RoPE) and torch's per-layer
    roles give the same frequencies and factors, below and past L0."""
    cfg = rope_config(case, n_layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"],
                      sliding_window=4, rope_local_base=500.0, rope_layers=[True, True, False])  # fmt: skip
    kinds, t_kinds = layer_kinds(cfg), torch_layer_kinds(cfg)
    for pos in (np.arange(5), np.arange(12)):
        for n in range(3):
            row = jax.tree.map(lambda a, n=n: a[n], kinds)
            ours, factor = fr.frequencies(cfg, jnp.asarray(pos), row)
            if t_kinds[n]["rope"] is None:
                np.testing.assert_array_equal(np.asarray(ours), EXACT)
                assert float(factor) == 1.0
                continue
            theirs, t_factor = trope.frequencies(cfg, torch.from_numpy(pos), t_kinds[n]["rope"])
            assert_table(np.asarray(ours), theirs.numpy(), f"layer {n}, length {len(pos)}")
            assert float(factor) == pytest.approx(t_factor, rel=1e-7)


@pytest.mark.parametrize("case", ["dynamic", "longrope"])
def test_cached_decoding_rotates_each_call_by_its_own_length(case, rng):
    """L0 = 4, a 3-token prompt then one token at a time: both twins agree at every step; up to L0 the steps equal
    the full forward; past it each new key keeps the table of its own call while a full forward rotates every key
    by the longest length's (transformers' generate and forward do the same), so the two differ."""
    cfg = small_config(n_layers=1, **{**CASES[case], "rope_original_max_len": 4}, **ROPE_HEADS)
    f, t = perturbed_twins("Transformer", cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (1, 6))
    fc, tc, cached, cached_t = f.init_cache(1, 8), t.init_cache(1, 8), [], []
    for a, b in ((0, 3), (3, 4), (4, 5), (5, 6)):
        h, fc = f(jnp.asarray(ids[:, a:b]), cache=fc)
        with torch.no_grad():
            th, tc = t(torch.from_numpy(ids[:, a:b]), cache=tc)
        cached.append(np.asarray(h)), cached_t.append(th.numpy())
    cached, cached_t = np.concatenate(cached, axis=1), np.concatenate(cached_t, axis=1)
    np.testing.assert_allclose(cached_t, cached, rtol=0, atol=BLOCK)
    np.testing.assert_allclose(cached[:, :4], np.asarray(f(jnp.asarray(ids[:, :4]))), rtol=0, atol=BLOCK)
    assert np.abs(cached[:, 5] - np.asarray(f(jnp.asarray(ids)))[:, 5]).max() > 1e3 * BLOCK
