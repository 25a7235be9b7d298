"""Normalisation layers: LayerNorm (Ba et al., 2016) with torch.nn.LayerNorm's arithmetic, and RMSNorm."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.layer_norm import layer_norm as layer_norm_kernel
from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.sharding import REPLICATED_VECTOR, param_metadata
from flax_impl.validation import check_bool, check_float, check_int


def _norm_args(num_features: object, epsilon: object) -> tuple[int, float]:
    """A norm's width and epsilon, checked by type and range (the rules of TransformerConfig.norm_eps)."""
    return check_int("num_features", num_features, low=1), check_float("epsilon", epsilon, low=0.0, low_open=True)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (Ba et al., 2016): (x - mean) / sqrt(var + epsilon) * scale + bias,
    x (..., D) -> (..., D) in `dtype` (default x's), as torch.nn.LayerNorm: biased variance from the centred
    values (two passes), statistics and arithmetic in float32. Parameters `scale` (ones) and `bias` (zeros,
    absent if not `use_bias`) of shape (D,), named as in nnx.LayerNorm.

    The gradient is written out: the backward keeps x and the per-row mean and 1/std, and recomputes the
    normalised values. Autodiff of the same formula keeps four (..., D) float32 arrays per norm, which a scan
    over layers stacks and copies every step.

    Raises:
        TypeError: num_features not an integer, epsilon not a number, use_bias not a bool (`ArgumentTypeError`).
        ValueError: num_features < 1, epsilon not a finite number > 0 (here); an input whose last axis is not D
            (at call).

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
        num_features, epsilon = _norm_args(num_features, epsilon)
        use_bias = check_bool("use_bias", use_bias)
        self.num_features, self.epsilon, self.dtype = num_features, epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), **(scale_metadata or {}))
        bias = nnx.Param(jnp.zeros((num_features,), param_dtype), **(bias_metadata or {}))
        self.bias = bias if use_bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1:] != (self.num_features,):
            raise ValueError(f"LayerNorm over {self.num_features} features got input of shape {x.shape}")
        bias = None if self.bias is None else self.bias[...]
        return layer_norm_kernel(x, self.scale[...], bias, self.epsilon, jnp.dtype(self.dtype or x.dtype))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + epsilon) * scale, x (..., D) ->
    (..., D) in `dtype` (default x's), statistics and arithmetic in float32 (as Llama's LlamaRMSNorm; it rounds
    to the input dtype before the scale, which only matters below float32). Parameter `scale` (ones) of shape
    (D,), torch's `weight`. No mean is subtracted and there is no bias.

    Args:
        num_features: D.
        epsilon: added to mean(x^2); > 0 (Llama uses 1e-6 or 1e-5, by config).
        dtype: output dtype (default: x's).
        param_dtype: dtype of `scale`.
        scale_metadata: sharding metadata of `scale` (flax_impl.sharding).
    Raises:
        TypeError: num_features not an integer, epsilon not a number (`ArgumentTypeError`).
        ValueError: num_features < 1, epsilon not a finite number > 0 (here), or an input whose last axis is not
            D (at call).

    Example:
        >>> rms = RMSNorm(4, epsilon=1e-6)
        >>> rms(jnp.array([[1.0, -1.0, 1.0, -1.0]]))           # (B, D) = (1, 4): ~[1, -1, 1, -1]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        scale_metadata: dict[str, Any] | None = None,
    ):
        num_features, epsilon = _norm_args(num_features, epsilon)
        self.num_features, self.epsilon, self.dtype = num_features, epsilon, dtype
        self.scale = nnx.Param(jnp.ones((num_features,), param_dtype), **(scale_metadata or {}))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1:] != (self.num_features,):
            raise ValueError(f"RMSNorm over {self.num_features} features got input of shape {x.shape}")
        x32 = x.astype(jnp.float32)  # (..., D)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype or x.dtype)


def make_norm(config: TransformerConfig, flax_config: FlaxConfig) -> LayerNorm | RMSNorm:
    """The config's norm over D: LayerNorm (bias if `norm_bias`) or RMSNorm, epsilon `norm_eps` (torch's 1e-5 by
    default, not Flax's 1e-6), dtypes from the FlaxConfig, parameters replicated under a mesh."""
    dtypes = dict(dtype=jnp.dtype(flax_config.dtype), param_dtype=jnp.dtype(flax_config.param_dtype))
    if config.norm == "rmsnorm":
        return RMSNorm(
            config.d_model, epsilon=config.norm_eps, scale_metadata=param_metadata(REPLICATED_VECTOR), **dtypes
        )
    return LayerNorm(
        config.d_model,
        epsilon=config.norm_eps,
        use_bias=config.norm_bias,
        scale_metadata=param_metadata(REPLICATED_VECTOR),
        bias_metadata=param_metadata(REPLICATED_VECTOR),
        **dtypes,
    )
