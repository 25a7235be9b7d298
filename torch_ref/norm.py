"""Normalisation layers in plain torch: LayerNorm is torch.nn.LayerNorm itself.

Axes: D model width.
"""

from torch import nn

from torch_ref.config import TransformerConfig

LayerNorm = nn.LayerNorm


def layer_norm(config: TransformerConfig) -> nn.LayerNorm:
    """LayerNorm over D with the config's epsilon and bias switch."""
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
