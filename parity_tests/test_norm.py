"""LayerNorm (written-out gradient) against torch.nn.LayerNorm, torch_ref's norm: outputs, gradients, what the
backward keeps, bad input."""

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
