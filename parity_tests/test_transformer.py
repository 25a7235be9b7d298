"""Transformer: the N-layer stack, Flax (scanned and unrolled) vs torch_ref, jit behaviour, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import POSITIONS, perturbed_twins, randn, small_config, twins
from hypothesis import HealthCheck, given, settings, strategies as st

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import ELEMENTWISE, ENCODER, GRAD_REL, RECOMPILED

B, L = 2, 9


def ids_and_mask(rng, cfg, kind):
    ids = rng.integers(0, cfg.vocab_size, (B, L))
    if kind != "padding":
        return ids, None
    mask = np.ones((B, L), np.int32)
    mask[1, 5:] = 0
    return ids, mask


def forward_both(f, t, ids, mask):
    y = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(f, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
    with torch.no_grad():
        yt = t(torch.from_numpy(ids), None if mask is None else torch.from_numpy(mask)).numpy()
    return y, yt


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_six_layer_forward_matches(position, mask, norm_first, rng):
    cfg = small_config(position=position, norm_first=norm_first, causal=mask == "causal", n_layers=6)
    f, t = twins("Transformer", cfg)
    ids, m = ids_and_mask(rng, cfg, mask)
    y, yt = forward_both(f, t, ids, m)
    assert np.abs(yt).max() > 0.5  # unit-scale outputs (final LayerNorm)
    np.testing.assert_allclose(y, yt, rtol=0, atol=ENCODER)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_first", [True, False])
def test_six_layer_gradients_match(position, norm_first, rng):
    cfg = small_config(position=position, norm_first=norm_first, n_layers=6, input_norm=True, padding_idx=0)
    f, t = twins("Transformer", cfg)
    ids, m = ids_and_mask(rng, cfg, "padding")
    ids[:, -1] = 0  # the padding id occurs
    cot = rng.standard_normal((B, L, cfg.d_model)).astype(np.float32)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda mod: jnp.sum(mod(jnp.asarray(ids), jnp.asarray(m)) * cot))(model)

    g = grads(f)
    graphdef, state = nnx.split(f)
    holder = nnx.merge(graphdef, state)
    nnx.update(holder, g)
    g_flax = fi.to_numpy_state_dict(holder)
    (t(torch.from_numpy(ids), torch.from_numpy(m)) * torch.from_numpy(cot)).sum().backward()
    for name, p in t.named_parameters():
        scale = np.abs(p.grad.numpy()).max()
        np.testing.assert_allclose(
            g_flax[name], p.grad.numpy(), rtol=0, atol=GRAD_REL * max(scale, 1e-30), err_msg=name
        )
    assert np.all(g_flax["input.embed.weight"][0] == 0)  # padding row: exactly zero gradient


def test_lesson_stack_parameter_count():
    cfg = fi.TransformerConfig()  # 6 x 512, the lesson's exercise
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    assert fi.count_params(model.blocks) == 18_914_304
    assert tr.count_params(tr.Transformer(cfg).blocks) == 18_914_304
    embed = cfg.vocab_size * cfg.d_model
    assert fi.count_params(model) == 18_914_304 + embed + 2 * cfg.d_model  # + embedding + final_norm


def test_config_dict_drives_the_depth(rng):
    d = small_config(n_layers=3).to_dict()
    f = fi.Transformer(d, rngs=nnx.Rngs(0))
    t = tr.Transformer(d)
    assert len(t.blocks) == 3
    assert f.blocks.ln1.scale[...].shape == (3, d["d_model"])  # stacked on a leading layer axis
    with pytest.raises(TypeError, match="TransformerConfig or a dict"):
        fi.Transformer([("n_layers", 3)], rngs=nnx.Rngs(0))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_equals_unrolled(remat, rng):
    cfg = small_config(n_layers=3, position="rope")
    fcfg = fi.FlaxConfig(remat=remat)
    scanned = fi.Transformer(cfg, flax_config=fcfg, rngs=nnx.Rngs(0))
    unrolled = fi.Transformer(cfg, flax_config=fcfg.replace(scan_layers=False), rngs=nnx.Rngs(1))
    fi.load_torch_state_dict(unrolled, fi.to_numpy_state_dict(scanned))
    scanned.eval()
    unrolled.eval()
    ids, m = ids_and_mask(rng, cfg, "padding")
    y1 = np.asarray(scanned(jnp.asarray(ids), jnp.asarray(m)))
    y2 = np.asarray(unrolled(jnp.asarray(ids), jnp.asarray(m)))
    np.testing.assert_allclose(y1, y2, rtol=0, atol=RECOMPILED)
    w = jnp.asarray(randn(rng, *y1.shape))  # a plain sum of final-LayerNorm outputs has zero gradient
    g1 = nnx.grad(lambda mod: (mod(jnp.asarray(ids)) * w).sum())(scanned)
    g2 = nnx.grad(lambda mod: (mod(jnp.asarray(ids)) * w).sum())(unrolled)
    k1 = np.asarray(g1["blocks"]["ff"][0]["kernel"][...][2])
    k2 = np.asarray(g2["blocks"][2]["ff"][0]["kernel"][...])
    np.testing.assert_allclose(k1, k2, rtol=0, atol=GRAD_REL * np.abs(k2).max())


@pytest.mark.parametrize("unroll", [2, 5])
def test_scan_unroll_computes_the_same(unroll, rng):
    """scan_unroll only regroups the loop: same parameters (stacked), same dropout masks, same outputs and
    gradients as the rolled scan; with unroll >= n_layers no loop is left in the lowered program."""
    cfg = small_config(n_layers=3, dropout=0.3)
    rngs = lambda: nnx.Rngs(params=0, dropout=jax.random.key(0, impl="philox4x32"))  # noqa: E731 (compiles faster)
    rolled = fi.Transformer(cfg, rngs=rngs())
    unrolled = fi.Transformer(cfg, flax_config=fi.FlaxConfig(scan_unroll=unroll), rngs=rngs())
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 8)))
    forward = nnx.jit(lambda m, i: m(i))
    w = jnp.asarray(randn(rng, 2, 8, cfg.d_model))  # a plain sum of final-LayerNorm outputs has zero gradient
    grad = nnx.jit(nnx.grad(lambda m, i: (m(i) * w).sum()))
    y1, y2 = np.asarray(forward(rolled, ids)), np.asarray(forward(unrolled, ids))  # train mode: dropout on
    assert np.any(y1 != np.asarray(forward(rolled, ids)))  # fresh masks per call: dropout is really on
    forward(unrolled, ids)  # keep both dropout streams at the same position
    np.testing.assert_allclose(y2, y1, rtol=0, atol=ELEMENTWISE)
    g1, g2 = grad(rolled, ids), grad(unrolled, ids)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=GRAD_REL * np.abs(a).max())
    unrolled.eval()  # no dropout: the layer loop is the program's only loop
    graphdef, state = nnx.split(unrolled)
    hlo = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).as_text()
    assert hlo.count("stablehlo.while") == (1 if unroll < cfg.n_layers else 0)


def test_scanned_layers_draw_their_own_dropout_masks():
    """Each scanned layer has its own dropout stream; two identical layers given the same input differ."""
    cfg = small_config(n_layers=2, dropout=0.5, attention_dropout=0.0)
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    keys = nnx.state(model.blocks, nnx.RngKey)
    leaves = [
        np.asarray(jax.random.key_data(k[...]))
        for k in jax.tree.leaves(keys, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ]
    assert leaves and all(leaf.shape[0] == 2 and not np.array_equal(leaf[0], leaf[1]) for leaf in leaves)


def test_no_retrace_for_same_shapes_and_one_trace_per_mode(rng):
    cfg = small_config(dropout=0.1)
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    traces = []

    @nnx.jit
    def forward(m, ids):
        traces.append(1)
        return m(ids)

    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, L)))
    model.train()
    forward(model, ids)
    forward(model, ids + 1)
    assert len(traces) == 1
    model.eval()
    forward(model, ids)
    forward(model, ids)
    model.train()
    forward(model, ids)
    model.eval()
    forward(model, ids)
    assert len(traces) == 2  # one per mode, then cached
    forward(model, jnp.zeros((B, L + 1), jnp.int32))  # a new shape traces once more
    assert len(traces) == 3

    grad_traces = []

    @nnx.jit
    def grad_step(m, ids):
        grad_traces.append(1)
        return nnx.grad(lambda mod: mod(ids).sum())(m)

    grad_step(model, ids)
    grad_step(model, ids)
    assert len(grad_traces) == 1


@pytest.mark.parametrize("n_layers", [1, 24])
def test_scanned_program_size_is_flat_in_depth(n_layers):
    """Compile time stays flat with scan: the traced program does not grow with the number of layers."""
    cfg = small_config(n_layers=n_layers)
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i))(state, jnp.zeros((1, 4), jnp.int32))
    n_eqns = len(jaxpr.jaxpr.eqns)
    one = fi.Transformer(small_config(n_layers=1), rngs=nnx.Rngs(0))
    g1, s1 = nnx.split(one)
    n_one = len(jax.make_jaxpr(lambda s, i: nnx.merge(g1, s)(i))(s1, jnp.zeros((1, 4), jnp.int32)).jaxpr.eqns)
    assert n_eqns == n_one


def test_tied_lm_head_matches(rng):
    cfg = small_config()
    f, t = twins("Transformer", cfg)
    ids = rng.integers(0, cfg.vocab_size, (B, L))
    logits = np.asarray(f.logits(f(jnp.asarray(ids))))
    with torch.no_grad():
        logits_t = t.logits(t(torch.from_numpy(ids))).numpy()
    assert logits.shape == (B, L, cfg.vocab_size)
    np.testing.assert_allclose(logits, logits_t, rtol=0, atol=ENCODER * 10)  # a D-long sum of unit-scale terms


def test_bad_input_raises_before_work(rng):
    cfg = small_config(position="learned", max_len=8)
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    model.eval()
    good = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)))
    with pytest.raises(ValueError, match=r"shape \(2, 6\), got \(2, 5\)"):
        model(good, jnp.ones((2, 5), jnp.int32))
    with pytest.raises(TypeError, match="bool or integer"):
        model(good, jnp.ones((2, 6), jnp.float32))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(good[0])
    with pytest.raises(IndexError, match="max_len=8.*sequence length 9"):
        model(jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(IndexError, match=f"token id {cfg.vocab_size} .*num_embeddings={cfg.vocab_size}"):
        model(good.at[1, 2].set(cfg.vocab_size))
    with pytest.raises(TypeError, match="integers"):
        model(good.astype(jnp.float32))


@pytest.mark.slow
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    multi_head=st.booleans(),  # one head as often as several: single-head bugs and head-splitting bugs alike
    n_heads=st.sampled_from([2, 3, 4]),
    grouped=st.booleans(),  # with several heads: one kv head for all (multi-query) half the time
    head_dim=st.sampled_from([2, 4, 8]),
    d_ff=st.integers(1, 24),
    n_layers=st.integers(1, 3),
    batch=st.integers(1, 3),
    length=st.integers(1, 8),
    position=st.sampled_from(POSITIONS),
    rope_style=st.sampled_from(["half", "interleaved"]),
    norm_first=st.booleans(),
    activation=st.sampled_from(["gelu", "gelu_tanh", "relu"]),
    causal=st.booleans(),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_configs_match(
    multi_head, n_heads, grouped, head_dim, d_ff, n_layers, batch, length, position, rope_style, norm_first,
    activation, causal, padded, seed,
):
    """Random small stacks: outputs and the gradient of every parameter, Flax (one jitted value-and-grad) vs
    torch_ref, on random (padded) batches.

    Gradients are compared relative to each parameter's largest entry, so only where they are not identically
    zero: with one real key per sequence the softmax is constant (q and k get no gradient) and a LayerNorm over
    D = 2 outputs +-1 whatever its input (nothing before it does); there both sides hold rounding noise only.
    """
    n_heads = n_heads if multi_head else 1
    cfg = small_config(
        d_model=n_heads * head_dim,
        n_heads=n_heads,
        n_kv_heads=1 if grouped else None,
        d_ff=d_ff,
        n_layers=n_layers,
        position=position,
        rope_style=rope_style,
        norm_first=norm_first,
        activation=activation,
        causal=causal,
        max_len=8,
    )
    f, t = twins("Transformer", cfg, seed=seed % 7)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, length))
    mask = None
    if padded:
        mask = (np.arange(length)[None, :] < rng.integers(1, length + 1, (batch, 1))).astype(np.int32)
    w = randn(rng, batch, length, cfg.d_model)  # a plain sum of final-LayerNorm outputs has zero gradient

    @nnx.jit
    def forward_and_grads(model):
        def loss(m):
            y = m(jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
            return jnp.sum(y * w), y

        return nnx.grad(loss, has_aux=True)(model)

    g, y = forward_and_grads(f)
    yt = t(torch.from_numpy(ids), None if mask is None else torch.from_numpy(mask))
    (yt * torch.from_numpy(w)).sum().backward()
    np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), rtol=0, atol=ENCODER)
    real_keys = length if mask is None else int(mask.sum(axis=1).min())
    if cfg.d_model < 4 or real_keys < 2:  # identically zero gradients (docstring): nothing but noise to compare
        return
    grads = fi.to_numpy_state_dict(_grads_as_module(f, g))
    for name, p in t.named_parameters():
        want = p.grad.numpy()
        np.testing.assert_allclose(grads[name], want, rtol=0, atol=GRAD_REL * np.abs(want).max(), err_msg=name)


# ---------------------------------------------------------------------------------------- decoder-family stacks
LLAMA_LIKE = dict(
    norm="rmsnorm", mlp="gated", activation="silu", n_kv_heads=2, bias=False, position="rope", causal=True,
    lm_head="untied",
)
BERT_LIKE = dict(
    norm_first=False, input_norm=True, final_norm=False, position="learned", type_vocab_size=2, norm_eps=1e-12,
)


@pytest.mark.parametrize("family", ["llama-like", "bert-like"])
@pytest.mark.parametrize("scan", [True, False])
def test_family_stacks_logits_hidden_states_and_gradients_match(family, scan, rng):
    """A Llama-like stack (RMSNorm, SwiGLU, GQA, RoPE, untied head) and a BERT-like one (post-LN, token types,
    embedding LayerNorm), every parameter perturbed: per-layer hidden states, logits and the gradient of every
    parameter, Flax (scanned and unrolled) vs torch_ref, on a padded batch."""
    cfg = small_config(**(LLAMA_LIKE if family == "llama-like" else BERT_LIKE))
    f, t = perturbed_twins("Transformer", cfg, rng, flax_config=fi.FlaxConfig(scan_layers=scan))
    ids, mask = ids_and_mask(rng, cfg, "padding")
    types = rng.integers(0, 2, (B, L)) if cfg.type_vocab_size else None
    kw = {} if types is None else {"token_type_ids": jnp.asarray(types)}
    tkw = {} if types is None else {"token_type_ids": torch.from_numpy(types)}
    w = randn(rng, B, L, cfg.vocab_size)

    def loss(m):
        return jnp.sum(m.logits(m(jnp.asarray(ids), jnp.asarray(mask), **kw)) * w)

    g = nnx.grad(loss)(f)
    logits = np.asarray(f.logits(f(jnp.asarray(ids), jnp.asarray(mask), **kw)))
    hidden = np.asarray(f.hidden_states(jnp.asarray(ids), jnp.asarray(mask), **kw))
    logits_t = t.logits(t(torch.from_numpy(ids), torch.from_numpy(mask), **tkw))
    (logits_t * torch.from_numpy(w)).sum().backward()
    with torch.no_grad():
        hidden_t = t.hidden_states(torch.from_numpy(ids), torch.from_numpy(mask), **tkw).numpy()
    real = mask.astype(bool)
    assert hidden.shape == (cfg.n_layers + 1, B, L, cfg.d_model)
    np.testing.assert_allclose(hidden[:, real], hidden_t[:, real], rtol=0, atol=ENCODER)
    scale = np.abs(logits_t.detach().numpy()).max()
    np.testing.assert_allclose(logits[real], logits_t.detach().numpy()[real], rtol=0, atol=ENCODER * max(scale, 1))
    grads = fi.to_numpy_state_dict(_grads_as_module(f, g))
    assert set(grads) == {n for n, _ in t.named_parameters()}
    for name, p in t.named_parameters():
        want = p.grad.numpy()
        np.testing.assert_allclose(grads[name], want, rtol=0, atol=GRAD_REL * np.abs(want).max(), err_msg=name)


def _grads_as_module(module, grads_state):
    graph, _, rest = nnx.split(module, nnx.Param, ...)
    return nnx.merge(graph, grads_state, rest)


def test_hidden_states_end_where_the_forward_ends(rng):
    """hidden_states()[-1] is the last block's output: final_norm of it is the forward; [0] is the input."""
    cfg = small_config(position="learned", final_norm=True)
    f, _ = twins("Transformer", cfg)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, L)))
    h = f.hidden_states(ids)
    np.testing.assert_array_equal(np.asarray(f.final_norm(h[-1])), np.asarray(f(ids)))
    np.testing.assert_array_equal(np.asarray(h[0]), np.asarray(f.input(ids)))


def test_untied_head_owns_its_matrix(rng):
    """lm_head="untied": logits = hidden @ W^T + b with its own (V, D) W, not the embedding (torch key lm_head.*)."""
    cfg = small_config(lm_head="untied", lm_head_bias=True)
    f, t = perturbed_twins("Transformer", cfg, rng)
    assert {"lm_head.weight", "lm_head.bias"} <= set(t.state_dict())
    h = randn(rng, B, L, cfg.d_model)
    want = h.astype(np.float64) @ np.asarray(f.lm_head.kernel[...], np.float64) + np.asarray(f.lm_head.bias[...])
    np.testing.assert_allclose(np.asarray(f.logits(jnp.asarray(h))), want, rtol=0, atol=ENCODER)
    tied = np.asarray(h @ np.asarray(f.input.embed.weight[...]).T)
    assert np.abs(np.asarray(f.logits(jnp.asarray(h))) - tied).max() > 1.0


def test_token_types_add_their_rows_and_are_checked(rng):
    cfg = small_config(type_vocab_size=3, position="none", input_norm=False, dropout=0.0)
    f, _ = twins("TransformerInput", cfg)
    ids = rng.integers(0, cfg.vocab_size, (B, L))
    types = rng.integers(0, 3, (B, L))
    got = np.asarray(f(jnp.asarray(ids), jnp.asarray(types)))
    want = np.asarray(f.embed.weight[...])[ids] + np.asarray(f.token_type.weight[...])[types]
    np.testing.assert_allclose(got, want, rtol=0, atol=ELEMENTWISE)
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(ids))), want - np.asarray(f.token_type.weight[...])[types]
                               + np.asarray(f.token_type.weight[...])[0], rtol=0, atol=ELEMENTWISE)  # default: type 0
    with pytest.raises(ValueError, match=r"token_type_ids shape \(2, 3\) != ids shape \(2, 9\)"):
        f(jnp.asarray(ids), jnp.asarray(types[:, :3]))
    with pytest.raises(IndexError, match="token id 3"):
        f(jnp.asarray(ids), jnp.asarray(types + 1))
    g, _ = twins("TransformerInput", small_config())
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        g(jnp.asarray(ids), jnp.asarray(types))
