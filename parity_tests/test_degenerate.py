"""Hostile shapes and padding, both twins: empty batches and sequences, NaN / inf / bad ids at padded positions,
mask values that eager mode rejects under jit (issue 19, items 4 and 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import perturbed_twins, randn, small_config, twins

import flax_impl as fi
from flax_impl import train as ftrain
from torch_ref import train as ttrain

D = 16
CONFIG = dict(vocab_size=41, d_model=D, n_heads=2, d_ff=24, n_layers=2, max_len=12, dropout=0.2)


@pytest.fixture(scope="module")
def encoders():
    """Encoder twins with dropout on (train mode works), learned positions (a table to slice at L = 0)."""
    return twins("Transformer", small_config(**CONFIG, position="learned"))


def _mode(f, t, mode):
    getattr(f, mode)()
    getattr(t, mode)()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_batches_give_empty_results_and_zero_loss(encoders, shape, mode):
    """B = 0 or L = 0: an empty (B, L, D) on both twins in both modes, a loss of 0 over no token and a zero
    gradient (sum / max(count, 1), module docstring of flax_impl.train), the same on both sides."""
    f, t = encoders
    _mode(f, t, mode)
    ids = np.zeros(shape, np.int64)
    mask = np.ones(shape, np.int32)
    y = np.asarray(f(jnp.asarray(ids), jnp.asarray(mask)))
    yt = t(torch.from_numpy(ids), torch.from_numpy(mask)).detach().numpy()
    assert y.shape == yt.shape == shape + (D,)
    batch = {"inputs": ids, "targets": ids, "weights": np.ones(shape, np.float32), "attention_mask": mask}
    loss, grads = nnx.value_and_grad(ftrain.loss_fn)(f, batch)
    t.zero_grad()
    loss_t = ttrain.loss_fn(t, batch)
    loss_t.backward()
    assert float(loss) == float(loss_t.detach()) == 0.0
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    assert all(p.grad is None or not p.grad.any() for p in t.parameters())
    _mode(f, t, "eval")


@pytest.fixture(scope="module")
def blocks():
    rng = np.random.default_rng(5)
    cfg = small_config(**{**CONFIG, "dropout": 0.0}, position="rope")
    return {name: perturbed_twins(name, cfg, rng) for name in ("MultiHeadAttention", "TransformerBlock")}


def _padded(rng, B=3, L=7):
    x = randn(rng, B, L, D)
    mask = np.ones((B, L), np.int32)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return x, mask


@pytest.mark.parametrize("name", ["MultiHeadAttention", "TransformerBlock"])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf, 3e38])
def test_nothing_at_a_padded_position_reaches_a_real_token(blocks, name, poison, rng):
    """NaN, +-inf or a huge value at padded positions: every real token's output is bit for bit the one of the
    clean input, on both twins and under jit (masked keys are zeroed, not multiplied by a zero probability)."""
    f, t = blocks[name]
    x, mask = _padded(rng)
    bad = x.copy()
    bad[mask == 0] = poison
    real = mask.astype(bool)
    jitted = nnx.jit(lambda m, a, b: m(a, b))
    for run in (lambda a: np.asarray(f(jnp.asarray(a), jnp.asarray(mask))),
                lambda a: np.asarray(jitted(f, jnp.asarray(a), jnp.asarray(mask))),
                lambda a: t(torch.from_numpy(a), torch.from_numpy(mask)).detach().numpy()):
        clean, poisoned = run(x), run(bad)
        assert np.all(np.isfinite(poisoned[real]))
        np.testing.assert_array_equal(poisoned[real], clean[real])


def test_out_of_range_id_at_a_padded_position(rng):
    """Eager: IndexError on both twins (ids are checked, padding included). Under jit the Flax lookup gives a
    NaN row there, which reaches no real token and no loss term of weight 0."""
    f, t = twins("Transformer", small_config(**{**CONFIG, "dropout": 0.0}, position="rope", causal=True))
    ids = rng.integers(0, CONFIG["vocab_size"], (2, 6))
    mask = np.ones((2, 6), np.int32)
    mask[0, 3:] = 0
    bad = ids.copy()
    bad[0, 4] = -7
    with pytest.raises(IndexError, match="token id -7"):
        f(jnp.asarray(bad), jnp.asarray(mask))
    with pytest.raises(IndexError):
        t(torch.from_numpy(bad), torch.from_numpy(mask))
    forward = nnx.jit(lambda m, a, b: m(a, b))
    clean, poisoned = np.asarray(forward(f, ids, mask)), np.asarray(forward(f, bad, mask))
    assert np.isnan(poisoned[0, 4]).all()
    np.testing.assert_array_equal(poisoned[mask == 1], clean[mask == 1])
    batch = {"inputs": ids, "targets": ids, "weights": mask.astype(np.float32), "attention_mask": mask}
    loss = nnx.jit(ftrain.loss_fn)
    assert float(loss(f, {**batch, "inputs": bad})) == float(loss(f, batch))


@pytest.mark.parametrize("value", [-1, 2])
def test_a_mask_value_eager_rejects_is_nan_under_jit_never_a_silent_answer(blocks, value, rng):
    """A (B, S) integer mask holding -1 or 2: ValueError on both twins eagerly; under jit that sequence's outputs
    are all NaN (its values cannot be inspected), the other sequences unchanged."""
    f, t = blocks["TransformerBlock"]
    x, mask = _padded(rng)
    bad = mask.copy()
    bad[1, 5] = value  # at a padded position: read as "real" by truthiness, it would change row 1's answer
    with pytest.raises(ValueError, match="holds 0/1 only"):
        f(jnp.asarray(x), jnp.asarray(bad))
    with pytest.raises(ValueError, match="holds 0/1 only"):
        t(torch.from_numpy(x), torch.from_numpy(bad))
    forward = nnx.jit(lambda m, a, b: m(a, b))
    clean, got = np.asarray(forward(f, x, mask)), np.asarray(forward(f, x, bad))
    assert np.isnan(got[1]).all()
    np.testing.assert_array_equal(got[[0, 2]], clean[[0, 2]])


def test_empty_inputs_to_the_pure_functions():
    """L = 0 for the position functions, on both twins: empty results of the right shape."""
    import torch_ref as tr

    assert fi.sinusoidal_table(0, 8).shape == tuple(tr.sinusoidal_table(0, 8).shape) == (0, 8)
    x = np.zeros((2, 0, 2, 4), np.float32)
    assert fi.apply_rope(jnp.asarray(x), jnp.arange(0)).shape == x.shape
    assert tuple(tr.apply_rope(torch.from_numpy(x), torch.arange(0)).shape) == x.shape
    assert fi.alibi_bias(0, 0, fi.alibi_slopes(2)).shape == tuple(tr.alibi_bias(0, 0, tr.alibi_slopes(2)).shape)
    drop = fi.Dropout(0.5, rngs=nnx.Rngs(0))
    assert drop(jnp.zeros((0, 3))).shape == (0, 3) and drop(jnp.zeros((3, 0))).shape == (3, 0)
