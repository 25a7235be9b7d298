"""The exact (erf) GELU with a one-array derivative: the kernel behind the block's "gelu" activation.

Why it exists (docs/design.md#gelu): differentiating `jax.nn.gelu(approximate=False)` (an erfc form) keeps more
arrays for the backward pass and XLA recomputes its erfc in several fusions; one custom JVP evaluates erf once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SQRT_HALF = 2.0**-0.5
_INV_SQRT_2PI = (2.0 * 3.141592653589793) ** -0.5


@jax.custom_jvp
def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU(x) = x * Phi(x) = x * 0.5 * (1 + erf(x / sqrt 2)), elementwise, any shape: torch.nn.GELU()'s formula.

    Its derivative Phi(x) + x * phi(x) (phi the normal density) is one custom JVP, so reverse mode keeps one
    array for the backward pass and evaluates erf once, where differentiating jax.nn.gelu(approximate=False) (an
    erfc form) keeps more and XLA recomputes its erfc in several fusions (docs/design.md#gelu).

    Args:
        x: any shape, floating point.

    Returns:
        GELU(x), the shape and dtype of x.
    """
    return x * (0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF)))


@gelu_exact.defjvp
def _gelu_exact_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (dx,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))  # Phi(x)
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI  # phi(x)
    return x * cdf, dx * (cdf + x * pdf)
