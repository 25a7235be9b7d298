"""Normalisation layers in plain torch: LayerNorm is torch.nn.LayerNorm (its arguments checked as the Flax
twin's); RMSNorm written out."""

import torch
from torch import nn

from flax_impl.validation import check_bool, check_float, check_int
from torch_ref.config import TransformerConfig


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis; a width, eps or bias switch of the wrong type or range raises as the Flax
    twin (TypeError / ValueError), not later inside torch."""

    def __init__(self, num_features: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__(
            check_int("num_features", num_features, low=1),
            eps=check_float("eps", eps, low=0.0, low_open=True),
            elementwise_affine=check_bool("elementwise_affine", elementwise_affine),
            bias=check_bool("bias", bias),
        )


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, statistics in float32 (Llama's LlamaRMSNorm)."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        num_features = check_int("num_features", num_features, low=1)
        self.eps = check_float("eps", eps, low=0.0, low_open=True)
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
