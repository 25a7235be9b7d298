"""The N-layer encoder of lesson 08's exercise, driven by a TransformerConfig (or its dict)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from flax_impl.attention import check_attention_mask
from flax_impl.block import TransformerBlock
from flax_impl.config import FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.norm import make_norm
from flax_impl.pipeline import TransformerInput
from flax_impl.sharding import BATCH_ACTIVATION, constrain, parallel_linear


class KVCache(NamedTuple):
    """The decoding state of a causal Transformer (a pytree; `Transformer.prefill` builds it).

    Slots are the cache's time axis: a left-padded prompt fills slots 0 .. P - 1, each decoded token the next one.
    Positions are per row: a row's first real token is position 0 (transformers' `cumsum(mask) - 1`), so a
    left-padded row and the same prompt alone see the same positions.

    Attributes:
        k: n_layers arrays (B, K, S, H): keys after RoPE, only the K kv heads (grouped-query attention stores no
            copy). One array per layer, so that a decode step updates each in place.
        v: n_layers arrays (B, K, S, H): values.
        key_mask: (B, S) bool, True = a real token sits at that slot (padding and unwritten slots are False).
        index: int32 scalar, the next slot to write.
        next_position: (B,) int32, the position of each row's next token.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    key_mask: jax.Array
    index: jax.Array
    next_position: jax.Array


def _stacked_blocks(config: TransformerConfig, flax_config: FlaxConfig, rngs: nnx.Rngs) -> TransformerBlock:
    """n_layers blocks as one TransformerBlock whose every parameter (and rng stream) has a leading layer axis."""

    @nnx.split_rngs(splits=config.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})  # layer axis: unsharded
    def make(rngs: nnx.Rngs) -> TransformerBlock:
        return TransformerBlock(config, flax_config=flax_config, rngs=rngs)

    return make(rngs)


class Transformer(nnx.Module):
    """ids (B, L) -> hidden states (B, L, D): `input` -> `blocks` x n_layers -> `final_norm` (if configured).

    With `flax_config.scan_layers` (default) `blocks` is one TransformerBlock with parameters stacked on a leading
    (n_layers,) axis, applied with `nnx.scan`: compile time stays flat in depth (`flax_config.scan_unroll` layers per
    loop iteration; n_layers unrolls the loop fully, compile time growing with depth). Otherwise
    `blocks` is an `nnx.List` of blocks, unrolled by jit. `flax_config.remat` rematerialises each block in the
    backward pass.
    `attention_mask` takes the forms documented in `flax_impl.attention`. `logits(h)` is the tied LM head.
    Parameters carry sharding annotations (flax_impl.sharding; the stacked layer axis is never sharded) and,
    under a mesh, the (B, L, D) activations between blocks are split on `data`: see flax_impl.distributed.

    Example:
        >>> cfg = TransformerConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=2)
        >>> model = Transformer(cfg, rngs=nnx.Rngs(0)); model.eval()
        >>> model(jnp.ones((2, 5), jnp.int32)).shape
        (2, 5, 32)
    """

    def __init__(
        self,
        config: TransformerConfig | dict[str, Any],
        *,
        flax_config: FlaxConfig | None = None,
        rngs: nnx.Rngs,
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
        self, ids: jax.Array, attention_mask: jax.Array | None = None, *, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        x = self._input(ids, attention_mask, token_type_ids)  # (B, L, D)
        if self.flax_config.scan_layers:
            x = self._scan_blocks(x, attention_mask)
        else:
            for block in self.blocks:
                x = self._apply_block(block, x, attention_mask)
        if self.config.final_norm:
            x = self.final_norm(x)
        return x

    def hidden_states(
        self, ids: jax.Array, attention_mask: jax.Array | None = None, *, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """Every layer's output, for locating where two implementations part ways.

        Args:
            ids: (B, L) int token ids.
            attention_mask: as for `__call__`.
            token_type_ids: (B, L) ints below `type_vocab_size`, or None (zeros).
        Returns:
            (n_layers + 1, B, L, D): the input of block 1, then the output of each block (before `final_norm`).
        """
        x = self._input(ids, attention_mask, token_type_ids)
        if self.flax_config.scan_layers:
            scan = nnx.scan(
                lambda h, block, mask: (_scan_step(h, block, mask),) * 2,
                in_axes=(nnx.Carry, 0, None),
                out_axes=(nnx.Carry, 0),
                transform_metadata={nnx.PARTITION_NAME: None},
            )
            _, outs = scan(x, self.blocks, attention_mask)
            return jnp.concatenate([x[None], outs], axis=0)
        outs = [x]
        for block in self.blocks:
            outs.append(_call_block(block, outs[-1], attention_mask))
        return jnp.stack(outs)

    def prefill(
        self, ids: jax.Array, attention_mask: jax.Array | None, cache_len: int
    ) -> tuple[jax.Array, KVCache]:
        """The hidden states of a (left-padded) prompt, and the cache that continues it.

        Args:
            ids: (B, P) token ids, P <= cache_len.
            attention_mask: (B, P), 1 = real token (padding on the left: the last slot is every row's last
                token), or None (every token real).
            cache_len: S, the slots of the cache (P plus the tokens to decode).
        Returns:
            (hidden (B, P, D) after `final_norm`, the KVCache with slots 0 .. P - 1 filled, index = P).
        Raises:
            ValueError: a non-causal model, a mask not (B, P), cache_len < P.
        """
        B, P = self._check_decoding(ids, attention_mask)
        if not isinstance(cache_len, int) or cache_len < P:
            raise ValueError(f"cache_len={cache_len!r} must be an int >= the prompt length {P}")
        mask = jnp.ones((B, P), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)  # (B, P): pads get 0, as transformers
        x = self._input(ids, mask, None, positions)  # (B, P, D)

        def layer(h: jax.Array, block: TransformerBlock) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            return block.prefill(h, mask, positions, cache_len)

        x, k, v = self._over_layers(layer, x)  # k, v: n_layers arrays (B, K, S, H)
        key_mask = jnp.zeros((B, cache_len), bool).at[:, :P].set(mask.astype(bool))
        cache = KVCache(k, v, key_mask, jnp.asarray(P, jnp.int32), jnp.sum(mask, axis=1, dtype=jnp.int32))
        return self._final(x), cache

    def decode(
        self, ids: jax.Array, cache: KVCache, *, layers: tuple[TransformerBlock, ...] | None = None
    ) -> tuple[jax.Array, KVCache]:
        """The hidden states of L new tokens per row (every one real) attending over the cache.

        Args:
            ids: (B, L) token ids, written at slots cache.index .. cache.index + L - 1 (the caller keeps
                index + L <= S: under jit a write past the end is clamped by `dynamic_update_slice`).
            cache: from `prefill` or a previous `decode`.
            layers: the blocks as separate modules, from `self.layers()`: a decode loop takes them once, outside
                the loop, so that no step copies a layer's weights out of the stacked ones. None: `self.layers()`.
        Returns:
            (hidden (B, L, D) after `final_norm`, the updated cache).
        """
        B, L = self._check_decoding(ids, None)
        layers = self.layers() if layers is None else layers
        positions = cache.next_position[:, None] + jnp.arange(L, dtype=jnp.int32)  # (B, L)
        key_mask = jax.lax.dynamic_update_slice(cache.key_mask, jnp.ones((B, L), bool), (0, cache.index))
        x = self._input(ids, None, None, positions)  # (B, L, D)
        ks, vs = [], []
        for block, k, v in zip(layers, cache.k, cache.v, strict=True):  # unrolled: each layer's cache in place
            x, (k, v) = block.decode(x, (k, v), cache.index, key_mask, positions)
            ks.append(k)
            vs.append(v)
        return self._final(x), KVCache(tuple(ks), tuple(vs), key_mask, cache.index + L, cache.next_position + L)

    def layers(self) -> tuple[TransformerBlock, ...]:
        """The n_layers blocks as separate modules (slices of the stacked parameters when layers are scanned)."""
        if not self.flax_config.scan_layers:
            return tuple(self.blocks)
        graphdef, state = nnx.split(self.blocks)  # every leaf with a leading (n_layers,) axis
        return tuple(
            nnx.merge(graphdef, jax.tree.map(lambda a, n=n: a[n], state)) for n in range(self.config.n_layers)
        )

    def _check_decoding(self, ids: jax.Array, mask: jax.Array | None) -> tuple[int, int]:
        if not self.config.causal:
            raise ValueError("prefill/decode need a causal model (config.causal=True): an encoder sees every token")
        if jnp.ndim(ids) != 2:
            raise ValueError(f"ids must have shape (B, L), got {jnp.shape(ids)}")
        if mask is not None and jnp.shape(mask) != jnp.shape(ids):
            raise ValueError(f"attention_mask must be (B, P) = {jnp.shape(ids)} for a prompt, got {jnp.shape(mask)}")
        return jnp.shape(ids)

    def _over_layers(self, layer: Callable, x: jax.Array) -> tuple[jax.Array, tuple, tuple]:
        """Run `layer(h, block) -> (h, (k, v))` over the blocks; returns h and each layer's k and v as tuples."""
        if not self.flax_config.scan_layers:
            ks, vs = [], []
            for block in self.blocks:
                x, (k, v) = layer(x, block)
                ks.append(k)
                vs.append(v)
            return x, tuple(ks), tuple(vs)
        graphdef, state = nnx.split(self.blocks)  # every leaf with a leading (n_layers,) axis

        def step(h: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, tuple]:
            return layer(h, nnx.merge(graphdef, layer_state))

        x, (k, v) = jax.lax.scan(step, x, state, unroll=self.flax_config.scan_unroll)  # (n_layers, B, K, S, H)
        n = self.config.n_layers
        return x, tuple(k[i] for i in range(n)), tuple(v[i] for i in range(n))

    def _final(self, x: jax.Array) -> jax.Array:
        return self.final_norm(x) if self.config.final_norm else x

    def _input(
        self,
        ids: jax.Array,
        attention_mask: jax.Array | None,
        token_type_ids: jax.Array | None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        if jnp.ndim(ids) != 2:
            raise ValueError(f"ids must have shape (B, L), got {jnp.shape(ids)}")
        B, L = jnp.shape(ids)
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, self.config.n_heads, L, L)
        x = self.input(ids, token_type_ids, positions=positions)  # (B, L, D)
        return constrain(x, BATCH_ACTIVATION)  # split on B under a mesh

    def _apply_block(self, block: TransformerBlock, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        if self.flax_config.remat:
            return nnx.remat(_call_block)(block, x, mask)
        return _call_block(block, x, mask)

    def _scan_blocks(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        step = nnx.remat(_scan_step) if self.flax_config.remat else _scan_step
        layer_axis = {nnx.PARTITION_NAME: None}  # the stacked layer axis is unsharded
        scan = nnx.scan(  # lax.scan itself caps unroll at the loop length
            step,
            in_axes=(nnx.Carry, 0, None),
            out_axes=nnx.Carry,
            transform_metadata=layer_axis,
            unroll=self.flax_config.scan_unroll,
        )
        return scan(x, self.blocks, attention_mask)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head: (B, L, D) -> (B, L, V) logits in the compute dtype: hidden @ input.embed.weight.T when tied,
        else the `lm_head` Linear (D -> V, bias if `lm_head_bias`)."""
        if self.config.lm_head == "untied":
            return self.lm_head(hidden)
        return self.input.embed.attend(hidden)


def _call_block(block: TransformerBlock, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    return constrain(block(x, mask), BATCH_ACTIVATION)


def _scan_step(x: jax.Array, block: TransformerBlock, mask: jax.Array | None) -> jax.Array:
    return constrain(block(x, mask), BATCH_ACTIVATION)
