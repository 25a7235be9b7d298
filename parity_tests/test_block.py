"""TransformerBlock, Flax vs torch_ref, vs lesson 08's block and vs torch.nn.TransformerEncoderLayer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
from flax import nnx
from helpers import POSITIONS, perturbed_twins, randn, small_config, twins

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import BLOCK, ELEMENTWISE, EXACT, FLOAT32_REL, GRAD_REL

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
    lesson.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(fresh)))
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
    layer.load_state_dict(fi.to_torch_encoder_layer(tr.from_numpy_state_dict(fi.to_numpy_state_dict(fresh))))
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


# ------------------------------------------------------------------------------------------ decoder-family blocks
DECODER_BLOCKS = {
    "llama (rmsnorm, swiglu, gqa, no bias)": dict(
        norm="rmsnorm", mlp="gated", activation="silu", n_kv_heads=2, bias=False, position="rope", causal=True
    ),
    "qwen2 (qkv bias only)": dict(
        norm="rmsnorm", mlp="gated", activation="silu", n_kv_heads=2, bias=False, qkv_bias=True, position="rope"
    ),
    "geglu": dict(mlp="gated", activation="gelu_tanh", mlp_bias=True, out_bias=False),
    "parallel, shared norm": dict(parallel_residual=True, position="alibi", causal=True),
    "parallel, two norms": dict(parallel_residual=True, parallel_shared_norm=False, mlp="gated", activation="silu"),
    "mpt (no biases, layernorm without bias)": dict(bias=False, position="alibi", alibi_max_bias=4.0, causal=True),
    "gemma2 (sandwich norms, (1 + w) rmsnorm)": dict(
        norm="rmsnorm", norm_offset=1.0, branch_norm="sandwich", mlp="gated", activation="gelu_tanh", bias=False
    ),
    "olmo2 (norms after the branches only)": dict(norm="rmsnorm", branch_norm="post", mlp="gated", activation="silu"),
    "granite (residual multiplier)": dict(norm="rmsnorm", mlp="gated", activation="silu", residual_multiplier=0.22),
    "post-LN, multiplier, layernorm offset": dict(norm_first=False, residual_multiplier=3.0, norm_offset=1.0),
    "parallel, multiplier": dict(parallel_residual=True, parallel_shared_norm=False, residual_multiplier=0.5),
}


@pytest.mark.parametrize("case", list(DECODER_BLOCKS))
def test_decoder_blocks_forward_and_gradients_match(case, rng):
    """Every decoder-family switch, Flax vs torch_ref with every parameter perturbed (norms are not 1, biases not
    0): the output on a padded batch and the gradients of x and of every parameter."""
    cfg = small_config(**DECODER_BLOCKS[case])
    f, t = perturbed_twins("TransformerBlock", cfg, rng)
    x, cot, m = randn(rng, B, L, cfg.d_model), randn(rng, B, L, cfg.d_model), masks("padding")["attention_mask"]
    y = f(jnp.asarray(x), jnp.asarray(m))
    g_params, g_x = nnx.grad(lambda b, x: jnp.sum(b(x, jnp.asarray(m)) * cot), argnums=(0, 1))(f, jnp.asarray(x))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = t(xt, torch.from_numpy(m))
    (yt * torch.from_numpy(cot)).sum().backward()
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=0, atol=BLOCK)
    rel_close(np.asarray(g_x), xt.grad.numpy(), GRAD_REL, "d/dx")
    grads_flax = fi.to_numpy_state_dict(_as_module(f, g_params))
    assert set(grads_flax) == {n for n, _ in t.named_parameters()}
    for name, p in t.named_parameters():
        rel_close(grads_flax[name], p.grad.numpy(), GRAD_REL, name)


def test_gated_mlp_against_formula(rng):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer, 2020), in float64 numpy from the module's own weights."""
    cfg = small_config(mlp="gated", activation="silu", mlp_bias=True)
    f, _ = perturbed_twins("TransformerBlock", cfg, rng)
    x = randn(rng, B, L, cfg.d_model)
    ff = f.ff
    w = {n: np.asarray(getattr(ff, n).kernel[...], np.float64) for n in ("gate", "up", "down")}
    b = {n: np.asarray(getattr(ff, n).bias[...], np.float64) for n in ("gate", "up", "down")}
    g = x @ w["gate"] + b["gate"]
    want = (g / (1.0 + np.exp(-g)) * (x @ w["up"] + b["up"])) @ w["down"] + b["down"]
    np.testing.assert_allclose(np.asarray(f.feed_forward(jnp.asarray(x))), want, rtol=0, atol=BLOCK)


def test_parallel_residual_against_formula(rng):
    """x + attn(ln1(x)) + ff(ln1(x)) with one shared norm: the block computed from its own parts."""
    cfg = small_config(parallel_residual=True)
    f, _ = perturbed_twins("TransformerBlock", cfg, rng)
    assert f.ln2 is None
    x = jnp.asarray(randn(rng, B, L, cfg.d_model))
    h = f.ln1(x)
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(x + f.attn(h) + f.feed_forward(h)), rtol=0, atol=EXACT)


@pytest.mark.parametrize("branch_norm", ["sandwich", "post"])
def test_branch_norms_against_formula(branch_norm, rng):
    """sandwich: h = x + m post_attn_norm(attn(ln1(x))), then h + m post_ff_norm(ff(ln2(h))) (Gemma 2); "post": the
    same without ln1 and ln2, which do not exist (OLMo 2); m = residual_multiplier. From the block's own parts."""
    cfg = small_config(norm="rmsnorm", branch_norm=branch_norm, residual_multiplier=0.3, causal=True)
    f, t = perturbed_twins("TransformerBlock", cfg, rng)
    norms = {"post_attn_norm.weight", "post_ff_norm.weight"} | ({"ln1.weight", "ln2.weight"} if f.ln1 else set())
    assert {k for k in t.state_dict() if "norm" in k or k.startswith("ln")} == norms
    assert (f.ln1 is None) == (f.ln2 is None) == (branch_norm == "post")
    pre1, pre2 = (f.ln1, f.ln2) if f.ln1 is not None else (lambda x: x, lambda x: x)
    x = jnp.asarray(randn(rng, B, L, cfg.d_model))
    h = x + f.post_attn_norm(f.attn(pre1(x))) * 0.3
    want = h + f.post_ff_norm(f.feed_forward(pre2(h))) * 0.3
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(want), rtol=0, atol=EXACT)


@pytest.mark.parametrize("changes", [dict(norm_first=False), dict(parallel_residual=True)])
def test_branch_norms_need_a_pre_ln_sequential_block(changes):
    with pytest.raises(ValueError, match="branch_norm='sandwich' .* needs norm_first=True and parallel_residual=False"):
        small_config(branch_norm="sandwich", **changes)


@pytest.mark.parametrize(
    "switches, absent",
    [
        (dict(bias=False, qkv_bias=True), {"attn.out_proj.bias", "ff.0.bias", "ff.3.bias", "ln1.bias", "ln2.bias"}),
        (dict(out_bias=False, norm_bias=False), {"attn.out_proj.bias", "ln1.bias", "ln2.bias"}),
        (dict(mlp_bias=False), {"ff.0.bias", "ff.3.bias"}),
    ],
)
def test_bias_switches_name_their_group(switches, absent):
    cfg = small_config(**switches)
    f, t = twins("TransformerBlock", cfg)
    keys = set(fi.to_numpy_state_dict(f))
    assert keys == set(t.state_dict())
    assert not keys & absent and "attn.in_proj_weight" in keys
    full = set(fi.to_numpy_state_dict(fi.TransformerBlock(small_config(), rngs=nnx.Rngs(0))))
    assert full - keys == absent
