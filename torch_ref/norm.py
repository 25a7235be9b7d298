"""Normalisation layers in plain torch: LayerNorm is torch.nn.LayerNorm itself; RMSNorm written out."""

import torch
from torch import nn

from torch_ref.config import TransformerConfig

LayerNorm = nn.LayerNorm


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, statistics in float32 (Llama's LlamaRMSNorm)."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(config: TransformerConfig) -> nn.Module:
    """The config's norm over D: LayerNorm (bias if `norm_bias`) or RMSNorm, epsilon `norm_eps`."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.norm_bias)
