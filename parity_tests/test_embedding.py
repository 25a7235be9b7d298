"""Embed vs torch.nn.Embedding: lookup, padding_idx, gradients, tied logits, and bad ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.experimental import checkify

import flax_impl as fi
import torch_ref as tr
from flax_impl.tolerances import EXACT, FLOAT32_REL, SHORT_SUM

V, D = 11, 6


def pair(padding_idx=None, seed=0):
    emb = fi.Embed(V, D, padding_idx=padding_idx, rngs=nnx.Rngs(seed))
    ref = tr.Embed(V, D, padding_idx=padding_idx)
    ref.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(emb)))
    return emb, ref


def test_lookup_equals_weight_rows(rng):
    emb, ref = pair()
    ids = rng.integers(0, V, (3, 5))
    out = np.asarray(emb(jnp.asarray(ids)))
    np.testing.assert_array_equal(out, np.asarray(emb.weight[...])[ids])
    np.testing.assert_allclose(out, ref(torch.from_numpy(ids)).detach().numpy(), rtol=0, atol=EXACT)


@pytest.mark.parametrize("padding_idx", [None, 0, 4, -1])
def test_forward_and_gradient_match_torch(padding_idx, rng):
    emb, ref = pair(padding_idx)
    padding_idx = None if padding_idx is None else padding_idx % V  # torch counts a negative one from the end
    assert emb.padding_idx == padding_idx
    if padding_idx is not None:  # the padding row starts at zero on both sides
        assert not np.asarray(emb.weight[...])[padding_idx].any()
        assert not ref.weight[padding_idx].any()
    ids = rng.integers(0, V, (4, 9))
    ids[:, 0] = padding_idx if padding_idx is not None else 1  # make sure the padding id occurs
    ids[:, 1] = ids[:, 0]  # ... more than once
    cot = rng.standard_normal((4, 9, D)).astype(np.float32)

    def loss(m):
        return jnp.sum(m(jnp.asarray(ids)) * cot)

    grads = nnx.grad(loss)(emb)
    g = np.asarray(grads.weight[...])
    out_t = ref(torch.from_numpy(ids))
    (out_t * torch.from_numpy(cot)).sum().backward()
    np.testing.assert_allclose(np.asarray(emb(jnp.asarray(ids))), out_t.detach().numpy(), rtol=0, atol=EXACT)
    np.testing.assert_allclose(g, ref.weight.grad.numpy(), rtol=FLOAT32_REL, atol=SHORT_SUM)  # sum order differs
    if padding_idx is not None:
        assert np.all(g[padding_idx] == 0.0)  # exactly zero gradient for the padding row


def test_padding_row_forward_is_whatever_it_holds():
    emb, ref = pair(padding_idx=2)
    emb.weight[...] = emb.weight[...].at[2].set(3.0)  # as torch: the row is not forced to zero at lookup
    with torch.no_grad():
        ref.weight[2] = 3.0
    ids = np.array([[2, 1]])
    np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(ids))), ref(torch.from_numpy(ids)).detach().numpy())


def test_attend_is_tied_logits(rng):
    emb, ref = pair()
    x = rng.standard_normal((2, 3, D)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(emb.attend(jnp.asarray(x))), ref.attend(torch.from_numpy(x)).detach().numpy(), rtol=0, atol=SHORT_SUM
    )
    logits = np.asarray(emb.attend(jnp.asarray(x)))
    np.testing.assert_allclose(logits, x @ np.asarray(emb.weight[...]).T, rtol=0, atol=SHORT_SUM)


@pytest.mark.parametrize("bad", [V, -1, 10**6])
def test_out_of_range_id_raises_index_error_naming_id_and_size(bad):
    emb, ref = pair()
    with pytest.raises(IndexError, match=rf"token id {bad} .*num_embeddings={V}"):
        emb(jnp.array([[1, bad]]))
    with pytest.raises(IndexError):  # torch raises too
        ref(torch.tensor([[1, bad]]))


def test_float_ids_raise_type_error():
    emb, _ = pair()
    with pytest.raises(TypeError, match="integers"):
        emb(jnp.array([[1.5]]))
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([1.0, 2.0]))


def test_under_jit_unchecked_path_gives_nan_rows_never_another_token():
    emb, _ = pair()
    f = nnx.jit(lambda m, ids: m(ids))
    out = np.asarray(f(emb, jnp.array([1, V, -1, 3])))
    w = np.asarray(emb.weight[...])
    np.testing.assert_array_equal(out[0], w[1])
    np.testing.assert_array_equal(out[3], w[3])
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()


def test_under_jit_checked_path_raises():
    emb = fi.Embed(V, D, checked=True, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(emb)

    def lookup(state, ids):
        return nnx.merge(graphdef, state)(ids)

    checked = jax.jit(checkify.checkify(lookup))
    err, out = checked(state, jnp.array([1, 2]))
    err.throw()  # no error for good ids
    err, _ = checked(state, jnp.array([1, V]))
    with pytest.raises(checkify.JaxRuntimeError, match=f"out of range \\[0, {V}\\)"):
        err.throw()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="padding_idx=11"):
        fi.Embed(V, D, padding_idx=V, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_embeddings=0"):
        fi.Embed(0, D, rngs=nnx.Rngs(0))


def test_init_is_standard_normal_like_torch():
    w = np.asarray(fi.Embed(1000, 64, rngs=nnx.Rngs(0)).weight[...])
    assert abs(w.mean()) < 0.01 and abs(w.std() - 1.0) < 0.01
