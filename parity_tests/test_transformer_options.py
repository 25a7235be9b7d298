"""The block and model options of the next families (issue 24), on whole stacks: norms after the branches
(`branch_norm`), the (c + w) norm (`norm_offset`), Granite's scalars (`embedding_multiplier`,
`residual_multiplier`, `logits_scaling`) and Gemma 2's `final_logit_softcap`.

Each stack, every parameter perturbed: Flax (scanned and unrolled) vs torch_ref (per-layer hidden states, logits,
the gradient of every parameter); cached decoding in chunks vs the whole forward on both twins; and vs
transformers' own Gemma 2, OLMo 2 and Granite models with the same weights (eager attention, float32). The
per-feature pieces (norms, blocks, the input) are in test_norm.py, test_block.py and test_pipeline.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import perturbed_twins, randn, small_config
from hf_helpers import assert_rows_close, perturb, row_budgets_no_looser

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import BLOCK, ELEMENTWISE, ENCODER, GRAD_REL

B, L = 2, 9
STACKS = {
    "gemma2-like": dict(
        norm="rmsnorm", norm_offset=1.0, branch_norm="sandwich", mlp="gated", activation="gelu_tanh", bias=False,
        embed_scale=True, final_logit_softcap=3.0, n_kv_heads=2,
    ),
    "olmo2-like": dict(
        norm="rmsnorm", branch_norm="post", mlp="gated", activation="silu", bias=False, lm_head="untied", n_kv_heads=2,
    ),
    "granite-like": dict(
        norm="rmsnorm", mlp="gated", activation="silu", bias=False, n_kv_heads=2, embedding_multiplier=12.0,
        residual_multiplier=0.22, logits_scaling=8.0,
    ),
}  # fmt: skip
# Each stack scanned and unrolled would cost twice: the block is the same code either way; what scanning adds is
# stacking blocks whose norms may be absent ("post" has no ln1 / ln2), so the OLMo 2-like stack is scanned.
STACK_CASES = [("gemma2-like", True), ("gemma2-like", False), ("olmo2-like", True), ("granite-like", False)]
CACHE_CASES = [("gemma2-like", False), ("olmo2-like", True), ("granite-like", True)]


def stack_config(name: str, **changes) -> fi.TransformerConfig:
    return small_config(position="rope", causal=True, **{**STACKS[name], **changes})


def padded_ids(rng, cfg):
    ids = rng.integers(0, cfg.vocab_size, (B, L))
    mask = np.ones((B, L), np.int32)
    mask[1, 6:] = 0
    return ids, mask


def _grads_as_module(module, grads_state):
    graph, _, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graph, grads_state, rest)


@pytest.mark.parametrize("name, scan", STACK_CASES)
def test_stacks_hidden_states_logits_and_gradients_match(name, scan, rng):
    """Per-layer hidden states, logits and the gradient of every parameter, Flax vs torch_ref, on a padded batch."""
    cfg = stack_config(name)
    f, t = perturbed_twins("Transformer", cfg, rng, flax_config=fi.FlaxConfig(scan_layers=scan))
    ids, mask = padded_ids(rng, cfg)
    w = randn(rng, B, L, cfg.vocab_size)
    g = nnx.grad(lambda m: jnp.sum(m.logits(m(jnp.asarray(ids), jnp.asarray(mask))) * w))(f)
    logits = np.asarray(f.logits(f(jnp.asarray(ids), jnp.asarray(mask))))
    hidden = np.asarray(f.hidden_states(jnp.asarray(ids), jnp.asarray(mask)))
    logits_t = t.logits(t(torch.from_numpy(ids), torch.from_numpy(mask)))
    (logits_t * torch.from_numpy(w)).sum().backward()
    with torch.no_grad():
        hidden_t = t.hidden_states(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    real = mask.astype(bool)
    scale = np.abs(hidden_t[:, real]).max()  # the multipliers make the residual stream large
    np.testing.assert_allclose(hidden[:, real], hidden_t[:, real], rtol=0, atol=ENCODER * max(scale, 1))
    logits_t = logits_t.detach().numpy()
    np.testing.assert_allclose(logits[real], logits_t[real], rtol=0, atol=ENCODER * max(np.abs(logits_t).max(), 1))
    grads = fi.to_numpy_state_dict(_grads_as_module(f, g))
    assert set(grads) == {n for n, _ in t.named_parameters()}
    for key, p in t.named_parameters():
        want = p.grad.numpy()
        np.testing.assert_allclose(grads[key], want, rtol=0, atol=GRAD_REL * np.abs(want).max(), err_msg=key)


@pytest.mark.parametrize("scaling, cap", [(8.0, None), (1.0, 3.0), (0.5, 2.0)])
def test_logits_divided_then_soft_capped(scaling, cap, rng):
    """logits = c tanh((h E^T / s) / c) (Granite's division, then Gemma 2's cap), against float64 numpy, both twins."""
    cfg = small_config(causal=True, logits_scaling=scaling, final_logit_softcap=cap)
    f, t = perturbed_twins("Transformer", cfg, rng)
    h = randn(rng, B, L, cfg.d_model)
    want = h.astype(np.float64) @ np.asarray(f.input.embed.weight[...], np.float64).T / scaling
    want = want if cap is None else cap * np.tanh(want / cap)
    np.testing.assert_allclose(np.asarray(f.logits(jnp.asarray(h))), want, rtol=0, atol=ELEMENTWISE * 10)
    with torch.no_grad():
        np.testing.assert_allclose(t.logits(torch.from_numpy(h)).numpy(), want, rtol=0, atol=ELEMENTWISE * 10)


def test_options_off_compute_nothing(rng):
    """The defaults add no operation: the tied head is one matmul; an all-on config divides and takes a tanh."""
    off = small_config(causal=True)
    on = off.replace(logits_scaling=2.0, final_logit_softcap=30.0)
    h = jnp.asarray(randn(rng, B, L, off.d_model))
    prims = {}
    for key, cfg in (("off", off), ("on", on)):
        graph, state = nnx.split(fi.Transformer(cfg, rngs=nnx.Rngs(0)))
        jaxpr = jax.make_jaxpr(lambda s, h, graph=graph: nnx.merge(graph, s).logits(h))(state, h)
        prims[key] = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert prims["off"] == ["dot_general"]
    assert {"div", "tanh"} <= set(prims["on"])


IDS = np.asarray([[0, 0, 5, 6, 7, 8, 9, 3, 4], [10, 11, 12, 13, 14, 15, 16, 17, 18]], np.int32)  # (B, L) = (2, 9)
MASK = np.asarray([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], np.int32)  # row 0 left-padded


@pytest.mark.parametrize("name, scan", CACHE_CASES)
def test_cached_decoding_equals_the_whole_forward(name, scan, rng):
    """The left-padded prompt fed through the cache as 5 + 1 + 3 tokens gives the whole forward's hidden states and
    logits at every real token (each row alone, unpadded, no cache), on both twins; a window shorter than the
    prompt."""
    cfg = stack_config(name, sliding_window=4)
    f, t = perturbed_twins("Transformer", cfg, rng, flax_config=fi.FlaxConfig(scan_layers=scan))
    fc, tc, f_out, t_out = f.init_cache(2, 12), t.init_cache(2, 12), [], []
    for a, b in [(0, 5), (5, 6), (6, 9)]:
        h, fc = f(jnp.asarray(IDS[:, a:b]), jnp.asarray(MASK[:, a:b]), cache=fc)
        f_out.append(np.asarray(f.logits(h)))
        with torch.no_grad():
            th, tc = t(torch.from_numpy(IDS[:, a:b]).long(), torch.from_numpy(MASK[:, a:b]), cache=tc)
            t_out.append(t.logits(th).numpy())
    f_out, t_out = np.concatenate(f_out, axis=1), np.concatenate(t_out, axis=1)
    for row in range(2):
        real = MASK[row].astype(bool)
        alone = np.asarray(f.logits(f(jnp.asarray(IDS[row : row + 1, real]))))[0]  # (P, V)
        scale = max(np.abs(alone).max(), 1)
        np.testing.assert_allclose(f_out[row, real], alone, rtol=0, atol=BLOCK * scale)
        np.testing.assert_allclose(t_out[row, real], f_out[row, real], rtol=0, atol=BLOCK * scale)
    assert int(fc.index) == tc.index == 9


# ---------------------------------------------------------------------------------- against transformers' models
TINY = dict(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip
HF = {  # transformers config and model classes, their kwargs, the norm keys in ours, our config
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(head_dim=8, query_pre_attn_scalar=8, attn_logit_softcapping=None, final_logit_softcapping=3.0,
             layer_types=["full_attention"] * 2),
        dict(input_layernorm="ln1", post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="ln2",
             post_feedforward_layernorm="post_ff_norm"),
        dict(STACKS["gemma2-like"], lm_head="tied"),
    ),
    "olmo2": (
        "Olmo2Config", "Olmo2ForCausalLM", {},
        dict(post_attention_layernorm="post_attn_norm", post_feedforward_layernorm="post_ff_norm"),
        STACKS["olmo2-like"],
    ),
    "granite": (
        "GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=8**-0.5, embedding_multiplier=12.0,
                                                    residual_multiplier=0.22, logits_scaling=8.0),
        dict(input_layernorm="ln1", post_attention_layernorm="ln2"),
        dict(STACKS["granite-like"], lm_head="untied"),
    ),
}  # fmt: skip


def ours_from_hf(sd: dict, norms: dict, n_layers: int, tied: bool) -> dict:
    """A Llama-style transformers state dict in torch_ref's keys ([q; k; v] rows packed in in_proj_weight)."""
    out = {"input.embed.weight": sd["model.embed_tokens.weight"], "final_norm.weight": sd["model.norm.weight"]}
    if not tied:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn.in_proj_weight"] = torch.cat([sd[f"{p}self_attn.{x}_proj.weight"] for x in "qkv"])
        out[q + "attn.out_proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        out.update({f"{q}ff.{x}.weight": sd[f"{p}mlp.{x}_proj.weight"] for x in ("gate", "up", "down")})
        out.update({f"{q}{ours}.weight": sd[f"{p}{theirs}.weight"] for theirs, ours in norms.items()})
    return out


@pytest.mark.parametrize("family", sorted(HF))
def test_matches_transformers(family):
    """transformers' Gemma 2 (sandwich norms, (1 + w) RMSNorm, sqrt(D) embedding, final soft-cap), OLMo 2 (norms
    after the branches only; its q/k norms, the attention's business, replaced by identities) and Granite (the
    embedding, residual and logit scalars; its attention multiplier set to 1/sqrt(H)), every parameter perturbed:
    the hidden states after the final norm and the logits at the real tokens of a right-padded batch, both twins."""
    config_cls, model_cls, kwargs, norms, ours = HF[family]
    config = getattr(transformers, config_cls)(**TINY, **kwargs)
    hf = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager").eval()
    if family == "olmo2":
        for layer in hf.model.layers:
            layer.self_attn.q_norm, layer.self_attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
    perturb(hf, seed=0)
    cfg = small_config(position="rope", causal=True, padding_idx=0, norm_eps=1e-5, **ours)
    sd = ours_from_hf(hf.state_dict(), norms, cfg.n_layers, cfg.lm_head == "tied")
    t = tr.Transformer(cfg).eval()
    t.load_state_dict(sd)
    f = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    f.eval()
    fi.load_torch_state_dict(f, sd)
    ids, mask = padded_ids(np.random.default_rng(1), cfg)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        hidden = hf.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state.numpy()
        logits = hf(input_ids=ids_t, attention_mask=mask_t).logits.numpy()
        ours_t = t(ids_t, mask_t)
        ours_t = (ours_t.numpy(), t.logits(ours_t).numpy())
    h = f(jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    row_budgets_no_looser(hidden[real])
    row_budgets_no_looser(logits[real])
    for got in ((np.asarray(h), np.asarray(f.logits(h))), ours_t):
        assert_rows_close(got[0][real], hidden[real], msg=f"{family} hidden")
        assert_rows_close(got[1][real], logits[real], msg=f"{family} logits")
    if family == "gemma2":  # the cap bites: the head's own logits go past 3, the model's stay inside (-3, 3)
        with torch.no_grad():
            assert np.abs(hf.lm_head(torch.from_numpy(hidden)).numpy()).max() > 3.0 > np.abs(logits).max()


# ------------------------------------------------------------------------------------------------------ the config
@pytest.mark.parametrize(
    "field, value, error",
    [
        ("norm_offset", float("nan"), ValueError),
        ("norm_offset", "1", TypeError),
        ("branch_norm", "peri", ValueError),
        ("embedding_multiplier", 0.0, ValueError),
        ("residual_multiplier", -1.0, ValueError),
        ("logits_scaling", float("inf"), ValueError),
        ("final_logit_softcap", 0.0, ValueError),
        ("final_logit_softcap", True, TypeError),
    ],
)
def test_bad_option_values_name_the_field(field, value, error):
    with pytest.raises(error, match=f"{field}="):
        small_config(**{field: value})
