"""The input pipeline of lesson 11: ids -> embedding -> + position -> optional LayerNorm -> dropout.

Axes: B batch, L length, D model width, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl.block import layer_norm
from flax_impl.config import EncoderConfig
from flax_impl.dropout import Dropout
from flax_impl.embedding import Embed
from flax_impl.positions import LearnedPositions, scheme, sinusoidal_table


class TransformerInput(nnx.Module):
    """ids (B, L) -> (B, L, D), the input of the first block.

    embed(ids) (x sqrt(D) if `embed_scale`) + position (sinusoidal table or learned `pos`; nothing for rope,
    alibi and none, whose position enters inside attention) -> `norm` (if `input_norm`) -> dropout.
    Submodules (checkpoint keys): `embed`, `pos` (learned only), `norm` (input_norm only).
    """

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(
            config.vocab_size,
            config.d_model,
            padding_idx=config.padding_idx,
            param_dtype=jnp.dtype(config.param_dtype),
            rngs=rngs,
        )
        if scheme(config.position).at_input == "param":
            self.pos = LearnedPositions(
                config.max_len, config.d_model, param_dtype=jnp.dtype(config.param_dtype), rngs=rngs
            )
        if config.input_norm:
            self.norm = layer_norm(config, rngs=rngs)
        self.dropout = Dropout(config.dropout, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.config
        if jnp.ndim(ids) != 2:
            raise ValueError(f"ids must have shape (B, L), got {jnp.shape(ids)}")
        L = jnp.shape(ids)[1]
        at_input = scheme(cfg.position).at_input
        pos = None  # (L, D): computed first so that L > max_len fails before any other work
        if at_input == "table":
            pos = sinusoidal_table(L, cfg.d_model)
        elif at_input == "param":
            pos = self.pos(L)
        x = self.embed(ids).astype(jnp.dtype(cfg.dtype))  # (B, L, D)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        if pos is not None:
            x = x + pos.astype(x.dtype)[None]
        if cfg.input_norm:
            x = self.norm(x)
        return self.dropout(x)
