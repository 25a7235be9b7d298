"""Dropout twin: torch.nn.Dropout (inverted dropout, identity in eval), its arguments checked as the Flax twin's."""

from torch import nn

from flax_impl.validation import check_bool, check_float

__all__ = ["Dropout"]


class Dropout(nn.Dropout):
    """torch.nn.Dropout(p, inplace); `p` a number in [0, 1] and `inplace` a bool, else the Flax twin's errors
    (TypeError for a wrong type, ValueError for a rate out of range) instead of torch's."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__(check_float("p", p, low=0.0, high=1.0), check_bool("inplace", inplace))
