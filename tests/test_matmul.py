"""flax_impl._kernels.matmul.dot_general: the same product as jax.lax.dot_general, float32 sums for a few rows of
bfloat16 operands, rounded once (against the formula: exact bfloat16 products summed in float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_impl._kernels.matmul import FLOAT32_SUM_ROWS, dot_general

LINEAR = (((1,), (0,)), ((), ()))  # (M, D) x (D, F), as nnx.Linear asks for a 2-d input


def _operands(rows: int, dtype: str) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(rows)
    return (jnp.asarray(rng.standard_normal((rows, 96)), dtype), jnp.asarray(rng.standard_normal((96, 40)), dtype))


@pytest.mark.parametrize("rows", [1, FLOAT32_SUM_ROWS[0], FLOAT32_SUM_ROWS[1], FLOAT32_SUM_ROWS[1] + 1])
def test_bfloat16_product_is_the_float32_sum_rounded_once(rows):
    x, w = _operands(rows, "bfloat16")
    out = dot_general(x, w, LINEAR)
    assert out.dtype == jnp.bfloat16 and out.shape == (rows, 40)
    formula = (np.asarray(x, np.float64) @ np.asarray(w, np.float64)).astype(np.float32)  # exact products
    # float32 sums of 96 terms differ from the float64 sum far below one bfloat16 rounding step (2^-8 relative)
    np.testing.assert_allclose(np.asarray(out, np.float32), formula, rtol=2**-8, atol=1e-6)
    jaxpr = jax.make_jaxpr(lambda a, b: dot_general(a, b, LINEAR))(x, w)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    summed = FLOAT32_SUM_ROWS[0] <= rows <= FLOAT32_SUM_ROWS[1]
    assert [e.params["preferred_element_type"] == jnp.float32 for e in dots] == [summed]
    assert all(str(v.aval.dtype) == "bfloat16" for e in dots for v in e.invars)  # operands stay bfloat16


def test_float32_and_an_asked_output_type_pass_through():
    x, w = _operands(FLOAT32_SUM_ROWS[0], "float32")
    np.testing.assert_array_equal(dot_general(x, w, LINEAR), jax.lax.dot_general(x, w, LINEAR))
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    asked = dot_general(x16, w16, LINEAR, preferred_element_type=jnp.float32)
    assert asked.dtype == jnp.float32
    np.testing.assert_array_equal(asked, jax.lax.dot_general(x16, w16, LINEAR, preferred_element_type=jnp.float32))
