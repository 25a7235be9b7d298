"""Lesson 08's exercise in plain torch: N blocks in an nn.ModuleList, depth from the config."""

from torch import nn

from torch_ref.block import TransformerBlock
from torch_ref.config import TransformerConfig
from torch_ref.norm import layer_norm
from torch_ref.pipeline import TransformerInput


class TransformerEncoder(nn.Module):
    """ids (B, L) -> (B, L, D): `input` -> `blocks` (nn.ModuleList) -> `final_norm` (if configured).

    Checkpoint keys: input.embed.weight, input.pos.weight, input.norm.*, blocks.{i}.{attn,ln1,ln2,ff}.*,
    final_norm.*.
    """

    def __init__(self, config):
        super().__init__()
        if isinstance(config, dict):
            config = TransformerConfig.from_dict(config)
        self.config = config
        self.input = TransformerInput(config)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        if config.final_norm:
            self.final_norm = layer_norm(config)

    def forward(self, ids, attention_mask=None):
        x = self.input(ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        if self.config.final_norm:
            x = self.final_norm(x)
        return x

    def logits(self, hidden):
        """Tied LM head: (B, L, D) -> (B, L, V)."""
        return self.input.embed.attend(hidden)
