"""Embedding twin: torch.nn.Embedding (N(0, 1) init, padding_idx row zero and frozen), plus tied logits."""

import torch
from torch import nn


class Embed(nn.Embedding):
    """nn.Embedding with the Flax twin's name and its `attend` (tied output logits).

    Args and Raises: nn.Embedding's (num_embeddings V, embedding_dim D, padding_idx, ...).
    """

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output logits: x @ weight.T.

        Args:
            x: (..., D), usually (B, L, D).

        Returns:
            (..., V).
        """
        return x @ self.weight.T
