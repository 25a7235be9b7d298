"""Embedding twin: torch.nn.Embedding (N(0, 1) init, padding_idx row zero and frozen), plus tied logits."""

import torch
from torch import nn

from flax_impl.validation import check_int


class Embed(nn.Embedding):
    """nn.Embedding with the Flax twin's name and its `attend` (tied output logits).

    Args: nn.Embedding's (num_embeddings V, embedding_dim D, padding_idx, ...). Raises as the Flax twin for a
    V, D or padding_idx of the wrong type or range (TypeError / ValueError), before nn.Embedding sees them.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, **kwargs):
        V = check_int("num_embeddings", num_embeddings, low=1)
        D = check_int("embedding_dim", embedding_dim, low=1)
        padding_idx = check_int("padding_idx", padding_idx, low=-V, high=V, none_ok=True)
        super().__init__(V, D, padding_idx=padding_idx, **kwargs)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output logits: x @ weight.T.

        Args:
            x: (..., D), usually (B, L, D).

        Returns:
            (..., V).
        """
        return x @ self.weight.T
