"""TransformerBlock, Flax vs torch_ref, vs lesson 08's block and vs torch.nn.TransformerEncoderLayer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
from flax import nnx
from helpers import POSITIONS, randn, small_config, twins

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import BLOCK, ELEMENTWISE, FLOAT32_REL, GRAD_REL

B, L = 2, 6


class LessonBlock(nn.Module):
    """Lesson 08's TransformerBlock, exactly as written there."""

    def __init__(self, d_model=512, n_head=8, d_ff=2048, drop=0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head, dropout=drop, batch_first=True)
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Linear(d_ff, d_model),
            nn.Dropout(drop),
        )

    def forward(self, x, attn_mask=None):
        h = self.ln1(x)
        h, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        x = x + h
        h = self.ln2(x)
        h = self.ff(h)
        x = x + h
        return x


def masks(kind):
    if kind == "none":
        return {}
    if kind == "padding":
        m = np.ones((B, L), np.int32)
        m[0, 3:] = 0
        return {"attention_mask": m}
    return {"causal": True}


def rel_close(a, b, rel, name=""):
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale, err_msg=name)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_forward_and_gradients_match(position, mask, norm_first, rng):
    spec = masks(mask)
    cfg = small_config(position=position, norm_first=norm_first, causal=spec.get("causal", False))
    f, t = twins("TransformerBlock", cfg)
    x = randn(rng, B, L, cfg.d_model)
    m = spec.get("attention_mask")
    cot = randn(rng, B, L, cfg.d_model)

    def loss(block, x):
        return jnp.sum(block(x, None if m is None else jnp.asarray(m)) * cot)

    y = np.asarray(f(jnp.asarray(x), None if m is None else jnp.asarray(m)))
    (g_params, g_x) = nnx.grad(loss, argnums=(0, 1))(f, jnp.asarray(x))

    xt = torch.from_numpy(x).requires_grad_(True)
    yt = t(xt, None if m is None else torch.from_numpy(m))
    (yt * torch.from_numpy(cot)).sum().backward()

    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=BLOCK)
    rel_close(np.asarray(g_x), xt.grad.numpy(), GRAD_REL, "d/dx")
    # gradients of every parameter, converted to torch keys with the same layout rules as the weights
    grads_flax = fi.to_numpy_state_dict(_as_module(f, g_params))
    for name, p in t.named_parameters():
        rel_close(grads_flax[name], p.grad.numpy(), GRAD_REL, name)


def _as_module(module, grads_state):
    """A copy of `module` holding the gradients as its parameters (to reuse the weight map for gradients)."""
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state)
    nnx.update(copy, grads_state)
    return copy


def test_lesson_block_loads_unchanged_both_ways(rng):
    torch.manual_seed(0)
    lesson = LessonBlock(d_model=32, n_head=4, d_ff=64).eval()
    cfg = small_config()  # gelu exact, pre-LN, eps 1e-5: the lesson's choices
    ours_t = tr.TransformerBlock(cfg).eval()
    ours_t.load_state_dict(lesson.state_dict())  # same keys, same packing
    ours_f = fi.TransformerBlock(cfg, rngs=nnx.Rngs(0))
    ours_f.eval()
    fi.load_torch_state_dict(ours_f, lesson.state_dict())
    x = randn(rng, B, L, 32)
    ref = lesson(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours_t(torch.from_numpy(x)).detach().numpy(), ref, rtol=0, atol=BLOCK)
    np.testing.assert_allclose(np.asarray(ours_f(jnp.asarray(x))), ref, rtol=0, atol=BLOCK)
    # and out of ours into the lesson's
    fresh = fi.TransformerBlock(cfg, rngs=nnx.Rngs(7))
    fresh.eval()
    lesson.load_state_dict(fi.to_torch_state_dict(fresh))
    np.testing.assert_allclose(
        lesson(torch.from_numpy(x)).detach().numpy(), np.asarray(fresh(jnp.asarray(x))), rtol=0, atol=BLOCK
    )


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_torch_transformer_encoder_layer_both_ways(norm_first, activation, rng):
    layer = nn.TransformerEncoderLayer(
        32, 4, 64, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    cfg = small_config(norm_first=norm_first, activation=activation)
    f = fi.TransformerBlock(cfg, rngs=nnx.Rngs(0))
    f.eval()
    fi.load_torch_state_dict(f, fi.from_torch_encoder_layer(layer.state_dict()))
    x = randn(rng, B, L, 32)
    with torch.no_grad():
        ref = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x))), ref, rtol=0, atol=BLOCK)
    # out of ours: a fresh Flax block's weights drive torch's layer
    fresh = fi.TransformerBlock(cfg, rngs=nnx.Rngs(9))
    fresh.eval()
    layer.load_state_dict(fi.to_torch_encoder_layer(fi.to_torch_state_dict(fresh)))
    with torch.no_grad():
        ref = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(x))), ref, rtol=0, atol=BLOCK)


def test_encoder_layer_key_errors():
    with pytest.raises(ValueError, match="self_attn_x"):
        fi.from_torch_encoder_layer({"self_attn_x.weight": 0})


def test_lesson_parameter_count():
    cfg = fi.TransformerConfig()  # d_model=512, n_heads=8, d_ff=2048
    assert fi.count_params(fi.TransformerBlock(cfg, rngs=nnx.Rngs(0))) == 3_152_384
    assert tr.count_params(tr.TransformerBlock(cfg)) == 3_152_384
    assert tr.count_params(LessonBlock()) == 3_152_384


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_activation_variants_against_formula(activation, rng):
    x = randn(rng, 1000)
    erf = np.vectorize(__import__("math").erf)
    expected = {
        "gelu": 0.5 * x * (1 + erf(x / np.sqrt(2))),
        "gelu_tanh": 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
        "relu": np.maximum(x, 0),
    }[activation]
    from flax_impl.block import activation_fn

    y = np.asarray(activation_fn(activation, jnp.asarray(x)))
    np.testing.assert_allclose(y, expected, rtol=FLOAT32_REL, atol=ELEMENTWISE)


def test_exact_gelu_derivative_against_formula(rng):
    """gelu_exact's custom JVP against Phi(x) + x phi(x) in float64, and against torch autograd's GELU."""
    from flax_impl._kernels.gelu import gelu_exact

    x = np.concatenate([randn(rng, 1000) * 3, np.float32([0.0, -8.0, 8.0, -30.0])])
    erf = np.vectorize(__import__("math").erf)
    x64 = x.astype(np.float64)
    expected = 0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-0.5 * x64**2) / np.sqrt(2 * np.pi)
    grad = np.asarray(jax.vmap(jax.grad(gelu_exact))(jnp.asarray(x)))
    np.testing.assert_allclose(grad, expected, rtol=0, atol=ELEMENTWISE)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(xt).sum().backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=0, atol=ELEMENTWISE)


@pytest.mark.parametrize("place", ["attn.dropout", "ff.2", "ff.4"])
def test_dropout_applied_in_each_of_three_places(place, rng):
    cfg = small_config(dropout=0.5)
    block = fi.TransformerBlock(cfg, rngs=nnx.Rngs(0))
    for name in ["attn.dropout", "ff.2", "ff.4"]:  # switch off all but one place
        if name != place:
            _module_at(block, name).rate = 0.0
    x = jnp.asarray(randn(rng, B, L, cfg.d_model))
    block.eval()
    y_eval = np.asarray(block(x))
    block.train()
    assert not np.allclose(np.asarray(block(x)), y_eval, atol=1e-3)
    # and the torch twin has its dropout in the same three places
    t = tr.TransformerBlock(cfg)
    assert (
        isinstance(t.attn.dropout, nn.Dropout) and isinstance(t.ff[2], nn.Dropout) and isinstance(t.ff[4], nn.Dropout)
    )


def _module_at(block, dotted):
    obj = block
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def test_zero_dropout_train_equals_eval(rng):
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    block = fi.TransformerBlock(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(randn(rng, B, L, cfg.d_model))
    block.train()
    y_train = np.asarray(block(x))
    block.eval()
    np.testing.assert_array_equal(y_train, np.asarray(block(x)))


def test_dropout_masks_differ_between_calls(rng):
    cfg = small_config(dropout=0.2)
    block = fi.TransformerBlock(cfg, rngs=nnx.Rngs(0))
    step = nnx.jit(lambda b, x: b(x))
    x = jnp.asarray(randn(rng, B, L, cfg.d_model))
    assert not np.array_equal(np.asarray(step(block, x)), np.asarray(step(block, x)))
    assert jax.tree.leaves(nnx.state(block, nnx.RngState))  # the block owns its dropout streams


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_block_backward_keeps_one_hidden_array(dropout, rng):
    """Training keeps one (B, L, F) float array per block (the hidden h; dropout(gelu(h)) is recomputed from it
    and the packed bits) and the attention output once (heads-major), not also as out_proj's (B, L, D) input."""
    cfg = small_config(dropout=dropout, attention_dropout=dropout)
    D, F = cfg.d_model, cfg.d_ff
    block = fi.TransformerBlock(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    block.train()
    x = jnp.asarray(randn(rng, B, L, D))

    def saved(apply):
        graph, params, rest = nnx.split(block, nnx.Param, ...)
        _, backward = jax.vjp(lambda p, x, r: jnp.sum(apply(nnx.merge(graph, p, r), x)), params, x, rest)
        return [a for a in jax.tree.leaves(backward) if jnp.issubdtype(a.dtype, jnp.floating)]

    def plain_feed_forward(blk, x):  # the same layers applied one after the other, as torch's nn.Sequential
        for layer in blk.ff:
            x = layer(x)
        return x

    kept = saved(lambda blk, x: blk(x))
    assert len([a for a in kept if a.shape == (B, L, F)]) == 1
    # x, ln1(x), x + attn, ln2(x + attn); the attention output is kept as (B, N, L, H) with q, k, v
    assert len([a for a in kept if a.shape == (B, L, D)]) == 4
    assert len([a for a in saved(plain_feed_forward) if a.shape == (B, L, F)]) == 2  # the test can see the difference
