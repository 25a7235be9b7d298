"""The input pipeline of lesson 11: ids -> embedding -> + position -> optional LayerNorm -> dropout, as a module
(`TransformerInput`, batched ids) and as one function from a string (`encode_text`, the lesson's exercise).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_impl.config import POSITIONS, FlaxConfig, TransformerConfig, as_config, as_flax_config
from flax_impl.dropout import Dropout
from flax_impl.embedding import Embed
from flax_impl.norm import make_norm
from flax_impl.positions import LearnedPositions, scheme, sinusoidal_table
from flax_impl.tokenizer import encode_checked
from flax_impl.validation import check_bool, check_choice, check_float


class TransformerInput(nnx.Module):
    """ids (B, L) -> (B, L, D), the input of the first block.

    embed(ids) (x sqrt(D) if `embed_scale`, x `embedding_multiplier`) + token type (BERT's, if `type_vocab_size`)
    + position (sinusoidal table or learned `pos`; nothing for rope, alibi and none, whose position enters inside
    attention) -> `norm` (if `input_norm`) -> dropout. Submodules (checkpoint keys): `embed`, `token_type`, `pos`
    (learned only), `norm` (input_norm only).

    Args:
        config: the architecture (vocab_size, d_model, padding_idx, position, max_len, embed_scale,
            embedding_multiplier, input_norm, type_vocab_size, dropout, norm, norm_eps, norm_offset, norm_bias).
        flax_config: dtype and param_dtype; None: `FlaxConfig()`.
        rngs: initialises the embedding and learned positions; its `dropout` stream draws the masks.

    Raises:
        ValueError: from `Embed` (padding_idx outside the vocabulary).

    Example:
        >>> cfg = TransformerConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=1, dropout=0.0)
        >>> TransformerInput(cfg, rngs=nnx.Rngs(0))(jnp.ones((2, 5), jnp.int32)).shape
        (2, 5, 32)
    """

    def __init__(self, config: TransformerConfig, *, flax_config: FlaxConfig | None = None, rngs: nnx.Rngs):
        config, flax_config = as_config(config), as_flax_config(flax_config)
        self.config, self.flax_config = config, flax_config
        self.embed = Embed(
            config.vocab_size,
            config.d_model,
            padding_idx=config.padding_idx,
            param_dtype=jnp.dtype(flax_config.param_dtype),
            rngs=rngs,
        )
        if scheme(config.position).at_input == "param":
            self.pos = LearnedPositions(
                config.max_len, config.d_model, param_dtype=jnp.dtype(flax_config.param_dtype), rngs=rngs
            )
        if config.type_vocab_size:  # BERT's segment embeddings
            self.token_type = Embed(
                config.type_vocab_size, config.d_model, param_dtype=jnp.dtype(flax_config.param_dtype), rngs=rngs
            )
        if config.input_norm:
            self.norm = make_norm(config, flax_config)
        self.dropout = Dropout(config.dropout, rngs=rngs)

    def __call__(
        self, ids: jax.Array, token_type_ids: jax.Array | None = None, *, positions: jax.Array | None = None
    ) -> jax.Array:
        """ids (B, L) -> (B, L, D) in the FlaxConfig's dtype.

        Args:
            ids: (B, L) integer token ids.
            token_type_ids: (B, L) integer token types below `type_vocab_size`, or None (all type 0).
            positions: (B, L) integer position of each token (left-padded prompts, cached decoding), or None
                (0 .. L - 1 in every row). The sinusoidal and learned rows are gathered from the first `max_len`;
                concrete positions outside [0, max_len) raise IndexError; traced ones outside give NaN rows
                (a gather with `mode="fill"`), never another position's row.

        Returns:
            (B, L, D).

        Raises:
            ValueError: ids not 2-D; token_type_ids of another shape, or given with type_vocab_size=0.
            IndexError: L > max_len with learned positions, or a concrete id outside [0, V).
            TypeError: non-integer ids.
        """
        cfg = self.config
        if jnp.ndim(ids) != 2:
            raise ValueError(f"ids must have shape (B, L), got {jnp.shape(ids)}")
        if token_type_ids is not None:
            if not cfg.type_vocab_size:
                raise ValueError("token_type_ids given, but the config has type_vocab_size=0 (no token types)")
            if jnp.shape(token_type_ids) != jnp.shape(ids):
                raise ValueError(f"token_type_ids shape {jnp.shape(token_type_ids)} != ids shape {jnp.shape(ids)}")
        L = jnp.shape(ids)[1]
        at_input = scheme(cfg.position).at_input
        pos = None  # (L, D) or (B, L, D): computed first so that L > max_len fails before any other work
        if positions is not None and at_input in ("table", "param"):
            pos = self._rows(positions, jnp.shape(ids))
        elif at_input == "table":
            pos = sinusoidal_table(L, cfg.d_model)
        elif at_input == "param":
            pos = self.pos(L)
        x = self.embed(ids).astype(jnp.dtype(self.flax_config.dtype))  # (B, L, D)
        if cfg.embed_scale:  # sqrt(D) rounded to x's dtype first, as Gemma's torch.tensor(D**0.5).to(dtype)
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        if cfg.embedding_multiplier != 1:  # as torch's x * a Python float: in float32, rounded once (Granite)
            x = (x.astype(jnp.float32) * cfg.embedding_multiplier).astype(x.dtype)
        if cfg.type_vocab_size:  # BERT's order: word + token type, then + position
            types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
            x = x + self.token_type(types).astype(x.dtype)
        if pos is not None:
            x = x + (pos if pos.ndim == 3 else pos[None]).astype(x.dtype)
        if cfg.input_norm:
            x = self.norm(x)
        return self.dropout(x)

    def _rows(self, positions: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """The position rows (B, L, D) of a (B, L) table of positions."""
        cfg = self.config
        if jnp.shape(positions) != shape:
            raise ValueError(f"positions shape {jnp.shape(positions)} != ids shape {shape}")
        if not isinstance(positions, jax.core.Tracer):
            p = np.asarray(positions)
            if p.size and (p.min() < 0 or p.max() >= cfg.max_len):
                raise IndexError(f"positions must lie in [0, max_len={cfg.max_len}), got {p.min()}..{p.max()}")
        table = sinusoidal_table(cfg.max_len, cfg.d_model) if scheme(cfg.position).at_input == "table" else None
        return jnp.take(self.pos.weight[...] if table is None else table, positions, axis=0, mode="fill")  # (B, L, D)


def _embedding_matrix(embedding: Any) -> jax.Array:
    """The (V, D) matrix of an Embed / nnx.Embed module or a 2-D array."""
    if isinstance(embedding, Embed):
        return embedding.weight[...]
    if isinstance(embedding, nnx.Embed):
        return embedding.embedding[...]
    if isinstance(embedding, nnx.Module) or not hasattr(embedding, "shape") or len(embedding.shape) != 2:
        raise TypeError(
            f"embedding must be a (V, D) array or an Embed module, got {type(embedding).__name__}"
            f" of shape {getattr(embedding, 'shape', None)}"
        )
    return jnp.asarray(embedding)


def encode_text(
    text: str,
    tokenizer: Any,
    embedding: Any,
    *,
    position: str = "sinusoidal",
    table: Any = None,
    embed_scale: bool = False,
    input_norm: bool = False,
    eps: float = 1e-5,
) -> jax.Array:
    """One string -> the (L, D) input of the first Transformer block (lesson 11's exercise).

    1. tokenize;
    2. look up the embedding: E[ids], x sqrt(D) if `embed_scale`;
    3. add the position: "sinusoidal" adds `sinusoidal_table(L, D)` (Vaswani layout, sin on even dims);
       "learned" adds rows 0..L-1 of `table`; "rope", "alibi" and "none" leave the embeddings unchanged (their
       position enters inside attention, or nowhere);
    4. if `input_norm`: LayerNorm over D without affine parameters (gamma = 1, beta = 0), epsilon `eps`,
       computed in float32.

    Every error is raised before any lookup.

    Args:
        text: the string to encode.
        tokenizer: a `ByteTokenizer`, an HF `tokenizers.Tokenizer`, an object with `encode(str) -> list[int]`, or a
            callable str -> list[int] (see `as_tokenizer`).
        embedding: E, a (V, D) array, an `Embed` or an `nnx.Embed`.
        position: "sinusoidal", "learned", "rope", "alibi" or "none".
        table: for "learned" only: a (max_len, D) array or `LearnedPositions`.
        embed_scale: multiply E[ids] by sqrt(D).
        input_norm: apply the affine-free LayerNorm.
        eps: the LayerNorm epsilon, > 0.

    Returns:
        (L, D) in E's dtype. Empty text (or one that tokenizes to no ids) gives (0, D): there is no position to
        encode, and the shapes stay consistent with L = 0.

    Raises:
        ValueError: an unknown `position`; `table` missing for "learned" or given for another scheme; `table` not
            (max_len, D); `eps` not a finite number > 0; the tokenizer returns a negative id.
        TypeError: `embedding` is not a (V, D) array or an embedding module; `text` is not a str; `tokenizer`
            is not usable, or returns something other than a flat list of integer ids; `position`, `eps`,
            `embed_scale` or `input_norm` of the wrong type.
        IndexError: a token id >= V (naming the token, its position and V); L > max_len of `table`.

    Example:
        >>> from flax_impl.tokenizer import ByteTokenizer
        >>> E = jax.random.normal(jax.random.key(0), (260, 16))
        >>> encode_text("hello", ByteTokenizer(), E, position="sinusoidal").shape
        (5, 16)
    """
    position, eps = check_choice("position", position, POSITIONS), check_float("eps", eps, low=0.0, low_open=True)
    embed_scale, input_norm = check_bool("embed_scale", embed_scale), check_bool("input_norm", input_norm)
    at_input = scheme(position).at_input
    if (at_input == "param") != (table is not None):
        raise ValueError(
            "position='learned' needs table=<(max_len, D) array or LearnedPositions>"
            if table is None
            else f"table= is only used with position='learned', got position={position!r}"
        )
    weight = _embedding_matrix(embedding)  # (V, D)
    V, D = weight.shape
    if isinstance(table, LearnedPositions):
        table = table.weight[...]
    if table is not None and (jnp.ndim(table) != 2 or jnp.shape(table)[1] != D):
        raise ValueError(f"table must have shape (max_len, D={D}), got {jnp.shape(table)}")
    ids = encode_checked(text, tokenizer, V)  # (L,) numpy, every id < V
    L = ids.shape[0]
    if table is not None and L > jnp.shape(table)[0]:
        raise IndexError(
            f"learned positions cover max_len={jnp.shape(table)[0]} positions; the text has L={L} tokens"
        )
    x = weight[jnp.asarray(ids, dtype=jnp.int32)]  # (L, D)
    if embed_scale:
        x = x * jnp.asarray(math.sqrt(D), x.dtype)
    if at_input == "table":
        x = x + sinusoidal_table(L, D).astype(x.dtype)
    elif at_input == "param":
        x = x + jnp.asarray(table)[:L].astype(x.dtype)
    if input_norm:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)  # (L, 1)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)  # (L, 1), biased as torch's LayerNorm
        x = ((xf - mean) * jax.lax.rsqrt(var + jnp.float32(eps))).astype(x.dtype)
    return x
