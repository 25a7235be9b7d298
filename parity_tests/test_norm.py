"""LayerNorm (written-out gradient) against torch.nn.LayerNorm and RMSNorm against its formula and torch_ref:
outputs, gradients, what the backward keeps, bad input."""

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
