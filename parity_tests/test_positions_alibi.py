"""ALiBi (Press et al., 2022), Flax vs torch_ref and against its formula in numpy: slopes (Press / BLOOM order,
MPT's rule and its alibi_bias_max), biases up to L = 4096, bad arguments."""

import math

import numpy as np
import pytest
import torch
from helpers import ALIBI_SLOPES, alibi_bias_formula

import flax_impl as fi
import flax_impl.positions as fp
import torch_ref.positions as tp
from flax_impl import tolerances as tol


def assert_close(actual, desired, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64), rtol=rtol, atol=atol
    )


@pytest.mark.parametrize("n_heads", sorted(ALIBI_SLOPES))
def test_alibi_slopes_formula(n_heads):
    want = np.asarray(ALIBI_SLOPES[n_heads], dtype=np.float32)
    a, b = fi.alibi_slopes(n_heads), tp.alibi_slopes(n_heads).numpy()
    assert a.shape == b.shape == (n_heads,) and a.dtype == b.dtype == np.float32
    assert_close(a, want, tol.EXACT)
    assert_close(b, want, tol.EXACT)


@pytest.mark.parametrize("n_heads", [1, 2, 4, 8, 16, 32, 64])
def test_alibi_slopes_are_geometric_for_powers_of_two(n_heads):
    """m_h = 2^(-8h/n): the first slope is the ratio, and the last is 2^-8."""
    for s in (fi.alibi_slopes(n_heads).astype(np.float64), tp.alibi_slopes(n_heads).double().numpy()):
        ratio = 2.0 ** (-8.0 / n_heads)
        np.testing.assert_allclose(s[1:] / s[:-1], ratio, rtol=tol.FLOAT32_REL)
        np.testing.assert_allclose(s[0], ratio, rtol=tol.FLOAT32_REL)
        assert s[-1] == 2.0**-8


@pytest.mark.parametrize("n_heads", [3, 5, 7, 12, 20, 24])
def test_alibi_slopes_twins_any_head_count(n_heads):
    assert_close(fi.alibi_slopes(n_heads), tp.alibi_slopes(n_heads).numpy(), tol.EXACT)
    s = fi.alibi_slopes(n_heads)
    assert len(set(s.tolist())) == n_heads and np.all((s > 0) & (s < 1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_heads, q_len, k_len", [(8, 17, 17), (12, 5, 40), (6, 1, 9), (3, 256, 4096)])
def test_alibi_bias_twins_and_formula(n_heads, q_len, k_len, causal):
    slopes = fi.alibi_slopes(n_heads)
    a = np.asarray(fi.alibi_bias(q_len, k_len, slopes, causal=causal))
    b = tp.alibi_bias(q_len, k_len, torch.from_numpy(slopes), causal=causal).numpy()
    assert a.shape == b.shape == (n_heads, q_len, k_len) and a.dtype == b.dtype == np.float32
    ref = alibi_bias_formula(q_len, k_len, ALIBI_SLOPES[n_heads], causal)
    assert_close(a, b, tol.EXACT)
    assert_close(a, ref, tol.EXACT)


def test_alibi_bias_twins_at_4096():
    slopes = fi.alibi_slopes(1)
    for causal in (False, True):
        a = np.asarray(fi.alibi_bias(4096, 4096, slopes, causal=causal))
        b = tp.alibi_bias(4096, 4096, torch.from_numpy(slopes), causal=causal).numpy()
        assert_close(a, b, tol.ELEMENTWISE)
        assert a[0, 4095, 0] == -4095 * 2.0**-8


def test_alibi_bias_symmetric_and_causal_shapes():
    slopes = fi.alibi_slopes(4)
    sym = np.asarray(fi.alibi_bias(9, 9, slopes))
    assert_close(sym, sym.transpose(0, 2, 1), tol.EXACT)  # -m|i - j| is symmetric
    assert np.all(np.diagonal(sym, axis1=1, axis2=2) == 0) and np.all(sym <= 0)
    causal = np.asarray(fi.alibi_bias(9, 9, slopes, causal=True))
    assert np.all(np.triu(causal, k=1) == 0)  # j > i: 0 here, masked separately
    assert_close(np.tril(causal), np.tril(sym), tol.EXACT)  # j <= i: the same -m(i - j)
    # adding m*j instead of -m(i - j) differs by m*i, one constant per row on j <= i: the same softmax (PITFALLS)
    shift = slopes[:, None, None].astype(np.float64) * np.arange(9.0) - causal  # (N, L, S)
    for i in range(9):
        assert_close(shift[:, i, : i + 1], np.broadcast_to(slopes[:, None] * i, (4, i + 1)), tol.EXACT)


def test_alibi_bad_arguments():
    for mod in (fp, tp):
        with pytest.raises(ValueError, match="n_heads=0"):
            mod.alibi_slopes(0)
        with pytest.raises(ValueError, match="q_len=5, k_len=3"):
            mod.alibi_bias(5, 3, mod.alibi_slopes(2))


def mpt_gen_slopes(n_heads: int, alibi_bias_max: float) -> np.ndarray:
    """MPT's slope rule as its source writes it (transformers' build_mpt_alibi_tensor): the slopes of the next
    power of two n2, base_h = h * alibi_bias_max / n2, then the odd-indexed ones first."""
    n2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / 2.0 ** (np.arange(1, n2 + 1, dtype=np.float64) * (alibi_bias_max / n2))
    if n2 != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


@pytest.mark.parametrize("max_bias", [8.0, 4.0, 16.0])
@pytest.mark.parametrize("n_heads", [1, 3, 4, 6, 12, 20])
def test_alibi_slopes_with_max_bias_match_mpt_rule_on_both_sides(n_heads, max_bias):
    """alibi_slopes(n, max_bias) (Press et al.'s order, BLOOM's) equals MPT's gen_slopes for any head count and
    alibi_bias_max: the two orders are one list; MPT only scales the 8."""
    want = mpt_gen_slopes(n_heads, max_bias)
    a, b = fi.alibi_slopes(n_heads, max_bias), tp.alibi_slopes(n_heads, max_bias).numpy()
    np.testing.assert_allclose(a, want, rtol=tol.FLOAT32_REL, atol=0)
    assert_close(a, b, tol.EXACT)


@pytest.mark.parametrize("max_bias", [0.0, -8.0, float("inf"), float("nan"), True, "8"])
def test_alibi_max_bias_must_be_finite_and_positive(max_bias):
    for slopes in (fi.alibi_slopes, tp.alibi_slopes):
        with pytest.raises(ValueError, match="max_bias="):
            slopes(4, max_bias)
