"""Dropout tested by its law (PITFALLS: random bits cannot match torch's) and against torch's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl as fi
from flax_impl.tolerances import DROPOUT_SIGMAS, FLOAT32_REL

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_law_fraction_and_scale(p, rng):
    x = jnp.asarray(rng.uniform(0.5, 2.0, N).astype(np.float32))  # no zeros in the input
    y = np.asarray(fi.Dropout(p, rngs=nnx.Rngs(dropout=0))(x))
    dropped = y == 0
    sigma = np.sqrt(p * (1 - p) / N)
    assert abs(dropped.mean() - p) < DROPOUT_SIGMAS * sigma
    kept = ~dropped
    xs = np.array(x)
    # kept = x * fl32(1 / (1 - p)): the scale rounded once from float64, which is torch's arithmetic ...
    np.testing.assert_array_equal(y[kept], xs[kept] * np.float32(1.0 / (1.0 - p)))
    t = torch.nn.functional.dropout(torch.from_numpy(xs), p=p, training=True).numpy()
    np.testing.assert_array_equal(t[t != 0], xs[t != 0] * np.float32(1.0 / (1.0 - p)))
    # ... and within one fp32 rounding of the exact x / (1 - p)
    exact = xs[kept].astype(np.float64) / (1.0 - p)
    assert np.max(np.abs(y[kept] - exact) / exact) <= np.finfo(np.float32).eps


def test_expectation_preserved(rng):
    x = jnp.asarray(rng.standard_normal(N).astype(np.float32))
    drop = fi.Dropout(0.5, rngs=nnx.Rngs(dropout=1))
    # E[y] = x elementwise: the mean over many draws of y / x tends to 1
    ratios = [float(jnp.mean(drop(jnp.ones(N)))) for _ in range(4)]
    assert all(abs(r - 1.0) < DROPOUT_SIGMAS * np.sqrt(0.25 / N) * 2 for r in ratios)
    assert drop(x).shape == x.shape


def test_eval_is_identity_bit_for_bit(rng):
    x = jnp.asarray(rng.standard_normal((4, 33)).astype(np.float32))
    drop = fi.Dropout(0.7, rngs=nnx.Rngs(dropout=0))
    drop.eval()
    np.testing.assert_array_equal(np.asarray(drop(x)), np.asarray(x))
    drop.train()
    assert not np.array_equal(np.asarray(drop(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(drop(x, deterministic=True)), np.asarray(x))  # call-time override


def test_p0_train_is_identity_and_p1_gives_zeros(rng):
    x = jnp.asarray(rng.standard_normal((4, 33)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fi.Dropout(0.0, rngs=nnx.Rngs(0))(x)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(fi.Dropout(1.0)(x)), np.zeros((4, 33), np.float32))
    t = torch.nn.Dropout(1.0).train()(torch.from_numpy(np.array(x)))
    np.testing.assert_array_equal(t.numpy(), np.zeros((4, 33), np.float32))


def test_same_seed_same_mask_and_fresh_masks_per_call():
    x = jnp.ones((64, 64))
    a, b = fi.Dropout(0.5, rngs=nnx.Rngs(dropout=7)), fi.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
    first_a, first_b = np.asarray(a(x)), np.asarray(b(x))
    np.testing.assert_array_equal(first_a, first_b)
    assert not np.array_equal(np.asarray(a(x)), first_a)


def test_fresh_masks_under_jit():
    drop = fi.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    f = nnx.jit(lambda m, x: m(x))
    x = jnp.ones((32, 32))
    assert not np.array_equal(np.asarray(f(drop, x)), np.asarray(f(drop, x)))


def test_gradient_is_mask_over_keep(rng):
    p = 0.3
    x = jnp.asarray(rng.standard_normal((16, 16)).astype(np.float32))
    drop = fi.Dropout(p, rngs=nnx.Rngs(dropout=5))
    # two clones hold the same stream position, so forward and gradient draw the same mask
    y = nnx.clone(drop)(x)
    g = nnx.grad(lambda m, x: m(x).sum(), argnums=1)(nnx.clone(drop), x)
    mask = np.asarray(y) != 0
    assert 0 < mask.mean() < 1  # some dropped, some kept
    np.testing.assert_array_equal(np.asarray(g), mask.astype(np.float32) / np.float32(1 - p))


@pytest.mark.parametrize("rate", [-0.1, 1.5, "0.1"])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        fi.Dropout(rate)


def test_train_mode_without_rngs_is_a_clear_error():
    with pytest.raises(ValueError, match="rngs"):
        fi.Dropout(0.5)(jnp.ones(3))


def test_dropout_function_checks_rate():
    from flax_impl.dropout import dropout

    with pytest.raises(ValueError, match="rate=1.0"):
        dropout(jnp.ones(3), 1.0, jax.random.key(0))


def test_forward_and_gradient_share_one_mask_under_jit(rng):
    """Under jit + grad, the forward pass and its gradient use one and the same mask."""
    p = 0.5
    x = jnp.asarray(rng.standard_normal((64, 64)).astype(np.float32))
    drop = fi.Dropout(p, rngs=nnx.Rngs(dropout=11))

    @nnx.jit
    def step(m, x):
        return nnx.value_and_grad(lambda m, x: (m(x) * x).sum(), argnums=1)(m, x)

    _, g = step(drop, x)  # d/dx sum(mask * x / keep * x) = 2 * mask * x / keep
    kept = np.asarray(g) != 0
    y = np.asarray(g) / (2 * np.asarray(x))
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(y[kept], 1 / (1 - p), rtol=FLOAT32_REL)  # one mask: 2/keep, two masks: 1/keep


@pytest.mark.parametrize("width", [1, 13, 64])
def test_every_position_is_an_independent_draw(width):
    """The mask is packed eight to a byte and unpacked: every column (also past a multiple of 8) is dropped with
    probability p, and neighbouring elements agree as often as independent draws do (p^2 + (1 - p)^2)."""
    p, rows = 0.3, 4000
    y = np.asarray(fi.Dropout(p, rngs=nnx.Rngs(dropout=3))(jnp.ones((rows, width))))
    dropped = y == 0
    sigma = np.sqrt(p * (1 - p) / rows)
    assert np.all(np.abs(dropped.mean(axis=0) - p) < DROPOUT_SIGMAS * sigma)
    pairs = [dropped[:, 1:] == dropped[:, :-1], dropped[1:] == dropped[:-1]]  # along and across rows
    for same in (s for s in pairs if s.size):
        q = p**2 + (1 - p) ** 2
        assert abs(same.mean() - q) < DROPOUT_SIGMAS * np.sqrt(q * (1 - q) / same.size)


def test_keep_bits_for_fused_kernels():
    """Dropout.keep_bits gives the packed mask a fused kernel applies itself (attention): None when the layer is
    the identity; else uint8 (..., ceil(n/8)) whose unpacked bits keep each element with probability 1 - p."""
    from flax_impl._kernels.dropout import unpack_keep_bits

    p, shape = 0.3, (4000, 13)
    drop = fi.Dropout(p, rngs=nnx.Rngs(dropout=5))
    bits = drop.keep_bits(shape)
    assert bits.dtype == jnp.uint8 and bits.shape == (4000, 2)
    dropped = ~np.asarray(unpack_keep_bits(bits, shape))
    n = dropped.size
    assert abs(dropped.mean() - p) < DROPOUT_SIGMAS * np.sqrt(p * (1 - p) / n)
    assert not np.array_equal(np.asarray(drop.keep_bits(shape)), np.asarray(bits))  # fresh bits per call
    assert drop.keep_bits(shape, deterministic=True) is None
    assert fi.Dropout(0.0, rngs=nnx.Rngs(dropout=5)).keep_bits(shape) is None
    drop.eval()
    assert drop.keep_bits(shape) is None


def test_keep_bits_checks_rate():
    from flax_impl._kernels.dropout import keep_bits

    with pytest.raises(ValueError, match="rate=1.5"):
        keep_bits(jax.random.key(0), 1.5, (3,))


# ----------------------------------------------------------------------------------- nnx.view(model, deterministic=)
VIEW_CONFIG = dict(vocab_size=61, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=16, dropout=0.3,
                   attention_dropout=0.2)


def _view_model(kind: str) -> tuple[nnx.Module, jax.Array]:
    """A module with Dropout layers in train mode (nnx's default) and an input for it."""
    cfg = fi.TransformerConfig(**VIEW_CONFIG)
    rngs = nnx.Rngs(0)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 8, 16)).astype(np.float32))  # (B, L, D)
    if kind == "attention":
        return fi.MultiHeadAttention(cfg, rngs=rngs), x
    if kind == "block":
        return fi.TransformerBlock(cfg, rngs=rngs), x
    ids = jnp.asarray(np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 8)))  # (B, L)
    return fi.Transformer(cfg, flax_config=fi.FlaxConfig(scan_layers=kind == "scanned"), rngs=rngs), ids


def _modes(module: nnx.Module) -> set[bool]:
    return {m.deterministic for _, m in nnx.iter_modules(module) if isinstance(m, fi.Dropout)}


@pytest.mark.parametrize("kind", ["attention", "block", "scanned", "unrolled"])
def test_view_deterministic_equals_eval_and_leaves_the_model_in_train_mode(kind):
    model, x = _view_model(kind)
    y_view = np.asarray(nnx.view(model, deterministic=True)(x))
    assert _modes(model) == {False}  # the view set the mode on a copy
    reference = nnx.clone(model)
    reference.eval()
    np.testing.assert_array_equal(y_view, np.asarray(reference(x)))  # bit for bit


@pytest.mark.parametrize("kind", ["attention", "block", "scanned", "unrolled"])
def test_view_not_deterministic_equals_train_and_leaves_the_model_in_eval_mode(kind):
    model, x = _view_model(kind)
    model.eval()
    y_eval = np.asarray(model(x))
    reference = nnx.clone(model)  # the same rng streams at the same positions
    reference.train()
    y_train = np.asarray(reference(x))
    view = nnx.view(model, deterministic=False)
    y_view = np.asarray(view(x))
    assert _modes(model) == {True}
    assert not np.array_equal(y_view, y_eval)  # dropout is on ...
    np.testing.assert_array_equal(y_view, y_train)  # ... with the masks train mode draws
    assert not np.array_equal(np.asarray(view(x)), y_view)  # and fresh masks on the next call


def test_view_under_jit_and_a_bad_mode():
    drop = fi.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((8, 8))
    f = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(f(nnx.view(drop, deterministic=True), x)), np.ones((8, 8)))
    assert drop.deterministic is False
    assert nnx.view(drop).deterministic is False  # no keyword: the mode is kept
    with pytest.raises(TypeError, match="deterministic='yes' must be True, False or None"):
        nnx.view(drop, deterministic="yes")
