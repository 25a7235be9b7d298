"""Normalisation layers in plain torch: LayerNorm is torch.nn.LayerNorm (its arguments checked as the Flax
twin's); RMSNorm written out. Both take an `offset` c and scale by (c + weight), weight starting at 1 - c
(Gemma's RMSNorm x * (1 + w): c = 1)."""

import torch
import torch.nn.functional as F
from torch import nn

from flax_impl.validation import check_bool, check_float, check_int
from torch_ref.config import TransformerConfig


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis; a width, eps, offset or bias switch of the wrong type or range raises as the
    Flax twin (TypeError / ValueError), not later inside torch. With an offset c: F.layer_norm with weight + c
    (Nemotron's LayerNorm1P for c = 1)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        offset: float = 0.0,
    ):
        super().__init__(
            check_int("num_features", num_features, low=1),
            eps=check_float("eps", eps, low=0.0, low_open=True),
            elementwise_affine=check_bool("elementwise_affine", elementwise_affine),
            bias=check_bool("bias", bias),
        )
        self.offset = check_float("offset", offset)
        if self.offset and self.weight is not None:
            nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x):
        if not self.offset:
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, self.weight + self.offset, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last axis, in float32, rounded to x's dtype once at
    the end: Gemma's GemmaRMSNorm for offset 1, Llama's LlamaRMSNorm for offset 0 (which rounds before the weight:
    the same below float32)."""

    def __init__(self, num_features: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        num_features = check_int("num_features", num_features, low=1)
        self.eps = check_float("eps", eps, low=0.0, low_open=True)
        self.offset = check_float("offset", offset)
        self.weight = nn.Parameter(torch.full((num_features,), 1.0 - self.offset))

    def forward(self, x):
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (y * (self.offset + w if self.offset else w)).to(x.dtype)


def make_norm(config: TransformerConfig, num_features: int | None = None) -> nn.Module:
    """The config's norm over `num_features` (default D): LayerNorm (bias if `norm_bias`) or RMSNorm, epsilon
    `norm_eps`, offset `norm_offset`."""
    features = config.d_model if num_features is None else num_features
    if config.norm == "rmsnorm":
        return RMSNorm(features, eps=config.norm_eps, offset=config.norm_offset)
    return LayerNorm(features, eps=config.norm_eps, bias=config.norm_bias, offset=config.norm_offset)
