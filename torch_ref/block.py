"""Lesson 08's Transformer block in plain torch: pre-LN (default) or post-LN.

Axes: B batch, L length, D model width, F feed-forward width.
"""

from torch import nn

from torch_ref.attention import MultiHeadAttention
from torch_ref.config import TransformerConfig
from torch_ref.norm import layer_norm

ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": lambda: nn.ReLU()}


class TransformerBlock(nn.Module):
    """x (B, L, D) -> (B, L, D). Pre-LN: x + attn(ln1(x)), x + ff(ln2(x)); post-LN: ln1(x + attn(x)),
    ln2(x + ff(x)). ff = Linear(D, F), activation, Dropout, Linear(F, D), Dropout."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        D, F = config.d_model, config.d_ff
        self.norm_first = config.norm_first
        self.attn = MultiHeadAttention(config)
        self.ln1 = layer_norm(config)
        self.ln2 = layer_norm(config)
        self.ff = nn.Sequential(
            nn.Linear(D, F, bias=config.bias),
            ACTIVATIONS[config.activation](),
            nn.Dropout(config.dropout),
            nn.Linear(F, D, bias=config.bias),
            nn.Dropout(config.dropout),
        )

    def forward(self, x, attention_mask=None, positions=None):
        if self.norm_first:
            x = x + self.attn(self.ln1(x), attention_mask, positions)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, attention_mask, positions))
        return self.ln2(x + self.ff(x))
