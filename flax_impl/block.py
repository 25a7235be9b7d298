"""The Transformer block of lesson 08: pre-LN by default, post-LN with `norm_first=False`."""

from __future__ import annotations

import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl._kernels.feed_forward import activation_dropout_linear
from flax_impl._kernels.gelu import gelu_exact
from flax_impl.attention import LayerKind, MultiHeadAttention
from flax_impl.config import FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.dropout import Dropout
from flax_impl.norm import make_norm
from flax_impl.sharding import parallel_linear


def activation_fn(name: str, x: jax.Array) -> jax.Array:
    """ "gelu" = exact erf GELU (torch.nn.GELU()), "gelu_tanh" = tanh approximation, "relu", "silu" (x sigmoid(x))."""
    if name == "gelu":
        return gelu_exact(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"activation={name!r} is not one of ['gelu', 'gelu_tanh', 'relu', 'silu']")


def torch_scalar(x: jax.Array, op: Callable[[jax.Array, float], jax.Array], c: float) -> jax.Array:
    """op(x, c) for a Python float c as torch computes a tensor op a Python number: in float32, rounded once to x's
    dtype. (jnp's weakly typed `x * c` rounds c to x's dtype first: another result in bfloat16; in float32 the
    two are the same.)"""
    return op(x.astype(jnp.float32), c).astype(x.dtype)


class Activation(nnx.Module):
    """A parameter-free activation as a module, so that `ff` mirrors torch's nn.Sequential index for index."""

    def __init__(self, name: str):
        activation_fn(name, jnp.zeros(()))  # validate now, not at first call
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation_fn(self.name, x)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), then dropout: (B, L, D) -> (B, L, D) (Shazeer, 2020, "GLU Variants Improve
    Transformer": SwiGLU with act = silu, as Llama's MLP; GeGLU with a GELU). `gate` and `up` (D -> F) are
    column-parallel, `down` (F -> D) row-parallel under a mesh.

    Args:
        config: the architecture (d_model, d_ff, activation, mlp_bias, dropout).
        flax_config: dtypes.
        rngs: parameter and dropout streams.
    """

    def __init__(self, config: TransformerConfig, flax_config: FlaxConfig, *, rngs: nnx.Rngs):
        config, flax_config = as_config(config), as_flax_config(flax_config)
        D, F, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gate = parallel_linear(flax_config, D, F, "column", use_bias=bias, rngs=rngs)
        self.up = parallel_linear(flax_config, D, F, "column", use_bias=bias, rngs=rngs)
        self.down = parallel_linear(flax_config, F, D, "row", use_bias=bias, rngs=rngs)
        self.act = Activation(config.activation)
        self.dropout = Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dropout(self.down(self.act(self.gate(x)) * self.up(x)))  # (B, L, D)


class TransformerBlock(nnx.Module):
    """x (B, L, D) -> (B, L, D).

    Pre-LN (`norm_first=True`, lesson 08): x + attn(ln1(x)), then x + ff(ln2(x)).
    Post-LN (`norm_first=False`, Vaswani et al. and nn.TransformerEncoderLayer's default): ln1(x + attn(x)),
    then ln2(x + ff(x)). Parallel residual (`parallel_residual`, GPT-J / GPT-NeoX): x + attn(ln1(x)) +
    ff(ln2(x)), or ff(ln1(x)) with one shared norm (`parallel_shared_norm`; then there is no ln2). Norms after
    the branches (`branch_norm`, pre-LN only): "sandwich" x + post_attn_norm(attn(ln1(x))), then the same with
    ln2, ff and post_ff_norm (Gemma 2 / 3's input_layernorm, post_attention_layernorm, pre_feedforward_layernorm,
    post_feedforward_layernorm); "post" drops ln1 and ln2: x + post_attn_norm(attn(x)) (OLMo 2). Each branch's
    output is multiplied by `residual_multiplier` before its residual add (Granite). The norms are LayerNorm or
    RMSNorm (`config.norm`, with `norm_offset`). `ff` is the plain MLP [Linear(D, F), activation, Dropout,
    Linear(F, D), Dropout], indexed as torch's nn.Sequential (ff.0, ff.3 hold the weights), or a `GatedMLP`
    (`mlp="gated"`). Under a mesh (flax_impl.sharding), the D -> F layers are column-parallel and the F -> D
    ones row-parallel on the `model` axis (Megatron); the norms are replicated.

    Args:
        config: the architecture.
        flax_config: the Flax execution settings (default FlaxConfig()).
        rngs: parameter and dropout streams.
    """

    def __init__(self, config: TransformerConfig, *, flax_config: FlaxConfig | None = None, rngs: nnx.Rngs):
        config, flax_config = as_config(config), as_flax_config(flax_config)
        D, F = config.d_model, config.d_ff
        self.norm_first, self.parallel = config.norm_first, config.parallel_residual
        self.residual_multiplier = config.residual_multiplier
        self.attn = MultiHeadAttention(config, flax_config=flax_config, rngs=rngs)
        pre, post = config.branch_norm != "post", config.branch_norm != "none"
        shared = config.parallel_residual and config.parallel_shared_norm
        self.ln1 = make_norm(config, flax_config) if pre else nnx.data(None)
        self.ln2 = make_norm(config, flax_config) if pre and not shared else nnx.data(None)
        self.post_attn_norm = make_norm(config, flax_config) if post else nnx.data(None)
        self.post_ff_norm = make_norm(config, flax_config) if post else nnx.data(None)
        if config.mlp == "gated":
            self.ff = GatedMLP(config, flax_config, rngs=rngs)
        else:
            bias = config.mlp_bias
            self.ff = nnx.List(
                [
                    parallel_linear(flax_config, D, F, "column", use_bias=bias, rngs=rngs),
                    Activation(config.activation),
                    Dropout(config.dropout, rngs=rngs),
                    parallel_linear(flax_config, F, D, "row", use_bias=bias, rngs=rngs),
                    Dropout(config.dropout, rngs=rngs),
                ]
            )

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """ff(x): (B, L, D) -> (B, L, D). For the plain MLP the backward pass recomputes dropout(activation(h))
        from the hidden h (B, L, F) and the packed keep bits, so training keeps one (B, L, F) array per block."""
        if isinstance(self.ff, GatedMLP):
            return self.ff(x)
        h = self.ff[0](x)  # (B, L, F)
        bits = self.ff[2].keep_bits(h.shape)  # None when dropout is off
        y = activation_dropout_linear(self.ff[1], self.ff[3], h, bits, self.ff[2].rate)  # (B, L, D)
        return self.ff[4](y)  # (B, L, D)

    def __call__(
        self,
        x: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        kind: LayerKind | None = None,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x (B, L, D) -> (B, L, D); with a cache, (out, the attention's updated cache).

        The arguments after x are the attention's (`MultiHeadAttention.__call__`): the mask, RoPE positions, the
        layer's kind, and the (k, v) cache with the slot of x's first token.
        """
        new_cache = []

        def attend(h: jax.Array) -> jax.Array:
            out = self.attn(h, attention_mask, positions=positions, kind=kind, cache=cache, cache_index=cache_index)
            if cache is None:
                return out
            new_cache.append(out[1])
            return out[0]

        out = self._residuals(x, attend)
        return out if cache is None else (out, new_cache[0])

    def _residuals(self, x: jax.Array, attend: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """The block's residual wiring around `attend` (the attention of its normed or raw input)."""
        if self.parallel:
            h = self.ln1(x)
            return x + self._scaled(attend(h)) + self._scaled(self.feed_forward(h if self.ln2 is None else self.ln2(x)))
        if self.norm_first:
            x = x + self._branch(attend, self.ln1, self.post_attn_norm, x)
            return x + self._branch(self.feed_forward, self.ln2, self.post_ff_norm, x)
        x = self.ln1(x + self._scaled(attend(x)))
        return self.ln2(x + self._scaled(self.feed_forward(x)))

    def _branch(self, f: Callable[[jax.Array], jax.Array], pre: nnx.Module | None, post: nnx.Module | None,
                x: jax.Array) -> jax.Array:  # fmt: skip
        """One pre-LN branch's output, before its residual add: m post(f(pre(x))), a missing norm skipped."""
        h = f(x if pre is None else pre(x))
        return self._scaled(h if post is None else post(h))

    def _scaled(self, h: jax.Array) -> jax.Array:
        """h x `residual_multiplier` (nothing computed at 1)."""
        m = self.residual_multiplier
        return h if m == 1 else torch_scalar(h, operator.mul, m)

