"""Key renames between PyTorch's own layers and ours: nn.TransformerEncoderLayer <-> TransformerBlock.

The values are kept as they are; only the names change (the layouts already agree: both use torch's `in_proj`
packing and nn.Linear's (out, in) weights once through `flax_impl.interop`).
"""

from __future__ import annotations

from typing import Any

TORCH_ENCODER_LAYER_KEYS = {
    "self_attn.": "attn.",
    "linear1.": "ff.0.",
    "linear2.": "ff.3.",
    "norm1.": "ln1.",
    "norm2.": "ln2.",
}


def from_torch_encoder_layer(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Rename an nn.TransformerEncoderLayer state dict to TransformerBlock keys.

    self_attn -> attn, linear1 -> ff.0, linear2 -> ff.3, norm1 -> ln1, norm2 -> ln2; the values are kept as they
    are. Set the config's activation, norm_first and norm_eps to the layer's.

    Args:
        state_dict: the layer's state dict.
        prefix: stripped from every key first (e.g. "layers.0." for one layer of an nn.TransformerEncoder).

    Returns:
        The same values under torch_ref.TransformerBlock keys, ready for `load_torch_state_dict`.

    Raises:
        ValueError: a key outside those five groups, or without `prefix`.
    """
    stripped = {(k[len(prefix) :] if k.startswith(prefix) else "\0" + k): v for k, v in state_dict.items()}
    return _renamed(stripped, TORCH_ENCODER_LAYER_KEYS, "nn.TransformerEncoderLayer")


def to_torch_encoder_layer(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `from_torch_encoder_layer`: TransformerBlock keys -> nn.TransformerEncoderLayer keys.

    Args:
        state_dict: torch-keyed TransformerBlock weights, e.g. `to_numpy_state_dict(block)`.

    Returns:
        The same values under nn.TransformerEncoderLayer keys.

    Raises:
        ValueError: a key outside attn, ff.0, ff.3, ln1 and ln2.
    """
    return _renamed(state_dict, {ours: theirs for theirs, ours in TORCH_ENCODER_LAYER_KEYS.items()}, "TransformerBlock")


def _renamed(state_dict: dict[str, Any], table: dict[str, str], what: str) -> dict[str, Any]:
    """Each key's prefix renamed by `table`; a key no entry matches raises ValueError naming it."""
    out = {}
    for key, value in state_dict.items():
        new = next((new + key[len(old) :] for old, new in table.items() if key.startswith(old)), None)
        if new is None:
            raise ValueError(f"unexpected {what} key {key.lstrip(chr(0))!r}")
        out[new] = value
    return out
