"""Dropout twin: torch.nn.Dropout itself (inverted dropout, identity in eval)."""

from torch.nn import Dropout

__all__ = ["Dropout"]
