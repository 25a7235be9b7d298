"""Masks and layer kinds in plain torch, the twin of flax_impl/masks.py: the mask rules (causal, sliding window,
ALiBi) written once, and each layer's kind (its window, and which RoPE it rotates with).

Masks as in flax_impl.masks: (B, S) 1/True = real token; bool (B|1, N|1, L, S) True = may attend; float
(B|1, N|1, L, S) added to the scores (-inf = masked out).
"""

import torch

from flax_impl.attention_config import sliding_layers
from torch_ref.config import TransformerConfig


def from_torch_mha_mask(mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's bool mask (True = masked out) -> ours (True = may attend)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"from_torch_mha_mask converts bool masks only, got dtype {mask.dtype}")
    return ~mask


def layer_kinds(config: TransformerConfig) -> list[dict]:
    """Every layer's kind (see flax_impl.masks.LayerKind), one dict per layer: {"window": W or None, "rope":
    "global" (the config's rope_type), "local" (plain RoPE of rope_local_base) or None (no rotation)}."""
    kinds = []
    for n, sliding in enumerate(sliding_layers(config)):
        rope = "local" if sliding and config.rope_local_base is not None else "global"
        if config.position != "rope" or (config.rope_layers is not None and not config.rope_layers[n]):
            rope = None
        kinds.append({"window": config.sliding_window if sliding else None, "rope": rope})
    return kinds


def mask_rules(attention_mask, q_slots: torch.Tensor, k_len: int, *, causal: bool, window=None, slopes=None):
    """(allowed bool broadcastable to (B, N, L, S) or None, bias float32 or None): queries at slots q_slots (L,),
    keys at 0 .. S - 1; causal j <= i, a window also i - j < W; ALiBi -m (i - j) (causal) or -m |i - j|. The mask
    forms and rules of flax_impl.attention.mask_rules."""
    allowed, bias = None, None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.dtype != torch.bool and ((attention_mask != 0) & (attention_mask != 1)).any():
                values = attention_mask.unique()[:5].tolist()
                raise ValueError(f"a (B, S) attention_mask holds 0/1 only, got values {values}")
            allowed = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:
            bias = attention_mask.float()
            allowed = ~torch.isneginf(bias)
            bias = torch.where(allowed, bias, torch.zeros(()))
    i = q_slots.unsqueeze(1)  # (L, 1)
    j = torch.arange(k_len).unsqueeze(0)  # (1, S)
    if causal:
        rule = j <= i
        if window is not None:  # the last `window` slots
            rule = rule & (i - j < window)
        rule = rule[None, None]  # (1, 1, L, S)
        allowed = rule if allowed is None else allowed & rule
    if slopes is not None:
        dist = (i - j).float()
        dist = dist.clamp(min=0) if causal else dist.abs()
        alibi = -slopes[None, :, None, None] * dist  # (1, N, L, S)
        bias = alibi if bias is None else alibi + bias
    return allowed, bias
