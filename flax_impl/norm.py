"""Normalisation layers: LayerNorm (Ba et al., 2016) with torch.nn.LayerNorm's arithmetic.

Axes: D model width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.layer_norm import layer_norm as layer_norm_kernel
from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.sharding import REPLICATED_VECTOR, param_metadata


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (Ba et al., 2016): (x - mean) / sqrt(var + epsilon) * scale + bias,
    x (..., D) -> (..., D) in `dtype` (default x's), as torch.nn.LayerNorm: biased variance from the centred
    values (two passes), statistics and arithmetic in float32. Parameters `scale` (ones) and `bias` (zeros,
    absent if not `use_bias`) of shape (D,), named as in nnx.LayerNorm.

    The gradient is written out: the backward keeps x and the per-row mean and 1/std, and recomputes the
    normalised values. Autodiff of the same formula keeps four (..., D) float32 arrays per norm, which a scan
    over layers stacks and copies every step.

    Example:
        >>> ln = LayerNorm(4)                                  # epsilon 1e-5, as torch.nn.LayerNorm(4)
        >>> ln(jnp.array([[1.0, 2.0, 3.0, 4.0]]))              # (B, D) = (1, 4): ~[-1.34, -0.45, 0.45, 1.34]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        scale_metadata: dict[str, Any] | None = None,
        bias_metadata: dict[str, Any] | None = None,
    ):
        if not epsilon > 0.0:
            raise ValueError(f"epsilon={epsilon!r} must be > 0")
        self.num_features, self.epsilon, self.dtype = num_features, float(epsilon), dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), **(scale_metadata or {}))
        bias = nnx.Param(jnp.zeros((num_features,), param_dtype), **(bias_metadata or {}))
        self.bias = bias if use_bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1:] != (self.num_features,):
            raise ValueError(f"LayerNorm over {self.num_features} features got input of shape {x.shape}")
        bias = None if self.bias is None else self.bias[...]
        return layer_norm_kernel(x, self.scale[...], bias, self.epsilon, jnp.dtype(self.dtype or x.dtype))


def layer_norm(config: TransformerConfig, flax_config: FlaxConfig) -> LayerNorm:
    """LayerNorm over D with the config's epsilon (torch's 1e-5 by default, not Flax's 1e-6)."""
    return LayerNorm(
        config.d_model,
        epsilon=config.norm_eps,
        use_bias=config.bias,
        dtype=jnp.dtype(flax_config.dtype),
        param_dtype=jnp.dtype(flax_config.param_dtype),
        scale_metadata=param_metadata(REPLICATED_VECTOR),
        bias_metadata=param_metadata(REPLICATED_VECTOR),
    )
