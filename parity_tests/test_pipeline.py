"""The input pipeline: TransformerInput Flax vs torch per scheme (outputs and gradients), encode_text on both
sides and against the lesson's recipe in numpy, and the batched form (tokenizers: test_tokenizer.py).

Axes: B batch, L length, D model width, V vocabulary.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import POSITIONS, small_config

import flax_impl as fi
import torch_ref as tr
from flax_impl import tolerances as tol


def assert_close(actual, desired, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64),
                               rtol=rtol, atol=atol)


def sinusoid_formula(length: int, d_model: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(same), float64."""
    pe = np.zeros((length, d_model))
    pos = np.arange(length)[:, None]
    pe[:, 0::2] = np.sin(pos / 10000.0 ** (np.arange(0, d_model, 2) / d_model))
    pe[:, 1::2] = np.cos(pos / 10000.0 ** (np.arange(0, d_model, 2) / d_model))
    return pe


def layer_norm_formula(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def perturbed_twins(config, rng: np.random.Generator):
    """TransformerInput twins whose every parameter (LayerNorm scale and bias included) is random, not its init."""
    f = fi.TransformerInput(config, rngs=nnx.Rngs(0))
    state = nnx.state(f, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        var[...] = jnp.asarray(rng.standard_normal(var[...].shape).astype(np.float32))
    nnx.update(f, state)
    t = tr.TransformerInput(config)
    t.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(f)))
    f.eval()
    t.eval()
    return f, t


# --------------------------------------------------------------------------------------------------------------
# TransformerInput, Flax vs torch

VARIANTS = [  # input_norm, embed_scale, padding_idx, embedding_multiplier, norm_offset
    (False, False, None, 1.0, 0.0),
    (True, False, None, 1.0, 0.0),
    (False, True, 0, 12.0, 0.0),
    (True, True, 5, 0.3, 1.0),
]


@pytest.mark.parametrize("input_norm, embed_scale, padding_idx, multiplier, offset", VARIANTS)
@pytest.mark.parametrize("position", POSITIONS)
def test_transformer_input_twins(rng, position, input_norm, embed_scale, padding_idx, multiplier, offset):
    cfg = small_config(position=position, input_norm=input_norm, embed_scale=embed_scale, padding_idx=padding_idx,
                       embedding_multiplier=multiplier, norm_offset=offset)  # fmt: skip
    f, t = perturbed_twins(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (3, 17))
    ids[:, -4:] = padding_idx if padding_idx is not None else ids[:, -4:]
    a, b = f(ids), t(torch.from_numpy(ids)).detach().numpy()
    assert a.shape == b.shape == (3, 17, cfg.d_model) and a.dtype == b.dtype == np.float32
    atol = tol.LAYER_NORM if input_norm else tol.ELEMENTWISE
    assert_close(a, b, atol)
    # and against the recipe: E[ids] (x sqrt(D)) x multiplier + position -> LayerNorm(offset + scale, bias)
    sd = {k: v.numpy().astype(np.float64) for k, v in t.state_dict().items()}
    x = sd["embed.weight"][ids] * (math.sqrt(cfg.d_model) if embed_scale else 1.0) * multiplier
    if position == "sinusoidal":
        x = x + sinusoid_formula(17, cfg.d_model)
    elif position == "learned":
        x = x + sd["pos.weight"][:17]
    if input_norm:
        x = layer_norm_formula(x) * (offset + sd["norm.weight"]) + sd["norm.bias"]
    assert_close(a, x, atol, rtol=tol.FLOAT32_REL)


@pytest.mark.parametrize("position, options", [
    ("sinusoidal", {}), ("learned", {}), ("rope", {}), ("learned", dict(embedding_multiplier=12.0, norm_offset=1.0)),
])  # fmt: skip
def test_transformer_input_gradients_twins(rng, position, options):
    cfg = small_config(position=position, input_norm=True, embed_scale=True, padding_idx=0, **options)
    f, t = perturbed_twins(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 11))
    ids[:, :2] = 0
    R = rng.standard_normal((2, 11, cfg.d_model)).astype(np.float32)

    grads = nnx.grad(lambda m: jnp.sum(m(ids) * R))(f)
    flax_grads = {}
    for path, g in nnx.to_flat_state(grads):
        names = [str(p) for p in path]
        names[-1] = "weight" if names[-1] == "scale" else names[-1]
        flax_grads[".".join(names)] = np.asarray(g[...])
    (t(torch.from_numpy(ids)) * torch.from_numpy(R)).sum().backward()
    torch_grads = {k: p.grad.numpy() for k, p in t.named_parameters()}
    assert set(flax_grads) == set(torch_grads)
    for k, g in torch_grads.items():
        assert np.abs(g).max() > 0, k
        np.testing.assert_allclose(flax_grads[k], g, rtol=0, atol=tol.GRAD_REL * np.abs(g).max(), err_msg=k)
    assert np.all(flax_grads["embed.weight"][0] == 0) and np.all(torch_grads["embed.weight"][0] == 0)  # padding_idx


def test_embedding_scalars_round_as_gemma_and_granite_in_bfloat16(rng):
    """bfloat16 embeddings: `embed_scale` multiplies by sqrt(D) rounded to bfloat16 first (transformers'
    GemmaTextScaledWordEmbedding), `embedding_multiplier` as torch's tensor x Python float (Granite: the product in
    float32, rounded once). Both twins bit for bit; jnp's weakly typed x * m (m rounded first) would differ."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    V, D, m = 97, 48, 0.1234567  # sqrt(48) and m are not bfloat16 numbers
    cfg = small_config(d_model=D, position="none", embed_scale=True, embedding_multiplier=m, padding_idx=0)
    f = fi.TransformerInput(cfg, flax_config=fi.FlaxConfig(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    gemma = GemmaTextScaledWordEmbedding(V, D, 0, embed_scale=D**0.5).bfloat16()
    t = tr.TransformerInput(cfg).bfloat16()
    with torch.no_grad():
        weight = torch.from_numpy(rng.standard_normal((V, D)).astype(np.float32) * 3).bfloat16()
        gemma.weight.copy_(weight)
        t.embed.weight.copy_(weight)
    fi.load_torch_state_dict(f, t.state_dict())
    ids = rng.integers(0, V, (2, 16))
    with torch.no_grad():
        want = (gemma(torch.from_numpy(ids)) * m).float().numpy()
        np.testing.assert_array_equal(t(torch.from_numpy(ids)).float().numpy(), want)
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(ids)).astype(jnp.float32)), want)
    scaled = f.embed(jnp.asarray(ids)) * jnp.asarray(math.sqrt(D), jnp.bfloat16)
    assert np.any(np.asarray((scaled * m).astype(jnp.float32)) != want)  # m rounded to bfloat16 first


def test_transformer_input_past_max_len_raises(rng):
    cfg = small_config(position="learned", max_len=8)
    ids = rng.integers(0, cfg.vocab_size, (1, 9))
    with pytest.raises(IndexError, match=r"max_len=8.*sequence length 9"):
        fi.TransformerInput(cfg, rngs=nnx.Rngs(0))(ids)
    with pytest.raises(IndexError, match=r"max_len=8.*sequence length 9"):
        tr.TransformerInput(cfg)(torch.from_numpy(ids))


# --------------------------------------------------------------------------------------------------------------
# encode_text


def encode_both(text, tokenizer, E: np.ndarray, *, table=None, **kw):
    a = fi.encode_text(text, tokenizer, jnp.asarray(E), table=None if table is None else jnp.asarray(table), **kw)
    b = tr.encode_text(text, tokenizer, torch.from_numpy(E), table=None if table is None else torch.from_numpy(table),
                       **kw)
    return np.asarray(a), b.numpy()


@pytest.mark.parametrize("embed_scale, input_norm", [(False, False), (True, True)])
@pytest.mark.parametrize("position", POSITIONS)
def test_encode_text_twins_and_recipe(rng, position, embed_scale, input_norm):
    D = 24
    E = rng.standard_normal((260, D)).astype(np.float32)
    table = rng.standard_normal((64, D)).astype(np.float32) if position == "learned" else None
    text = "Hello, wörld! 位置 🙂"
    a, b = encode_both(text, fi.ByteTokenizer(), E, table=table, position=position, embed_scale=embed_scale,
                       input_norm=input_norm)
    ids = [c + 4 for c in text.encode("utf-8")]  # ByteTokenizer: byte b -> id b + 4
    L = len(ids)
    atol = tol.LAYER_NORM if input_norm else tol.ELEMENTWISE
    assert a.shape == b.shape == (L, D) and a.dtype == b.dtype == np.float32
    assert_close(a, b, atol)
    x = E.astype(np.float64)[ids] * (math.sqrt(D) if embed_scale else 1.0)
    if position == "sinusoidal":
        x = x + sinusoid_formula(L, D)
    elif position == "learned":
        x = x + table[:L]
    if input_norm:
        x = layer_norm_formula(x)
    assert_close(a, x, atol, rtol=tol.FLOAT32_REL)
    if position in ("rope", "alibi", "none") and not embed_scale:
        assert_close(a, E[ids], tol.EXACT)  # the embeddings enter unchanged


@pytest.mark.parametrize("position", POSITIONS)
def test_encode_text_matches_transformer_input(rng, position):
    """The function and the module are one pipeline: same weights, same text -> the same (L, D) on each side."""
    cfg = small_config(position=position, vocab_size=260, input_norm=True, embed_scale=True)
    f = fi.TransformerInput(cfg, rngs=nnx.Rngs(1))  # LayerNorm at init: scale 1, bias 0 = encode_text's norm
    f.eval()
    t = tr.TransformerInput(cfg)
    t.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(f)))
    t.eval()
    tok = fi.ByteTokenizer()
    text = "the same text on both sides"
    ids = np.asarray([tok.encode(text)])
    kw = dict(position=position, embed_scale=True, input_norm=True)
    a = fi.encode_text(text, tok, f.embed, table=f.pos if position == "learned" else None, **kw)
    b = tr.encode_text(text, tok, t.embed, table=t.pos if position == "learned" else None, **kw)
    assert_close(a, f(ids)[0], tol.LAYER_NORM)  # encode_text's LayerNorm formula vs the LayerNorm module
    assert_close(b.detach().numpy(), t(torch.from_numpy(ids))[0].detach().numpy(), tol.LAYER_NORM)


def test_encode_text_accepts_modules_and_arrays(rng):
    E = rng.standard_normal((260, 8)).astype(np.float32)
    nnx_embed = nnx.Embed(260, 8, rngs=nnx.Rngs(0))
    nnx_embed.embedding[...] = jnp.asarray(E)
    torch_embed = torch.nn.Embedding(260, 8)
    torch_embed.weight.data = torch.from_numpy(E.copy())
    want = fi.encode_text("abc", fi.ByteTokenizer(), E)  # numpy (V, D) works too
    assert_close(fi.encode_text("abc", fi.ByteTokenizer(), nnx_embed), want, tol.EXACT)
    assert_close(tr.encode_text("abc", tr.ByteTokenizer(), torch_embed).detach().numpy(), want, tol.EXACT)
    with pytest.raises(TypeError, match="embedding must be"):
        fi.encode_text("abc", fi.ByteTokenizer(), E[0])
    with pytest.raises(TypeError, match="embedding must be"):
        tr.encode_text("abc", tr.ByteTokenizer(), E)  # numpy is not a tensor on the torch side


def test_encode_text_with_bpe_trained_in_process(rng, bpe):
    V = bpe.get_vocab_size()
    E = rng.standard_normal((V, 16)).astype(np.float32)
    text = "RoPE rotates the keys; ALiBi adds a bias."
    ids = bpe.encode(text).ids
    assert len(ids) > 3 and len(ids) < len(text)  # merged subwords, not characters
    for position in POSITIONS:
        table = rng.standard_normal((32, 16)).astype(np.float32) if position == "learned" else None
        a, b = encode_both(text, bpe, E, table=table, position=position)
        assert a.shape == (len(ids), 16)
        assert_close(a, b, tol.ELEMENTWISE)
        x = E.astype(np.float64)[ids]
        if position == "sinusoidal":
            x = x + sinusoid_formula(len(ids), 16)
        elif position == "learned":
            x = x + table[: len(ids)]
        assert_close(a, x, tol.ELEMENTWISE)


def test_encode_text_with_a_callable_tokenizer(rng):
    E = rng.standard_normal((50, 8)).astype(np.float32)

    def chars(s):
        return [ord(c) % 50 for c in s]

    a, b = encode_both("callable!", chars, E, position="none")
    assert_close(a, E[chars("callable!")], tol.EXACT)
    assert_close(b, E[chars("callable!")], tol.EXACT)


@pytest.mark.parametrize("side", ["flax", "torch"])
def test_encode_text_out_of_range_token_raises_naming_token_and_vocab(rng, side, bpe):
    mod, arr = (fi, jnp.asarray) if side == "flax" else (tr, torch.from_numpy)
    E = arr(rng.standard_normal((97, 8)).astype(np.float32))
    # 'a' is byte 97 -> ByteTokenizer id 101, past an embedding of 97 rows
    with pytest.raises(IndexError, match=r"token id 101 \('a'\) at position 1 .*vocabulary size 97"):
        mod.encode_text("Za", mod.ByteTokenizer(), E)
    small = arr(rng.standard_normal((3, 8)).astype(np.float32))
    with pytest.raises(IndexError, match=r"token id \d+ \('\w+'\) at position 0 .*vocabulary size 3"):
        mod.encode_text("attention", bpe, small)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("text", ["", "ab"])
def test_encode_text_empty_text_gives_zero_rows(rng, position, text):
    """Empty text -> (0, D) on both sides (documented), with every option; "ab" + a tokenizer giving [] too."""
    E = rng.standard_normal((260, 8)).astype(np.float32)
    table = rng.standard_normal((4, 8)).astype(np.float32) if position == "learned" else None
    tok = fi.ByteTokenizer() if text == "" else (lambda s: [])
    a, b = encode_both(text, tok, E, table=table, position=position, input_norm=True, embed_scale=True)
    assert a.shape == b.shape == (0, 8) and a.dtype == b.dtype == np.float32


@pytest.mark.parametrize("side", ["flax", "torch"])
def test_encode_text_bad_arguments(rng, side):
    mod, arr = (fi, jnp.asarray) if side == "flax" else (tr, torch.from_numpy)
    E = arr(rng.standard_normal((260, 8)).astype(np.float32))
    tok = mod.ByteTokenizer()
    with pytest.raises(ValueError, match="position='xpos'"):
        mod.encode_text("hi", tok, E, position="xpos")
    with pytest.raises(ValueError, match="needs table="):
        mod.encode_text("hi", tok, E, position="learned")
    with pytest.raises(ValueError, match="only used with position='learned'"):
        mod.encode_text("hi", tok, E, position="sinusoidal", table=arr(np.zeros((4, 8), np.float32)))
    with pytest.raises(ValueError, match=r"shape \(max_len, D=8\)"):
        mod.encode_text("hi", tok, E, position="learned", table=arr(np.zeros((4, 7), np.float32)))
    with pytest.raises(IndexError, match="max_len=4.*L=11"):
        mod.encode_text("hello world", tok, E, position="learned", table=arr(np.zeros((4, 8), np.float32)))
    with pytest.raises(TypeError, match="text must be a str"):
        mod.encode_text(["hi"], tok, E)


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_batched_pipeline_twins(rng, position):
    """batch_encode -> TransformerInput on both sides: same (B, L, D); pad positions hold the (zero) pad row."""
    tok = fi.ByteTokenizer()
    cfg = small_config(position=position, vocab_size=tok.vocab_size, padding_idx=tok.pad_id)
    f = fi.TransformerInput(cfg, rngs=nnx.Rngs(2))
    f.eval()
    t = tr.TransformerInput(cfg)
    t.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(f)))
    t.eval()
    ids, mask = fi.batch_encode(["short", "a longer text", ""], tok)
    a, b = np.asarray(f(ids)), t(torch.from_numpy(ids)).detach().numpy()
    assert a.shape == (3, 13, cfg.d_model)
    assert_close(a, b, tol.ELEMENTWISE)
    pos = np.asarray(f.pos(13)) if position == "learned" else 0.0
    assert_close((a - pos)[mask == 0], np.zeros(((mask == 0).sum(), cfg.d_model)), tol.EXACT)


def test_jit_encode_path_equals_eager(rng):
    """TransformerInput under nnx.jit gives the eager result (ids are then traced: no range check, see Embed)."""
    cfg = small_config(position="sinusoidal", input_norm=True)
    f = fi.TransformerInput(cfg, rngs=nnx.Rngs(0))
    f.eval()
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 7)))
    assert_close(nnx.jit(lambda m, i: m(i))(f, ids), f(ids), tol.ELEMENTWISE)
