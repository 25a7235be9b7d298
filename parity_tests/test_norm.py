"""LayerNorm (written-out gradient) against torch.nn.LayerNorm and RMSNorm against its formula and torch_ref:
outputs, gradients, what the backward keeps, bad input; both with an offset (c + w) against their formula and
transformers' Gemma, OLMo 2 and Nemotron norms, in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import randn

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import GRAD_REL, LAYER_NORM


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_forward_and_gradients_match_torch(use_bias, rng):
    """LayerNorm (written-out gradient) against torch.nn.LayerNorm: outputs and the gradients of x, scale, bias,
    on inputs off-centre and not unit-scale, with non-trivial scale and bias."""
    D = 24
    x = randn(rng, 3, 5, D) * 3.0 + 1.5
    scale, bias, w = randn(rng, D), randn(rng, D), randn(rng, 3, 5, D)
    ln = fi.LayerNorm(D, epsilon=1e-5, use_bias=use_bias)
    ln.scale[...] = jnp.asarray(scale)
    if use_bias:
        ln.bias[...] = jnp.asarray(bias)
    t = tr.LayerNorm(D, eps=1e-5, bias=use_bias)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(scale))
        if use_bias:
            t.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt)
    (yt * torch.from_numpy(w)).sum().backward()

    def loss(ln, x):
        return jnp.sum(ln(x) * w)

    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), yt.detach().numpy(), rtol=0, atol=LAYER_NORM)
    g_ln, g_x = nnx.grad(loss, argnums=(0, 1))(ln, jnp.asarray(x))
    pairs = [(g_x, xt.grad), (g_ln["scale"][...], t.weight.grad)]
    if use_bias:
        pairs.append((g_ln["bias"][...], t.bias.grad))
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=GRAD_REL * np.abs(theirs).max())


def test_layer_norm_backward_keeps_x_and_row_statistics_only(rng):
    """The backward keeps x and the per-row mean and 1/std: one (..., D) array (autodiff of nnx.LayerNorm: four)."""
    D = 24
    x = jnp.asarray(randn(rng, 3, 5, D))

    def saved_feature_sized(ln):
        graph, params = nnx.split(ln, nnx.Param)
        _, backward = jax.vjp(lambda p, x: jnp.sum(nnx.merge(graph, p)(x)), params, x)
        return [a for a in jax.tree.leaves(backward) if a.shape == x.shape]

    assert len(saved_feature_sized(fi.LayerNorm(D))) == 1
    assert len(saved_feature_sized(nnx.LayerNorm(D, rngs=nnx.Rngs(0)))) > 1  # the test can see the difference


def test_layer_norm_bad_input_raises(rng):
    with pytest.raises(ValueError, match="LayerNorm over 24 features got input of shape \\(3, 5\\)"):
        fi.LayerNorm(24)(jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="epsilon=0.0"):
        fi.LayerNorm(24, epsilon=0.0)


def test_rms_norm_against_formula_and_twin_with_gradients(rng):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight (no centring, no bias), against the float64 formula and
    torch_ref.RMSNorm, with the gradients of x and weight; off-centre inputs so that a subtracted mean shows."""
    D, eps = 24, 1e-6
    x = randn(rng, 3, 5, D) * 3.0 + 1.5
    scale, w = randn(rng, D), randn(rng, 3, 5, D)
    rms = fi.RMSNorm(D, epsilon=eps)
    rms.scale[...] = jnp.asarray(scale)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * scale
    np.testing.assert_allclose(np.asarray(rms(jnp.asarray(x))), want, rtol=0, atol=LAYER_NORM)
    t = tr.RMSNorm(D, eps=eps)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(scale))
    xt = torch.from_numpy(x).requires_grad_()
    (t(xt) * torch.from_numpy(w)).sum().backward()
    g_rms, g_x = nnx.grad(lambda m, x: jnp.sum(m(x) * w), argnums=(0, 1))(rms, jnp.asarray(x))
    for ours, theirs in [(g_x, xt.grad), (g_rms["scale"][...], t.weight.grad)]:
        theirs = theirs.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=GRAD_REL * np.abs(theirs).max())


def test_rms_norm_computes_in_float32_for_bf16_inputs(rng):
    x = jnp.asarray(randn(rng, 2, 16) * 100.0).astype(jnp.bfloat16)
    y = fi.RMSNorm(16)(x)
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=2**-8, atol=0)


@pytest.mark.parametrize("norm, bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_config_picks_the_norm_on_both_sides(norm, bias):
    from flax_impl.config import FlaxConfig, TransformerConfig
    from flax_impl.norm import make_norm
    from torch_ref.norm import make_norm as make_torch_norm

    cfg = TransformerConfig(d_model=8, n_heads=2, norm=norm, norm_bias=bias, norm_eps=1e-6)
    ours, theirs = make_norm(cfg, FlaxConfig()), make_torch_norm(cfg)
    assert type(ours).__name__ == type(theirs).__name__ == {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[norm]
    assert ours.epsilon == theirs.eps == 1e-6
    assert set(fi.to_numpy_state_dict(ours)) == set(theirs.state_dict()) == ({"weight", "bias"} if bias else {"weight"})


def test_rms_norm_bad_input_raises():
    with pytest.raises(ValueError, match="RMSNorm over 24 features got input of shape \\(3, 5\\)"):
        fi.RMSNorm(24)(jnp.ones((3, 5)))
    with pytest.raises(ValueError, match="epsilon=-1.0"):
        fi.RMSNorm(24, epsilon=-1.0)


# ------------------------------------------------------------------------------------ offset norms: (c + w) scales
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("offset", [1.0, -0.5])
def test_offset_norms_against_formula_and_twin_with_gradients(norm, offset, rng):
    """x_hat * (c + w) (+ b), w stored as it is: against the float64 formula and the torch twin, with the
    gradients of x, w (and b); a fresh norm scales by 1 (w starts at 1 - c) on both sides."""
    D, eps = 24, 1e-6
    x = randn(rng, 3, 5, D) * 3.0 + 1.5
    w, b, cot = randn(rng, D), randn(rng, D), randn(rng, 3, 5, D)
    flax_cls, torch_cls = {"rmsnorm": (fi.RMSNorm, tr.RMSNorm), "layernorm": (fi.LayerNorm, tr.LayerNorm)}[norm]
    f, t = flax_cls(D, epsilon=eps, offset=offset), torch_cls(D, eps=eps, offset=offset)
    np.testing.assert_array_equal(np.asarray(f.scale[...]), 1.0 - offset)
    np.testing.assert_array_equal(t.weight.detach().numpy(), 1.0 - offset)
    x64 = x.astype(np.float64)
    if norm == "layernorm":
        x64 = x64 - x64.mean(-1, keepdims=True)
    fresh = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), fresh, rtol=0, atol=LAYER_NORM)
    f.scale[...] = jnp.asarray(w)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w))
        if norm == "layernorm":
            t.bias.copy_(torch.from_numpy(b))
            f.bias[...] = jnp.asarray(b)
    want = fresh * (offset + w.astype(np.float64)) + (b if norm == "layernorm" else 0.0)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), want, rtol=0, atol=LAYER_NORM)
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt)
    np.testing.assert_allclose(yt.detach().numpy(), want, rtol=0, atol=LAYER_NORM)
    (yt * torch.from_numpy(cot)).sum().backward()
    g_f, g_x = nnx.grad(lambda m, x: jnp.sum(m(x) * cot), argnums=(0, 1))(f, jnp.asarray(x))
    pairs = [(g_x, xt.grad), (g_f["scale"][...], t.weight.grad)]
    pairs += [(g_f["bias"][...], t.bias.grad)] if norm == "layernorm" else []
    for ours, theirs in pairs:
        theirs = theirs.numpy()
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=GRAD_REL * np.abs(theirs).max())


HF_NORMS = {  # transformers' class, its module, our norm and offset
    "GemmaRMSNorm": ("gemma", "rmsnorm", 1.0),
    "Gemma3RMSNorm": ("gemma3", "rmsnorm", 1.0),
    "Olmo2RMSNorm": ("olmo2", "rmsnorm", 0.0),
    "NemotronLayerNorm1P": ("nemotron", "layernorm", 1.0),
}


@pytest.mark.parametrize("name", sorted(HF_NORMS))
def test_offset_norms_match_transformers_in_float32_and_bfloat16(name, rng):
    """transformers' Gemma / Gemma 3 (1 + w) RMSNorm, OLMo 2's RMSNorm and Nemotron's LayerNorm1P with the same
    weights: float32 within LAYER_NORM (torch twin and Flax, gradients of x and w too), and bfloat16 (inputs and
    weights) bit for bit: the product with (c + w) is taken in float32 and rounded once (Gemma's order, which OLMo 2
    shares). Llama's order (round, then scale) differs in about a quarter of the entries, so the test sees it."""
    import importlib

    family, norm, offset = HF_NORMS[name]
    hf_cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    D, eps = 64, 1e-6
    x, w, cot = randn(rng, 64, D) * 3.0 + 1.0, randn(rng, D) * 0.5, randn(rng, 64, D)
    theirs = hf_cls(D, eps=eps)
    ours_t = tr.RMSNorm(D, eps=eps, offset=offset) if norm == "rmsnorm" else tr.LayerNorm(D, eps=eps, offset=offset)
    for m in (theirs, ours_t):
        m.load_state_dict({k: torch.from_numpy(w) if k == "weight" else v for k, v in theirs.state_dict().items()})
    ours_f = (fi.RMSNorm if norm == "rmsnorm" else fi.LayerNorm)(D, epsilon=eps, offset=offset)
    fi.load_torch_state_dict(ours_f, ours_t.state_dict())
    xt = torch.from_numpy(x).requires_grad_()
    want = theirs(xt)
    (want * torch.from_numpy(cot)).sum().backward()
    g_f, g_x = nnx.grad(lambda m, x: jnp.sum(m(x) * cot), argnums=(0, 1))(ours_f, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours_f(jnp.asarray(x))), want.detach().numpy(), rtol=0, atol=LAYER_NORM)
    np.testing.assert_allclose(ours_t(torch.from_numpy(x)).detach().numpy(), want.detach().numpy(), rtol=0,
                               atol=LAYER_NORM)  # fmt: skip
    for got, ref in [(g_x, xt.grad), (g_f["scale"][...], theirs.weight.grad)]:
        ref = ref.numpy()
        np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=GRAD_REL * np.abs(ref).max())
    with torch.no_grad():  # bfloat16 inputs and weights
        xb = torch.from_numpy(x).bfloat16()
        want = theirs.bfloat16()(xb).float().numpy()
        np.testing.assert_array_equal(ours_t.bfloat16()(xb).float().numpy(), want)
        x32 = xb.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        llama_order = (y.bfloat16() * (offset + theirs.weight.float())).bfloat16().float().numpy()
    flax_cls = fi.RMSNorm if norm == "rmsnorm" else fi.LayerNorm
    ours_b = flax_cls(D, epsilon=eps, offset=offset, param_dtype=jnp.bfloat16)
    fi.load_torch_state_dict(ours_b, ours_t.state_dict())
    got = np.asarray(ours_b(jnp.asarray(x).astype(jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    if norm == "rmsnorm":
        assert (llama_order != want).mean() > 0.1


def test_make_norm_reads_offset_and_width_on_both_sides():
    """make_norm(config, ..., num_features) builds the config's norm (offset included) over another width, as the
    attention's per-head norms need."""
    from flax_impl.config import FlaxConfig, TransformerConfig
    from flax_impl.norm import make_norm
    from torch_ref.norm import make_norm as make_torch_norm

    for norm in ("rmsnorm", "layernorm"):
        cfg = TransformerConfig(d_model=8, n_heads=2, norm=norm, norm_offset=1.0)
        ours, theirs = make_norm(cfg, FlaxConfig(), 4), make_torch_norm(cfg, 4)
        assert ours.offset == theirs.offset == 1.0 and ours.scale[...].shape == theirs.weight.shape == (4,)
    with pytest.raises(ValueError, match="offset=nan"):
        fi.RMSNorm(4, offset=float("nan"))
    with pytest.raises(ValueError, match="offset=inf"):
        tr.LayerNorm(4, offset=float("inf"))
