"""The matmul behind every Linear layer and the tied head: `jax.lax.dot_general`, with float32 accumulation asked
for explicitly for a decode step's few rows of bfloat16 (or float16) operands.

Why (docs/design.md#the-decoder-core): on a CPU without bfloat16 dot instructions (AVX2), XLA computes a
bfloat16 x bfloat16 -> bfloat16 product of a few rows by converting the weights to float32 (inside a decode loop
it hoists that conversion out of the loop, so each step reads float32 weights, twice the bytes), whereas
bfloat16 x bfloat16 -> float32 goes to its packed matmul library, which reads the bfloat16 weights as they are.
One row (batch 1) stays as XLA computes it (its matrix-vector code on the hoisted float32 copy is faster there),
and so do many rows (a prompt), where the packed path was measured slower. The value is the same either way: a
product of two bfloat16 numbers is exact in float32, the sums are float32 (as torch's bfloat16 matmul on a
CPU), and the result is rounded once to the operands' dtype. Float32 operands are left as they are.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# The row counts (product of lhs's free axes) computed with explicit float32 accumulation below float32: a decode
# step's batch; measured on docs/benchmarks.md#decoding's real-size model.
FLOAT32_SUM_ROWS = (2, 64)


def dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
    preferred_element_type: Any = None, **kwargs: Any,
) -> jax.Array:  # fmt: skip
    """`jax.lax.dot_general` (same arguments); for bfloat16 / float16 operands with FLOAT32_SUM_ROWS rows, the
    product asked in float32 and rounded once to the operands' dtype.

    Args:
        lhs, rhs, dimension_numbers, precision, preferred_element_type, kwargs: as `jax.lax.dot_general`.
    Returns:
        The product in `preferred_element_type` if given, else in the operands' dtype.
    """
    (contract, _), (batch, _) = dimension_numbers
    rows = math.prod(n for a, n in enumerate(lhs.shape) if a not in contract and a not in batch)
    low = lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float16)
    if not low or preferred_element_type is not None or not FLOAT32_SUM_ROWS[0] <= rows <= FLOAT32_SUM_ROWS[1]:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, jnp.float32, **kwargs).astype(lhs.dtype)
