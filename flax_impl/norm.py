"""Normalisation layers: LayerNorm (Ba et al., 2016) with torch.nn.LayerNorm's arithmetic, and RMSNorm.

Both take an `offset` c: the output is scaled by (c + w) with the parameter w stored as it is (Gemma's RMSNorm,
x * (1 + w), is c = 1; Nemotron's LayerNorm1P the same for LayerNorm). w starts at 1 - c, so a fresh norm scales
by 1 whatever c; c = 0 (the default) computes exactly what the norm without an offset does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.layer_norm import layer_norm as layer_norm_kernel
from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.sharding import REPLICATED_VECTOR, param_metadata
from flax_impl.validation import check_bool, check_float, check_int


def _norm_args(num_features: object, epsilon: object, offset: object) -> tuple[int, float, float]:
    """A norm's width, epsilon and offset, checked by type and range (the rules of TransformerConfig's norm_eps and
    norm_offset)."""
    num_features = check_int("num_features", num_features, low=1)
    return num_features, check_float("epsilon", epsilon, low=0.0, low_open=True), check_float("offset", offset)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (Ba et al., 2016): (x - mean) / sqrt(var + epsilon) * scale + bias,
    x (..., D) -> (..., D) in `dtype` (default x's), as torch.nn.LayerNorm: biased variance from the centred
    values (two passes), statistics and arithmetic in float32. Parameters `scale` (ones) and `bias` (zeros,
    absent if not `use_bias`) of shape (D,), named as in nnx.LayerNorm. With an `offset` c the scale applied is
    c + `scale` (Nemotron's LayerNorm1P: c = 1), and `scale` starts at 1 - c.

    The gradient is written out: the backward keeps x and the per-row mean and 1/std, and recomputes the
    normalised values. Autodiff of the same formula keeps four (..., D) float32 arrays per norm, which a scan
    over layers stacks and copies every step.

    Raises:
        TypeError: num_features not an integer, epsilon or offset not a number, use_bias not a bool
            (`ArgumentTypeError`).
        ValueError: num_features < 1, epsilon not a finite number > 0, offset not finite (here); an input whose
            last axis is not D (at call).

    Example:
        >>> ln = LayerNorm(4)                                  # epsilon 1e-5, as torch.nn.LayerNorm(4)
        >>> ln(jnp.array([[1.0, 2.0, 3.0, 4.0]]))              # (B, D) = (1, 4): ~[-1.34, -0.45, 0.45, 1.34]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        offset: float = 0.0,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        scale_metadata: dict[str, Any] | None = None,
        bias_metadata: dict[str, Any] | None = None,
    ):
        num_features, epsilon, offset = _norm_args(num_features, epsilon, offset)
        use_bias = check_bool("use_bias", use_bias)
        self.num_features, self.epsilon, self.offset, self.dtype = num_features, epsilon, offset, dtype
        self.scale = nnx.Param(jnp.full((num_features,), 1.0 - offset, param_dtype), **(scale_metadata or {}))
        bias = nnx.Param(jnp.zeros((num_features,), param_dtype), **(bias_metadata or {}))
        self.bias = bias if use_bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1:] != (self.num_features,):
            raise ValueError(f"LayerNorm over {self.num_features} features got input of shape {x.shape}")
        bias = None if self.bias is None else self.bias[...]
        scale = self.scale[...] + self.offset if self.offset else self.scale[...]  # (D,) in the parameter dtype
        return layer_norm_kernel(x, scale, bias, self.epsilon, jnp.dtype(self.dtype or x.dtype))


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + epsilon) * scale, x (..., D) ->
    (..., D) in `dtype` (default x's), statistics and arithmetic in float32 (as Llama's LlamaRMSNorm; it rounds
    to the input dtype before the scale, which only matters below float32). Parameter `scale` (ones) of shape
    (D,), torch's `weight`. No mean is subtracted and there is no bias. With an `offset` c it is Gemma's
    GemmaRMSNorm for c = 1: x / sqrt(mean(x^2) + epsilon) * (c + scale), the sum and product in float32, rounded
    to the output dtype once at the end (Gemma's order, which is also ours without an offset).

    Args:
        num_features: D.
        epsilon: added to mean(x^2); > 0 (Llama uses 1e-6 or 1e-5, by config).
        offset: c, added to `scale` (which starts at 1 - c); finite.
        dtype: output dtype (default: x's).
        param_dtype: dtype of `scale`.
        scale_metadata: sharding metadata of `scale` (flax_impl.sharding).
    Raises:
        TypeError: num_features not an integer, epsilon or offset not a number (`ArgumentTypeError`).
        ValueError: num_features < 1, epsilon not a finite number > 0, offset not finite (here), or an input whose
            last axis is not D (at call).

    Example:
        >>> rms = RMSNorm(4, epsilon=1e-6)
        >>> rms(jnp.array([[1.0, -1.0, 1.0, -1.0]]))           # (B, D) = (1, 4): ~[1, -1, 1, -1]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        offset: float = 0.0,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        scale_metadata: dict[str, Any] | None = None,
    ):
        num_features, epsilon, offset = _norm_args(num_features, epsilon, offset)
        self.num_features, self.epsilon, self.offset, self.dtype = num_features, epsilon, offset, dtype
        self.scale = nnx.Param(jnp.full((num_features,), 1.0 - offset, param_dtype), **(scale_metadata or {}))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1:] != (self.num_features,):
            raise ValueError(f"RMSNorm over {self.num_features} features got input of shape {x.shape}")
        x32 = x.astype(jnp.float32)  # (..., D)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        w = self.scale[...].astype(jnp.float32)  # (D,)
        return (y * (self.offset + w if self.offset else w)).astype(self.dtype or x.dtype)


def make_norm(
    config: TransformerConfig, flax_config: FlaxConfig, num_features: int | None = None
) -> LayerNorm | RMSNorm:
    """The config's norm over `num_features` (default D): LayerNorm (bias if `norm_bias`) or RMSNorm, epsilon
    `norm_eps` (torch's 1e-5 by default, not Flax's 1e-6), offset `norm_offset`, dtypes from the FlaxConfig,
    parameters replicated under a mesh."""
    dtypes = dict(dtype=jnp.dtype(flax_config.dtype), param_dtype=jnp.dtype(flax_config.param_dtype))
    features = config.d_model if num_features is None else num_features
    if config.norm == "rmsnorm":
        return RMSNorm(
            features,
            epsilon=config.norm_eps,
            offset=config.norm_offset,
            scale_metadata=param_metadata(REPLICATED_VECTOR),
            **dtypes,
        )
    return LayerNorm(
        features,
        epsilon=config.norm_eps,
        offset=config.norm_offset,
        use_bias=config.norm_bias,
        scale_metadata=param_metadata(REPLICATED_VECTOR),
        bias_metadata=param_metadata(REPLICATED_VECTOR),
        **dtypes,
    )
