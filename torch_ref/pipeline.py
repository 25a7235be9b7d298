"""Lesson 11's input pipeline in plain torch: ids -> embedding -> + position -> optional LayerNorm -> dropout, as
a module (`TransformerInput`) and as one function from a string (`encode_text`)."""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flax_impl.config import POSITIONS
from flax_impl.validation import check_bool, check_choice, check_float
from torch_ref.config import TransformerConfig, as_config
from torch_ref.embedding import Embed
from torch_ref.norm import make_norm
from torch_ref.positions import LearnedPositions, sinusoidal_table
from torch_ref.tokenizer import encode_checked


class TransformerInput(nn.Module):
    """ids (B, L) [+ token_type_ids (B, L)] -> (B, L, D): embed(ids) (x sqrt(D) if `embed_scale`, x
    `embedding_multiplier`) + token type (type_vocab_size > 0) + position -> `norm` -> dropout.

    The twin of flax_impl.pipeline.TransformerInput. Submodules (checkpoint keys): `embed`, `pos` (learned only),
    `token_type` (type_vocab_size > 0), `norm` (input_norm only).

    Args:
        config: the architecture (vocab_size, d_model, padding_idx, position, max_len, embed_scale,
            embedding_multiplier, input_norm, type_vocab_size, dropout, norm, norm_eps, norm_offset, norm_bias).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config = as_config(config)
        self.config = config
        self.embed = Embed(config.vocab_size, config.d_model, padding_idx=config.padding_idx)
        if config.position == "learned":
            self.pos = LearnedPositions(config.max_len, config.d_model)
        if config.type_vocab_size:  # BERT's segment embeddings
            self.token_type = Embed(config.type_vocab_size, config.d_model)
        if config.input_norm:
            self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor, token_type_ids: torch.Tensor | None = None, positions=None) -> torch.Tensor:
        """ids (B, L) -> (B, L, D).

        Args:
            ids: (B, L) integer token ids.
            token_type_ids: (B, L) integer token types below type_vocab_size, or None (all 0).
            positions: (B, L) integer position of each token (left padding, cached decoding), or None (0 .. L-1).

        Returns:
            (B, L, D).

        Raises:
            IndexError: L > max_len with learned positions, or an id outside [0, V) (torch's own check).
        """
        cfg = self.config
        L = ids.shape[1]
        pos = None
        if cfg.position == "sinusoidal":
            pos = sinusoidal_table(L if positions is None else cfg.max_len, cfg.d_model)
        elif cfg.position == "learned":
            pos = self.pos(L if positions is None else cfg.max_len)
        if pos is not None and positions is not None:
            pos = pos[positions]  # (B, L, D)
        x = self.embed(ids)  # (B, L, D)
        if cfg.embed_scale:  # Gemma's rounding: sqrt(D) in x's dtype
            x = x * torch.tensor(math.sqrt(cfg.d_model)).to(x.dtype)
        if cfg.embedding_multiplier != 1:  # Granite
            x = x * cfg.embedding_multiplier
        if cfg.type_vocab_size:
            x = x + self.token_type(torch.zeros_like(ids) if token_type_ids is None else token_type_ids)
        if pos is not None:
            x = x + pos
        if cfg.input_norm:
            x = self.norm(x)
        return self.dropout(x)


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
) -> torch.Tensor:
    """One string -> (L, D): tokenize, E[ids] (x sqrt(D) if embed_scale), + sinusoidal table or learned `table`
    rows (nothing for rope / alibi / none), then LayerNorm without affine parameters if `input_norm`.

    The twin of flax_impl.pipeline.encode_text: same arguments, errors and empty-text result.

    Args:
        text: the string to encode.
        tokenizer: anything `as_tokenizer` accepts.
        embedding: E, a (V, D) tensor or an nn.Embedding.
        position: "sinusoidal", "learned", "rope", "alibi" or "none".
        table: for "learned" only: a (max_len, D) tensor or LearnedPositions.
        embed_scale: multiply E[ids] by sqrt(D).
        input_norm: apply the affine-free LayerNorm (in float32).
        eps: the LayerNorm epsilon, > 0.

    Returns:
        (L, D) in E's dtype; (0, D) for a text that tokenizes to no ids.

    Raises:
        ValueError: an unknown `position`; `table` missing for "learned" or given for another scheme; `table` not
            (max_len, D); `eps` not a finite number > 0; the tokenizer returns a negative id.
        TypeError: `embedding` is not a (V, D) tensor or an nn.Embedding; `text` is not a str; `tokenizer` is not
            usable, or returns something other than a flat list of integer ids.
        IndexError: a token id >= V (naming the token, its position and V); L > max_len of `table`.
    """
    position, eps = check_choice("position", position, POSITIONS), check_float("eps", eps, low=0.0, low_open=True)
    embed_scale, input_norm = check_bool("embed_scale", embed_scale), check_bool("input_norm", input_norm)
    if (position == "learned") != (table is not None):
        raise ValueError(
            "position='learned' needs table=<(max_len, D) tensor or LearnedPositions>"
            if table is None
            else f"table= is only used with position='learned', got position={position!r}"
        )
    weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"embedding must be a (V, D) tensor or an nn.Embedding, got {type(embedding).__name__}"
            f" of shape {tuple(getattr(weight, 'shape', ()))}"
        )
    V, D = weight.shape
    if isinstance(table, LearnedPositions):
        table = table.weight
    if table is not None and (table.dim() != 2 or table.shape[1] != D):
        raise ValueError(f"table must have shape (max_len, D={D}), got {tuple(table.shape)}")
    ids = torch.from_numpy(encode_checked(text, tokenizer, V))  # (L,) int64, every id < V
    L = ids.shape[0]
    if table is not None and L > table.shape[0]:
        raise IndexError(f"learned positions cover max_len={table.shape[0]} positions; the text has L={L} tokens")
    x = F.embedding(ids, weight)  # (L, D)
    if embed_scale:
        x = x * math.sqrt(D)
    if position == "sinusoidal":
        x = x + sinusoidal_table(L, D).to(x.dtype)
    elif position == "learned":
        x = x + table[:L].to(x.dtype)
    if input_norm:
        x = F.layer_norm(x.float(), (D,), eps=eps).to(x.dtype)
    return x
