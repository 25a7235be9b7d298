"""The attention features of the next families (issue 24): head_dim decoupled from D / N, the five QK-norms, the
score scale overrides and attention logit soft-capping. Flax vs torch_ref with every parameter perturbed (outputs
and every gradient), each QK-norm against its formula, and the attention against transformers' own attention
module of the family that uses the feature (Qwen3, Gemma 2, Gemma 3, Phi, StableLM, OLMo 2, Granite), weights
copied in, its eager attention, its own rotary cos/sin.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import perturbed_twins, randn, small_config
from hf_helpers import assert_rows_close, row_budgets_no_looser

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import BLOCK, ELEMENTWISE, GRAD_REL

B, L = 2, 7
ROPE = dict(position="rope", causal=True)
CASES = {
    "head_dim 12 > D / N, gqa": dict(head_dim=12, n_kv_heads=2, **ROPE),
    "head_dim 4 < D / N, encoder": dict(head_dim=4, position="rope"),
    "qk rmsnorm": dict(qk_norm="rmsnorm", head_dim=12, n_kv_heads=2, **ROPE),
    "qk rmsnorm (1 + w), pre-attn scalar": dict(qk_norm="rmsnorm", norm_offset=1.0, query_pre_attn_scalar=10.0,
                                                **ROPE),
    "qk layernorm, partial rotary": dict(qk_norm="layernorm", rope_fraction=0.5, **ROPE),
    "qk layernorm without bias": dict(qk_norm="layernorm", norm_bias=False, n_kv_heads=1, **ROPE),
    "qk layernorm per head": dict(qk_norm="layernorm_per_head", n_kv_heads=2, head_dim=6, **ROPE),
    "qk rmsnorm full width, mqa": dict(qk_norm="rmsnorm_full_width", n_kv_heads=1, head_dim=10, **ROPE),
    "attention multiplier": dict(attention_multiplier=0.05, n_kv_heads=2, **ROPE),
    "soft-cap, window, alibi": dict(attn_logit_softcap=1.5, sliding_window=3, position="alibi", causal=True),
    "soft-cap, encoder": dict(attn_logit_softcap=0.5, query_pre_attn_scalar=2.0, position="none"),
}


def padding_mask():
    m = np.ones((B, L), np.int32)
    m[1, 4:] = 0
    return m


def _as_module(module, grads_state):
    graph, _, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graph, grads_state, rest)


@pytest.mark.parametrize("case", list(CASES))
def test_twins_forward_and_gradients_match(case, rng):
    """Every feature on its own, every parameter perturbed (norm weights off 1 and 0): the output on a padded batch
    and the gradients of x and of every parameter, Flax vs torch_ref."""
    cfg = small_config(**CASES[case])
    f, t = perturbed_twins("MultiHeadAttention", cfg, rng)
    x, w, mask = randn(rng, B, L, cfg.d_model), randn(rng, B, L, cfg.d_model), padding_mask()
    w[1, 4:] = 0.0  # padded query rows carry no loss
    y = f(jnp.asarray(x), jnp.asarray(mask))
    xt = torch.from_numpy(x).requires_grad_()
    yt = t(xt, torch.from_numpy(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(y)[real], yt.detach().numpy()[real], rtol=0, atol=BLOCK)
    (yt * torch.from_numpy(w)).sum().backward()
    g_mod, g_x = nnx.grad(lambda m, x: jnp.sum(m(x, jnp.asarray(mask)) * w), argnums=(0, 1))(f, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g_x), xt.grad.numpy(), rtol=0, atol=GRAD_REL * np.abs(xt.grad.numpy()).max())
    ours = fi.to_numpy_state_dict(_as_module(f, g_mod))
    assert set(ours) == {n for n, _ in t.named_parameters()}
    for name, p in t.named_parameters():
        want = p.grad.numpy()
        assert np.abs(want).max() > 0, name  # every parameter takes part
        np.testing.assert_allclose(ours[name], want, rtol=0, atol=GRAD_REL * np.abs(want).max(), err_msg=name)
    assert t.out_proj.weight.shape == (cfg.d_model, cfg.n_heads * cfg.head_dim)


def qk_norm_formula(name: str, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float, c: float):
    """The QK-norms in float64 on x (..., heads, H) (full width: on (..., heads H)): weight w, bias b, offset c."""
    x = x.astype(np.float64)
    if name.startswith("rmsnorm"):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (c + w)
    centred = x - x.mean(axis=-1, keepdims=True)
    y = centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + eps) * (c + w)
    return y if b is None else y + b


@pytest.mark.parametrize("name, offset", [("rmsnorm", 0.0), ("rmsnorm", 1.0), ("layernorm", 0.5),
                                          ("layernorm_per_head", 1.0), ("rmsnorm_full_width", 0.0)])  # fmt: skip
def test_qk_norms_follow_their_formula(name, offset, rng):
    """q_norm and k_norm of both twins against the formula: over H per head (with each head's own weight for
    "layernorm_per_head"), over the whole width N H (K H) for "rmsnorm_full_width"; times (norm_offset + w) as
    every norm (Gemma 3's (1 + w) at offset 1); weights perturbed."""
    cfg = small_config(qk_norm=name, n_kv_heads=2, norm_eps=1e-3, norm_offset=offset, **ROPE)
    f, t = perturbed_twins("MultiHeadAttention", cfg, rng)
    assert np.all(np.asarray(fi.MultiHeadAttention(cfg, rngs=nnx.Rngs(0)).q_norm.scale[...]) == 1.0 - offset)
    sd = fi.to_numpy_state_dict(f)
    for part, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
        shape = (B, L, heads * cfg.head_dim) if name == "rmsnorm_full_width" else (B, L, heads, cfg.head_dim)
        x = 3.0 * randn(rng, *shape)
        want = qk_norm_formula(name, x, sd[f"{part}_norm.weight"], sd.get(f"{part}_norm.bias"), cfg.norm_eps, offset)
        with torch.no_grad():
            got_t = getattr(t, f"{part}_norm")(torch.from_numpy(x)).numpy()
        for got in (np.asarray(getattr(f, f"{part}_norm")(jnp.asarray(x))), got_t):
            np.testing.assert_allclose(got, want, rtol=0, atol=ELEMENTWISE * np.abs(want).max(), err_msg=part)
    assert ("q_norm.bias" in sd) == (name == "layernorm")
    assert sd["k_norm.weight"].shape == {"layernorm_per_head": (2, 8), "rmsnorm_full_width": (16,)}.get(name, (8,))


# ------------------------------------------------------------------------------- transformers' attention modules
def _family(name: str):
    """(our config, transformers config, attention class, rotary class, rotary layer_type) for one family."""
    M = transformers.models
    common = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=64)
    gemma = dict(num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=10)
    ours = dict(d_model=32, n_heads=4, bias=False, **ROPE)
    if name == "qwen3":
        hf = transformers.Qwen3Config(num_key_value_heads=2, head_dim=12, **common)
        return dict(ours, n_kv_heads=2, head_dim=12, qk_norm="rmsnorm", norm_eps=1e-6), hf, M.qwen3.modeling_qwen3
    if name == "gemma2":
        hf = transformers.Gemma2Config(attn_logit_softcapping=2.0, **gemma, **common)
        return (dict(ours, n_kv_heads=2, head_dim=12, query_pre_attn_scalar=10, attn_logit_softcap=2.0), hf,
                M.gemma2.modeling_gemma2)  # fmt: skip
    if name == "gemma3":
        hf = transformers.Gemma3TextConfig(**gemma, **common)
        return (dict(ours, n_kv_heads=2, head_dim=12, query_pre_attn_scalar=10, qk_norm="rmsnorm", norm_offset=1.0,
                     norm_eps=1e-6), hf, M.gemma3.modeling_gemma3)  # fmt: skip
    if name == "phi":
        hf = transformers.PhiConfig(partial_rotary_factor=0.5, qk_layernorm=True, **common)
        return dict(ours, bias=True, qk_norm="layernorm", rope_fraction=0.5), hf, M.phi.modeling_phi
    if name == "stablelm":
        hf = transformers.StableLmConfig(num_key_value_heads=2, partial_rotary_factor=0.25, qk_layernorm=True,
                                         use_qkv_bias=True, **common)  # fmt: skip
        return (dict(ours, n_kv_heads=2, qkv_bias=True, qk_norm="layernorm_per_head", rope_fraction=0.25), hf,
                M.stablelm.modeling_stablelm)  # fmt: skip
    if name == "olmo2":
        hf = transformers.Olmo2Config(num_key_value_heads=2, **common)
        return dict(ours, n_kv_heads=2, qk_norm="rmsnorm_full_width"), hf, M.olmo2.modeling_olmo2
    hf = transformers.GraniteConfig(num_key_value_heads=2, attention_multiplier=0.2, **common)
    return dict(ours, n_kv_heads=2, attention_multiplier=0.2), hf, M.granite.modeling_granite


def _copy_into(hf_attn, sd: dict, cfg) -> None:
    """Our torch-layout state dict -> the transformers attention's parameters."""
    N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = hf_attn.dense if hasattr(hf_attn, "dense") else hf_attn.o_proj  # Phi names it dense
    for p in ("weight", "bias"):
        if f"in_proj_{p}" in sd:
            q, k, v = np.split(sd[f"in_proj_{p}"], [N * H, (N + K) * H])
            for proj, value in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                getattr(hf_attn, proj).get_parameter(p).data.copy_(torch.from_numpy(np.array(value)))
        if f"out_proj.{p}" in sd:
            out.get_parameter(p).data.copy_(torch.from_numpy(sd[f"out_proj.{p}"]))
    for ours, theirs in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm")):
        if f"{ours}.weight" not in sd:
            continue
        target = getattr(hf_attn, ours, None) or getattr(hf_attn, theirs)
        for p in ("weight", "bias"):
            if f"{ours}.{p}" not in sd:
                continue
            value = torch.from_numpy(np.array(sd[f"{ours}.{p}"]))
            if hasattr(target, "norms"):  # StableLM: one nn.LayerNorm per head
                for h, norm in enumerate(target.norms):
                    norm.get_parameter(p).data.copy_(value[h])
            else:
                target.get_parameter(p).data.copy_(value)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi", "stablelm", "olmo2", "granite"])
def test_attention_matches_the_families_own_module(family, rng):
    """Our attention (both twins, every parameter perturbed) against transformers' attention of the family with the
    same weights, causal, on positions 3 .. 3 + L - 1 (its rotary module's cos and sin, its eager attention); each
    output row within HF_FORWARD_REL of its largest |value| (as the whole-model comparisons)."""
    ours, hf_cfg, module = _family(family)
    cfg = small_config(**ours)
    hf_cfg._attn_implementation = "eager"
    attn_cls = next(getattr(module, n) for n in dir(module) if n.endswith("Attention") and "Flash" not in n
                    and "Sdpa" not in n)  # fmt: skip
    rotary = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))(hf_cfg)
    f, t = perturbed_twins("MultiHeadAttention", cfg, rng)
    hf_attn = attn_cls(hf_cfg, layer_idx=0).eval()
    _copy_into(hf_attn, fi.to_numpy_state_dict(f), cfg)
    x = randn(rng, B, L, cfg.d_model)
    pos = np.broadcast_to(np.arange(L) + 3, (B, L))
    xt, pt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(pos))
    extra = {"layer_type": hf_cfg.layer_types[0]} if family == "gemma3" else {}  # its base is our rope_base
    causal = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, L, L)
    with torch.no_grad():
        want = hf_attn(hidden_states=xt, position_embeddings=rotary(xt, pt, **extra), attention_mask=causal)[0]
        got_t = t(xt, None, pt)
    got = f(jnp.asarray(x), positions=jnp.asarray(pos))
    row_budgets_no_looser(want.numpy())
    for side, out in (("flax", np.asarray(got)), ("torch_ref", got_t.numpy())):
        assert_rows_close(out, want.numpy(), msg=f"{family}, {side}")


def test_dot_product_attention_path_takes_the_features_and_refuses_soft_capping(rng):
    """jax.nn.dot_product_attention computes head_dim, QK-norm and a score scale as the einsum kernel does; it has
    no soft-cap, so asking for it with one is refused when the module is built, and "auto" keeps the einsum path."""
    cfg = small_config(head_dim=12, n_kv_heads=2, qk_norm="rmsnorm", query_pre_attn_scalar=5.0, **ROPE)
    f, _ = perturbed_twins("MultiHeadAttention", cfg, rng)
    dpa = fi.MultiHeadAttention(cfg, flax_config=fi.FlaxConfig(attention_impl="dot_product_attention"),
                                rngs=nnx.Rngs(0))  # fmt: skip
    nnx.update(dpa, nnx.state(f, nnx.Param))
    x, mask = jnp.asarray(randn(rng, B, L, cfg.d_model)), jnp.asarray(padding_mask())
    real = padding_mask().astype(bool)
    np.testing.assert_allclose(np.asarray(dpa(x, mask))[real], np.asarray(f(x, mask))[real], rtol=0, atol=BLOCK)
    capped = cfg.replace(attn_logit_softcap=30.0)
    with pytest.raises(ValueError, match="has no soft-capping"):
        fi.MultiHeadAttention(capped, flax_config=fi.FlaxConfig(attention_impl="dot_product_attention"),
                              rngs=nnx.Rngs(0))  # fmt: skip
    auto = fi.MultiHeadAttention(capped, flax_config=fi.FlaxConfig(attention_impl="auto"), rngs=nnx.Rngs(0))
    assert not auto._use_dot_product_attention()


def test_checkpoint_tables_follow_head_dim():
    """The Hugging Face weight tables size q/k/v and o_proj by head_dim (N H, K H), not by d_model."""
    from flax_impl.hf.convert import config_to_hf, family, hf_values, weight_plan

    cfg = small_config(head_dim=12, n_kv_heads=2, norm="rmsnorm", mlp="gated", bias=False, **ROPE)
    shapes = {k: tuple(v.shape) for k, v in tr.Transformer(cfg).state_dict().items()}
    fam = family("llama")
    plan = {e.ours[0]: e for e in weight_plan(fam, cfg, shapes, hf_values(fam, config_to_hf(fam, cfg)))}
    qkv = plan["blocks.0.attn.in_proj_weight"]
    assert qkv.hf_shapes == ((48, 32), (24, 32), (24, 32))
    assert plan["blocks.0.attn.out_proj.weight"].hf_shapes == ((32, 48),)
