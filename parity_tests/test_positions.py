"""Position schemes: Flax vs torch for every scheme in float32 (tables and rotations up to L = 4096), and each
scheme against its formula written here in numpy, independently of both twins (ALiBi: test_positions_alibi.py).

Axes: B batch, L length, S key length, D model width, N heads, H head dim.
"""

import math

import numpy as np
import pytest
import torch
from flax import nnx
from helpers import POSITIONS, small_config, twins

import flax_impl as fi
import flax_impl.positions as fp
import torch_ref.positions as tp
from flax_impl import tolerances as tol

# --------------------------------------------------------------------------------------------------------------
# Independent references (numpy, float64 unless the docstring of the scheme says float32).


def sinusoid_formula(length: int, d_model: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(pos / 10000^(2i/D)); odd D: last column sin."""
    pe = np.zeros((length, d_model))
    pos = np.arange(length, dtype=np.float64)
    for i in range(0, d_model, 2):
        pe[:, i] = np.sin(pos / 10000.0 ** (i / d_model))
        if i + 1 < d_model:
            pe[:, i + 1] = np.cos(pos / 10000.0 ** (i / d_model))
    return pe


def rope_formula(x, positions, *, base=10_000.0, style="half", fraction=1.0, scale=1.0) -> np.ndarray:
    """RoPE by explicit 2x2 rotations of each pair; the angle p * (theta_i / scale) is formed in float32 as the
    scheme documents (theta_i / scale = 1 / base^(2i/r) / scale in float64, rounded once to float32), the
    rotation in float64."""
    B, L, N, H = x.shape
    r = int(round(fraction * H))
    pairs = [(i, i + r // 2) for i in range(r // 2)] if style == "half" else [(2 * i, 2 * i + 1) for i in range(r // 2)]
    pos = np.broadcast_to(np.asarray(positions), (B, L)).astype(np.float32)  # (B, L)
    out = x.astype(np.float64).copy()
    for i, (ia, ib) in enumerate(pairs):
        theta = np.float32(1.0 / base ** (2.0 * i / r) / scale)
        angle = (pos * theta).astype(np.float64)[:, :, None]  # (B, L, 1), rounded in float32
        a, b = x[..., ia].astype(np.float64), x[..., ib].astype(np.float64)
        out[..., ia] = np.cos(angle) * a - np.sin(angle) * b
        out[..., ib] = np.sin(angle) * a + np.cos(angle) * b
    return out


def both_rope(x: np.ndarray, positions, **kw) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(fp.apply_rope(x, np.asarray(positions), **kw))
    b = tp.apply_rope(torch.from_numpy(x), torch.as_tensor(np.asarray(positions)), **kw).numpy()
    return a, b


def uniform(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Bounded unit-scale input, |x| <= 1, so that float32 rounding stays below ELEMENTWISE."""
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def assert_close(actual, desired, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64),
                               rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------------------------
# Sinusoidal


@pytest.mark.parametrize("length, d_model", [(1, 8), (37, 33), (4096, 64), (4096, 512), (0, 16)])
def test_sinusoidal_twins_and_formula(length, d_model):
    a = np.asarray(fi.sinusoidal_table(length, d_model))
    b = tp.sinusoidal_table(length, d_model).numpy()
    assert a.shape == b.shape == (length, d_model)
    assert a.dtype == b.dtype == np.float32
    assert_close(a, b, tol.ELEMENTWISE)
    ref = sinusoid_formula(length, d_model)
    assert_close(a, ref, tol.ELEMENTWISE)
    assert_close(b, ref, tol.ELEMENTWISE)


def test_sinusoidal_layout_is_interleaved_not_concatenated():
    """Even columns are sines and odd columns cosines (Vaswani), not [sin | cos] halves."""
    pe = np.asarray(fi.sinusoidal_table(50, 16))
    assert_close(pe[:, 0], np.sin(np.arange(50)), tol.ELEMENTWISE)
    assert_close(pe[:, 1], np.cos(np.arange(50)), tol.ELEMENTWISE)
    assert_close(pe[:, 9], np.cos(np.arange(50) / 10000.0 ** (8 / 16)), tol.ELEMENTWISE)
    assert np.all(pe[0, 0::2] == 0.0) and np.all(pe[0, 1::2] == 1.0)


def test_sinusoidal_bad_arguments():
    for mod in (fp, tp):
        with pytest.raises(ValueError, match="d_model=0"):
            mod.sinusoidal_table(4, 0)
        with pytest.raises(ValueError, match="length=-1"):
            mod.sinusoidal_table(-1, 8)


# --------------------------------------------------------------------------------------------------------------
# Learned


@pytest.mark.parametrize("length, offset", [(1, 0), (64, 0), (10, 54), (5, 17)])
def test_learned_twins(length, offset):
    f = fi.LearnedPositions(64, 12, rngs=nnx.Rngs(3))
    t = tp.LearnedPositions(64, 12)
    t.load_state_dict({"weight": torch.from_numpy(np.array(f.weight[...]))})
    a, b = np.asarray(f(length, offset)), t(length, offset).detach().numpy()
    assert a.shape == (length, 12)
    assert_close(a, b, tol.EXACT)
    assert_close(a, np.asarray(f.weight[...])[offset : offset + length], tol.EXACT)


@pytest.mark.parametrize("length, offset", [(9, 0), (3, 6), (1, 8)])
def test_learned_past_max_len_raises_naming_both(length, offset):
    for mod in (fi.LearnedPositions(8, 4, rngs=nnx.Rngs(0)), tp.LearnedPositions(8, 4)):
        with pytest.raises(IndexError, match=rf"max_len=8.*sequence length {length}"):
            mod(length, offset)


# --------------------------------------------------------------------------------------------------------------
# RoPE

ROPE_CASES = [
    # style, fraction, offset, scale
    ("half", 1.0, 0, 1.0),
    ("interleaved", 1.0, 0, 1.0),
    ("half", 0.5, 1000, 1.0),
    ("interleaved", 0.25, 7, 4.0),
    ("half", 1.0, 3000, 2.5),
]


@pytest.mark.parametrize("style, fraction, offset, scale", ROPE_CASES)
def test_rope_twins_at_4096(rng, style, fraction, offset, scale):
    x = rng.standard_normal((1, 4096, 2, 32)).astype(np.float32)
    a, b = both_rope(x, np.arange(4096) + offset, style=style, fraction=fraction, scale=scale)
    assert a.shape == b.shape == x.shape and a.dtype == b.dtype == np.float32
    assert_close(a, b, tol.ELEMENTWISE)


@pytest.mark.parametrize("style, fraction, offset, scale", ROPE_CASES)
def test_rope_formula(rng, style, fraction, offset, scale):
    x = uniform(rng, 2, 300, 2, 16)
    positions = np.arange(300) + offset
    ref = rope_formula(x, positions, style=style, fraction=fraction, scale=scale)
    for out in both_rope(x, positions, style=style, fraction=fraction, scale=scale):
        assert_close(out, ref, tol.ELEMENTWISE)


def test_rope_formula_with_per_row_positions_and_base(rng):
    x = uniform(rng, 2, 40, 3, 8)
    positions = np.stack([np.arange(40) + 5, np.arange(40)[::-1] * 3])  # (B, L): any positions, any order
    ref = rope_formula(x, positions, base=500.0, style="interleaved")
    for out in both_rope(x, positions, base=500.0, style="interleaved"):
        assert_close(out, ref, tol.ELEMENTWISE)


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_dot_product_depends_only_on_relative_position(rng, style):
    """<rope(q, i), rope(k, j)> is a function of i - j: every diagonal of the (i, j) matrix is constant."""
    H, P = 64, 100
    q, k = rng.standard_normal(H).astype(np.float32), rng.standard_normal(H).astype(np.float32)
    xq = np.broadcast_to(q, (1, P, 1, H)).copy()  # the same q at positions 0 .. P-1
    xk = np.broadcast_to(k, (1, P, 1, H)).copy()
    for rq, rk in zip(both_rope(xq, np.arange(P), style=style), both_rope(xk, np.arange(P), style=style), strict=True):
        m = rq[0, :, 0].astype(np.float64) @ rk[0, :, 0].astype(np.float64).T  # (P, P): m[i, j]
        budget = tol.ROPE_RELATIVE * np.linalg.norm(q) * np.linalg.norm(k)
        for d in range(-P + 1, P):
            diag = np.diagonal(m, offset=d)
            assert np.ptp(diag) <= budget, f"i - j = {-d}: spread {np.ptp(diag)} > {budget}"
        # ... and it does depend on i - j (an identity "rotation" would fail here)
        assert abs(m[0, 0] - m[0, 3]) > 1e-2 * np.linalg.norm(q) * np.linalg.norm(k)
        # the value on diagonal i - j = t is <q, R(t) k>: rotating k back by t gives the plain dot product
        assert abs(m[0, 0] - q.astype(np.float64) @ k.astype(np.float64)) <= budget


@pytest.mark.parametrize("style, fraction", [("half", 1.0), ("interleaved", 1.0), ("half", 0.5)])
def test_rope_preserves_norms(rng, style, fraction):
    x = rng.standard_normal((2, 50, 3, 16)).astype(np.float32)
    for out in both_rope(x, np.arange(50) + 123, style=style, fraction=fraction):
        np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=tol.FLOAT32_REL)
        assert np.abs(out - x).max() > 0.1  # it did rotate


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_half_and_interleaved_are_one_rotation_under_a_permutation(rng, fraction):
    """half(x[perm]) == interleaved(x)[perm] with perm = [0, 2, 4, ..., 1, 3, 5, ...] over the rotated dims."""
    H = 16
    r = int(fraction * H)
    perm = np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, H)])
    x = rng.standard_normal((2, 20, 2, H)).astype(np.float32)
    pos = np.arange(20) + 9
    half = both_rope(x[..., perm], pos, style="half", fraction=fraction)
    inter = both_rope(x, pos, style="interleaved", fraction=fraction)
    plain_half = both_rope(x, pos, style="half", fraction=fraction)
    for h, i, p in zip(half, inter, plain_half, strict=True):
        assert_close(h, i[..., perm], tol.EXACT)
        assert np.abs(p - i).max() > 0.1  # without the permutation the two pairings disagree


def test_rope_fraction_rotates_the_head_and_passes_the_tail(rng):
    """fraction = 0.25 of H = 32: the first 8 dims are RoPE over width 8 (theta_i = base^(-2i/8)), the rest is x."""
    x = rng.standard_normal((2, 30, 2, 32)).astype(np.float32)
    pos = np.arange(30) + 4
    for style in ("half", "interleaved"):
        head_only = both_rope(np.ascontiguousarray(x[..., :8]), pos, style=style)
        for out, head in zip(both_rope(x, pos, style=style, fraction=0.25), head_only, strict=True):
            assert_close(out[..., 8:], x[..., 8:], tol.EXACT)
            assert_close(out[..., :8], head, tol.EXACT)


def test_rope_offsets_match_step_by_step_decoding(rng):
    """Rotating a whole sequence at positions o..o+L-1 == rotating each token alone at its position."""
    x = rng.standard_normal((1, 12, 2, 8)).astype(np.float32)
    o = 37
    full = both_rope(x, np.arange(12) + o)
    for t in range(12):
        step = both_rope(np.ascontiguousarray(x[:, t : t + 1]), np.array([t + o]))
        for f, s in zip(full, step, strict=True):
            assert_close(f[:, t : t + 1], s, tol.EXACT)


def test_rope_linear_scale_divides_positions(rng):
    x = rng.standard_normal((1, 16, 2, 8)).astype(np.float32)
    for scaled, plain in zip(both_rope(x, 4 * np.arange(16), scale=4.0), both_rope(x, np.arange(16)), strict=True):
        assert_close(scaled, plain, tol.EXACT)


def test_rope_computes_in_float32_for_bfloat16(rng):
    """bf16 input: the result is the float32 rotation rounded once to bf16 (angles never in bf16)."""
    import jax.numpy as jnp

    x = rng.standard_normal((1, 64, 2, 16)).astype(np.float32)
    pos = np.arange(64) + 2000
    xj = jnp.asarray(x, jnp.bfloat16)
    a = fp.apply_rope(xj, pos)
    assert a.dtype == jnp.bfloat16
    assert_close(a.astype(jnp.float32), fp.apply_rope(xj.astype(jnp.float32), pos).astype(jnp.bfloat16), tol.EXACT)
    xt = torch.from_numpy(x).bfloat16()
    b = tp.apply_rope(xt, torch.as_tensor(pos))
    assert b.dtype == torch.bfloat16
    assert_close(b.float().numpy(), tp.apply_rope(xt.float(), torch.as_tensor(pos)).bfloat16().float().numpy(),
                 tol.EXACT)


@pytest.mark.parametrize("H, fraction", [(7, 1.0), (12, 0.25), (2, 0.5)])
def test_rope_odd_width_raises(H, fraction):
    x = np.zeros((1, 3, 1, H), np.float32)
    with pytest.raises(ValueError, match="must be even"):
        fp.apply_rope(x, np.arange(3), fraction=fraction)
    with pytest.raises(ValueError, match="must be even"):
        tp.apply_rope(torch.from_numpy(x), torch.arange(3), fraction=fraction)


def test_rope_bad_style_and_config():
    x = np.zeros((1, 3, 1, 8), np.float32)
    with pytest.raises(ValueError, match="'gptj'"):
        fp.apply_rope(x, np.arange(3), style="gptj")
    with pytest.raises(ValueError, match="'gptj'"):
        tp.apply_rope(torch.from_numpy(x), torch.arange(3), style="gptj")
    with pytest.raises(ValueError, match="rotated width 7"):  # head_dim = 28 / 4 = 7
        small_config(position="rope", d_model=28, n_heads=4)


# --------------------------------------------------------------------------------------------------------------
# The uniform interface: rotate_qk / TransformerInput, per scheme name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("position", POSITIONS)
def test_rotate_qk_twins(rng, position, causal):
    cfg = small_config(position=position, causal=causal, rope_style="interleaved", rope_fraction=0.5, n_heads=2)
    q, k = uniform(rng, 2, 9, 2, 16), uniform(rng, 2, 9, 2, 16)
    pos = np.arange(9) + 3
    qa, ka = fp.rotate_qk(cfg, q, k, pos)
    qb, kb = tp.rotate_qk(cfg, torch.from_numpy(q), torch.from_numpy(k), torch.as_tensor(pos))
    assert_close(qa, qb.numpy(), tol.ELEMENTWISE)
    assert_close(ka, kb.numpy(), tol.ELEMENTWISE)
    rotates = fp.scheme(position).rotates_qk
    assert rotates == (position == "rope")
    assert (np.abs(np.asarray(qa) - q).max() > 0.1) == rotates  # identity for every other scheme
    if rotates:
        assert_close(qa, rope_formula(q, pos, style="interleaved", fraction=0.5), tol.ELEMENTWISE)
    assert fp.scheme(position).biases_scores == (position == "alibi")


@pytest.mark.parametrize("embed_scale", [False, True])
@pytest.mark.parametrize("position", ["rope", "alibi", "none"])
def test_rope_and_alibi_leave_the_input_embeddings_unchanged(rng, position, embed_scale):
    """TransformerInput's output is exactly the embedding rows (x sqrt(D)) for the schemes that act in attention."""
    cfg = small_config(position=position, embed_scale=embed_scale)
    f, t = twins("TransformerInput", cfg)
    ids = rng.integers(0, cfg.vocab_size, (2, 13))
    rows = np.asarray(f.embed.weight[...])[ids] * (math.sqrt(cfg.d_model) if embed_scale else 1.0)
    assert_close(f(ids), rows, tol.ELEMENTWISE if embed_scale else tol.EXACT)
    assert_close(t(torch.from_numpy(ids)).detach().numpy(), rows, tol.ELEMENTWISE if embed_scale else tol.EXACT)
    assert not hasattr(f, "pos") and "pos.weight" not in t.state_dict()


def test_unknown_scheme_raises():
    with pytest.raises(ValueError, match="position='xpos'"):
        fp.scheme("xpos")
    with pytest.raises(ValueError, match="position='xpos'"):
        small_config(position="xpos")
    assert set(fp.SCHEMES) == set(POSITIONS)
