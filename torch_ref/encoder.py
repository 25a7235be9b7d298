"""Lesson 08's exercise in plain torch: N blocks in an nn.ModuleList, depth from the config."""

import torch
from torch import nn

from torch_ref.block import TransformerBlock
from torch_ref.config import as_config
from torch_ref.norm import make_norm
from torch_ref.pipeline import TransformerInput


class TransformerEncoder(nn.Module):
    """ids (B, L) -> (B, L, D): `input` -> `blocks` (nn.ModuleList) -> `final_norm` (if configured).

    Checkpoint keys: input.embed.weight, input.pos.weight, input.token_type.weight, input.norm.*,
    blocks.{i}.{attn,ln1,ln2,ff}.*, final_norm.*, lm_head.* (untied head).
    """

    def __init__(self, config):
        super().__init__()
        config = as_config(config)
        self.config = config
        self.input = TransformerInput(config)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        if config.final_norm:
            self.final_norm = make_norm(config)
        if config.lm_head == "untied":
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)

    def forward(self, ids, attention_mask=None, token_type_ids=None):
        x = self.hidden_states(ids, attention_mask, token_type_ids)[-1]
        if self.config.final_norm:
            x = self.final_norm(x)
        return x

    def hidden_states(self, ids, attention_mask=None, token_type_ids=None):
        """(n_layers + 1, B, L, D): the input of block 1, then each block's output (before final_norm)."""
        outs = [self.input(ids, token_type_ids)]
        for block in self.blocks:
            outs.append(block(outs[-1], attention_mask))
        return torch.stack(outs)

    def logits(self, hidden):
        """LM head: (B, L, D) -> (B, L, V): tied (hidden @ input.embed.weight.T) or the `lm_head` Linear."""
        if self.config.lm_head == "untied":
            return self.lm_head(hidden)
        return self.input.embed.attend(hidden)
