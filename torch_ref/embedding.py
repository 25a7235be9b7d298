"""Embedding twin: torch.nn.Embedding (N(0, 1) init, padding_idx row zero and frozen), plus tied logits."""

import torch
from torch import nn


class Embed(nn.Embedding):
    """nn.Embedding with the Flax twin's name and its `attend`: (..., D) -> (..., V) = x @ weight.T."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T
