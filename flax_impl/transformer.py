"""The Transformer: an encoder or a decoder, driven by a TransformerConfig (or its dict). Lesson 08's 6 x 512
encoder is its default configuration; a causal config with a KV cache is the decoder of the Hugging Face families.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl.attention import LayerKind, check_attention_mask, layer_kinds, nan_rows_of_bad_mask
from flax_impl.block import TransformerBlock, torch_scalar
from flax_impl.cache import KVCache, advance, check_cache, init_cache
from flax_impl.config import FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.norm import make_norm
from flax_impl.pipeline import TransformerInput
from flax_impl.sharding import BATCH_ACTIVATION, constrain, parallel_linear

_LAYER_AXIS = {nnx.PARTITION_NAME: None}  # the stacked layer axis is never sharded


def _stacked_blocks(config: TransformerConfig, flax_config: FlaxConfig, rngs: nnx.Rngs) -> TransformerBlock:
    """n_layers blocks as one TransformerBlock whose every parameter (and rng stream) has a leading layer axis."""

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYER_AXIS)
    def make(rngs: nnx.Rngs) -> TransformerBlock:
        return TransformerBlock(config, flax_config=flax_config, rngs=rngs)

    return make(rngs)


class Transformer(nnx.Module):
    """ids (B, L) -> hidden states (B, L, D): `input` -> `blocks` x n_layers -> `final_norm` (if configured).

    One walk over the layers serves the forward, the per-layer hidden states and cached decoding. With
    `flax_config.scan_layers` (default) `blocks` is one TransformerBlock whose parameters are stacked on a leading
    (n_layers,) axis, applied with `nnx.scan`: compile time stays flat in depth (`scan_unroll` layers per loop
    iteration). Otherwise `blocks` is an `nnx.List` of blocks, unrolled by jit; `unstacked()` turns the first
    form into the second. `flax_config.remat` rematerialises each block in the backward pass. Parameters carry
    sharding annotations (flax_impl.sharding; the layer axis is never sharded) and, under a mesh, the (B, L, D)
    activations between blocks are split on `data` (flax_impl.distributed).

    Example:
        >>> cfg = TransformerConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=2, causal=True)
        >>> model = Transformer(cfg, rngs=nnx.Rngs(0)); model.eval()
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> model(ids).shape                                        # (B, L, D)
        (2, 5, 32)
        >>> cache = model.init_cache(batch=2, max_len=8)
        >>> h, cache = model(ids, cache=cache)                      # prefill: the same forward, cache filled
        >>> h, cache = model(ids[:, :1], cache=cache)               # one more token per row
        >>> model.logits(h).shape                                   # (B, 1, V)
        (2, 1, 100)
    """

    def __init__(
        self, config: TransformerConfig | dict[str, Any], *, flax_config: FlaxConfig | None = None, rngs: nnx.Rngs
    ):
        config, flax_config = as_config(config), as_flax_config(flax_config)
        self.config, self.flax_config = config, flax_config
        self.input = TransformerInput(config, flax_config=flax_config, rngs=rngs)
        if flax_config.scan_layers:
            self.blocks = _stacked_blocks(config, flax_config, rngs)
        else:
            blocks = [TransformerBlock(config, flax_config=flax_config, rngs=rngs) for _ in range(config.n_layers)]
            self.blocks = nnx.List(blocks)
        if config.final_norm:
            self.final_norm = make_norm(config, flax_config)
        if config.lm_head == "untied":
            D, V = config.d_model, config.vocab_size
            self.lm_head = parallel_linear(flax_config, D, V, "column", use_bias=config.lm_head_bias, rngs=rngs)

    def __call__(
        self, ids: jax.Array, attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:  # fmt: skip
        """The hidden states after the last block (and `final_norm`).

        Args:
            ids: (B, L) int token ids.
            attention_mask: without a cache, the forms of `flax_impl.attention.mask_rules` ((B, L) 1 = real token,
                a bool or float (B|1, N|1, L, L)); with a cache, (B, L) 1 = real token (a left-padded prompt;
                None: all real).
            positions: (L,) or (B, L) positions of the tokens; None: the config's rule (`positions_from`). With a
                cache they come from the cache (one more per real token) and must be None.
            token_type_ids: (B, L) ints below `type_vocab_size`, or None (zeros).
            cache: a KVCache from `init_cache` (causal models): the tokens are written at its next slots and
                attend over every filled one.
        Returns:
            (B, L, D); with a cache, (hidden, the advanced cache).
        Raises:
            ValueError / TypeError / IndexError: malformed ids, mask, positions or cache (before any work).
        """
        hidden, cache, _ = self._run(ids, attention_mask, positions, token_type_ids, cache, collect=False)
        return hidden if cache is None else (hidden, cache)

    def hidden_states(
        self, ids: jax.Array, attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:  # fmt: skip
        """Every layer's output, for locating where two implementations part ways.

        Args:
            ids, attention_mask, positions, token_type_ids: as for `__call__` (no cache).
        Returns:
            (n_layers + 1, B, L, D): the input of block 1, then the output of each block (before `final_norm`).
        """
        return self._run(ids, attention_mask, positions, token_type_ids, None, collect=True)[2]

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KVCache for `batch` rows of up to `max_len` tokens (prompt and continuation), laid out as this
        model's layers are (stacked or one array per layer), in its compute dtype (`flax_impl.cache.init_cache`)."""
        stacked = self.flax_config.scan_layers
        return init_cache(self.config, batch, max_len, stacked=stacked, dtype=self.flax_config.dtype)

    def unstacked(self) -> Transformer:
        """This model with each layer's parameters in arrays of its own (`scan_layers=False`), computing the same.

        A decode loop should run on this form: XLA copies a layer's weights out of a stacked array at every use,
        inside a loop too, so a scanned stack pays that copy at every step (docs/design.md#the-decoder-core).
        Returns the model itself when its layers are not stacked; otherwise a new model whose layers hold slices
        of the stacked arrays (a copy of the layer weights).
        """
        if not self.flax_config.scan_layers:
            return self
        copy = nnx.clone(self)  # new modules and Variables over the same arrays: `self` stays as it is
        copy.flax_config = self.flax_config.replace(scan_layers=False)
        graphdef, stacked = nnx.split(copy.blocks)  # every leaf (n_layers, ...); adapters (flax_impl.lora) too
        layers = range(self.config.n_layers)
        copy.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, n=n: a[n], stacked)) for n in layers])
        return copy

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: (B, L, D) -> (B, L, V) logits in the compute dtype: hidden @ input.embed.weight.T when tied,
        else the `lm_head` Linear (D -> V, bias if `lm_head_bias`); then divided by `logits_scaling` (Granite) and
        soft-capped to c tanh(logits / c), c = `final_logit_softcap` (Gemma 2), each step as torch computes it on
        the logits' dtype (the Python scalar in float32, one rounding per step); nothing computed for the defaults.
        """
        cfg = self.config
        logits = self.lm_head(hidden) if cfg.lm_head == "untied" else self.input.embed.attend(hidden)
        if cfg.logits_scaling != 1:
            logits = torch_scalar(logits, operator.truediv, cfg.logits_scaling)
        if cfg.final_logit_softcap is not None:
            c = cfg.final_logit_softcap
            logits = torch_scalar(jnp.tanh(torch_scalar(logits, operator.truediv, c)), operator.mul, c)
        return logits

    def default_positions(self, ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array | None:
        """The positions (B, L) of a forward given none, by the config's `positions_from` and `position_offset`;
        None for plain slots 0 .. L - 1 (the input and RoPE then use that range directly)."""
        cfg = self.config
        B, L = jnp.shape(ids)
        if cfg.positions_from == "index" or (cfg.positions_from == "mask" and attention_mask is None):
            if cfg.position_offset == 0:
                return None
            return jnp.broadcast_to(cfg.position_offset + jnp.arange(L, dtype=jnp.int32), (B, L))
        if cfg.positions_from == "mask":
            real = jnp.asarray(attention_mask) != 0
        else:
            real = jnp.asarray(ids) != cfg.padding_idx
        count = jnp.cumsum(real.astype(jnp.int32), axis=1)
        return jnp.maximum(jnp.where(real, count, 0) + cfg.position_offset - 1, 0)

    def _run(
        self, ids: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None,
        token_type_ids: jax.Array | None, cache: KVCache | None, collect: bool,
    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:  # fmt: skip
        """(hidden after final_norm, the advanced cache or None, the per-layer states or None)."""
        cfg = self.config
        if jnp.ndim(ids) != 2:
            raise ValueError(f"ids must have shape (B, L), got {jnp.shape(ids)}")
        B, L = jnp.shape(ids)
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, cfg.n_heads, L, L)
        if positions is not None and cache is not None:
            raise ValueError("positions come from the cache when one is given: pass positions=None")
        positions = None if positions is None else jnp.broadcast_to(jnp.asarray(positions), (B, L))
        layer_mask, cache_index = attention_mask, 0
        if cache is None and positions is None:
            positions = self.default_positions(ids, attention_mask)
        elif cache is not None:
            check_cache(cache, cfg, self.flax_config.scan_layers, B, attention_mask)
            real = jnp.ones((B, L), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
            cache_index, (cache, positions) = cache.index, advance(cache, real)
            layer_mask = cache.key_mask
        x = self.input(ids, token_type_ids, positions=positions)  # (B, L, D)
        if cache is not None and attention_mask is not None:  # the attention NaNs rows of a bad mask without one
            x = nan_rows_of_bad_mask(x, attention_mask)
        kv = None if cache is None else (cache.k, cache.v)
        x, kv, states = self._walk(constrain(x, BATCH_ACTIVATION), layer_mask, positions, cache_index, kv, collect)
        hidden = self.final_norm(x) if cfg.final_norm else x
        return hidden, None if cache is None else cache._replace(k=kv[0], v=kv[1]), states

    def _walk(
        self, x: jax.Array, mask: jax.Array | None, positions: jax.Array | None, cache_index: jax.Array | int,
        kv: tuple[Any, Any] | None, collect: bool,
    ) -> tuple[jax.Array, tuple[Any, Any] | None, jax.Array | None]:  # fmt: skip
        """The one loop over the layers: x through every block, each with its kind and its slice of the cache.

        Returns (x, the caches written (as `kv` was laid out) or None, (n_layers + 1, B, L, D) states or None).
        """
        kinds = layer_kinds(self.config)

        def layer(h: jax.Array, block: TransformerBlock, kind: LayerKind, layer_kv: tuple | None) -> tuple:
            out = block(h, mask, positions=positions, kind=kind, cache=layer_kv, cache_index=cache_index)
            h, layer_kv = (out, None) if layer_kv is None else out
            h = constrain(h, BATCH_ACTIVATION)
            return h, (layer_kv, h if collect else None)

        step = nnx.remat(layer) if self.flax_config.remat else layer
        first = x
        if self.flax_config.scan_layers:  # lax.scan itself caps the unroll at the loop length
            axes = dict(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0), unroll=self.flax_config.scan_unroll)
            x, (kv, states) = nnx.scan(step, transform_metadata=_LAYER_AXIS, **axes)(x, self.blocks, kinds, kv)
        else:
            outs = []
            for n, block in enumerate(self.blocks):
                layer_kv = None if kv is None else (kv[0][n], kv[1][n])
                x, out = step(x, block, jax.tree.map(lambda a, n=n: a[n], kinds), layer_kv)
                outs.append(out)
            kv = None if kv is None else tuple(zip(*(out[0] for out in outs), strict=True))
            states = jnp.stack([out[1] for out in outs]) if collect else None
        if collect:
            states = jnp.concatenate([first[None], states], axis=0)
        return x, kv, states
