"""Lesson 11's input pipeline in plain torch: ids -> embedding -> + position -> optional LayerNorm -> dropout."""

import math

from torch import nn

from torch_ref.config import EncoderConfig
from torch_ref.embedding import Embed
from torch_ref.positions import LearnedPositions, sinusoidal_table


class TransformerInput(nn.Module):
    """ids (B, L) -> (B, L, D). Submodules: `embed`, `pos` (learned only), `norm` (input_norm only)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embed = Embed(config.vocab_size, config.d_model, padding_idx=config.padding_idx)
        if config.position == "learned":
            self.pos = LearnedPositions(config.max_len, config.d_model)
        if config.input_norm:
            self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids):
        cfg = self.config
        L = ids.shape[1]
        pos = None
        if cfg.position == "sinusoidal":
            pos = sinusoidal_table(L, cfg.d_model)
        elif cfg.position == "learned":
            pos = self.pos(L)
        x = self.embed(ids)  # (B, L, D)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.d_model)
        if pos is not None:
            x = x + pos
        if cfg.input_norm:
            x = self.norm(x)
        return self.dropout(x)
