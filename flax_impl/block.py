"""The Transformer block of lesson 08: pre-LN by default, post-LN with `norm_first=False`.

Axes: B batch, L length, D model width, F feed-forward width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.feed_forward import activation_dropout_linear
from flax_impl._kernels.gelu import gelu_exact
from flax_impl.attention import MultiHeadAttention
from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.dropout import Dropout
from flax_impl.norm import layer_norm
from flax_impl.sharding import parallel_linear


def activation_fn(name: str, x: jax.Array) -> jax.Array:
    """ "gelu" = exact erf GELU (torch.nn.GELU()), "gelu_tanh" = tanh approximation, "relu"."""
    if name == "gelu":
        return gelu_exact(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"activation={name!r} is not one of ['gelu', 'gelu_tanh', 'relu']")


class Activation(nnx.Module):
    """A parameter-free activation as a module, so that `ff` mirrors torch's nn.Sequential index for index."""

    def __init__(self, name: str):
        activation_fn(name, jnp.zeros(()))  # validate now, not at first call
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation_fn(self.name, x)


class TransformerBlock(nnx.Module):
    """x (B, L, D) -> (B, L, D).

    Pre-LN (`norm_first=True`, lesson 08): x + attn(ln1(x)), then x + ff(ln2(x)).
    Post-LN (`norm_first=False`, Vaswani et al. and nn.TransformerEncoderLayer's default): ln1(x + attn(x)),
    then ln2(x + ff(x)). `ff` = [Linear(D, F), activation, Dropout, Linear(F, D), Dropout], indexed as torch's
    nn.Sequential (ff.0, ff.3 hold the weights). Under a mesh (flax_impl.sharding), ff.0 is column-parallel and
    ff.3 row-parallel on the `model` axis (Megatron); the norms are replicated.
    """

    def __init__(self, config: TransformerConfig, *, flax_config: FlaxConfig | None = None, rngs: nnx.Rngs):
        D, F = config.d_model, config.d_ff
        flax_config = FlaxConfig() if flax_config is None else flax_config
        self.norm_first = config.norm_first
        self.attn = MultiHeadAttention(config, flax_config=flax_config, rngs=rngs)
        self.ln1 = layer_norm(config, flax_config)
        self.ln2 = layer_norm(config, flax_config)
        self.ff = nnx.List(
            [
                parallel_linear(config, flax_config, D, F, "column", rngs=rngs),
                Activation(config.activation),
                Dropout(config.dropout, rngs=rngs),
                parallel_linear(config, flax_config, F, D, "row", rngs=rngs),
                Dropout(config.dropout, rngs=rngs),
            ]
        )

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """ff(x): (B, L, D) -> (B, L, D). The backward pass recomputes dropout(activation(h)) from the hidden h
        (B, L, F) and the packed keep bits, so training keeps one (B, L, F) array per block, not two."""
        h = self.ff[0](x)  # (B, L, F)
        bits = self.ff[2].keep_bits(h.shape)  # None when dropout is off
        y = activation_dropout_linear(self.ff[1], self.ff[3], h, bits, self.ff[2].rate)  # (B, L, D)
        return self.ff[4](y)  # (B, L, D)

    def __call__(
        self, x: jax.Array, attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None
    ) -> jax.Array:
        if self.norm_first:
            x = x + self.attn(self.ln1(x), attention_mask, positions=positions)
            return x + self.feed_forward(self.ln2(x))
        x = self.ln1(x + self.attn(x, attention_mask, positions=positions))
        return self.ln2(x + self.feed_forward(x))
