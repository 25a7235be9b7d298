"""The KV cache in plain torch, the twin of flax_impl/cache.py: allocated once by `init_cache`, written in place by
every call of a causal `Transformer` given `cache=`, read by every layer's attention.

Slots are the cache's time axis (a left-padded prompt fills slots 0 .. P - 1, each decoded token the next one);
positions are per row, a row's first real token at `position_offset` (transformers' cumsum(mask) - 1).
"""

from dataclasses import dataclass

import torch

from flax_impl.validation import check_int
from torch_ref.config import TransformerConfig


@dataclass
class KVCache:
    """k, v: n_layers tensors (B, K, S, H) (keys after RoPE, only the K kv heads; zero at every slot `key_mask`
    marks False); key_mask (B, S) bool; index: the next slot to write; next_position (B,) long."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    key_mask: torch.Tensor
    index: int
    next_position: torch.Tensor


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> KVCache:
    """An empty cache of `max_len` slots for `batch` rows (see flax_impl.cache.init_cache)."""
    if not config.causal:
        raise ValueError("a KV cache needs a causal model (config.causal=True): an encoder sees every token")
    batch, max_len = check_int("batch", batch, low=1), check_int("max_len", max_len, low=1)
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    return KVCache(
        [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
        [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
        torch.zeros(batch, max_len, dtype=torch.bool),
        0,
        torch.full((batch,), config.position_offset, dtype=torch.long),
    )


def advance(cache: KVCache, real: torch.Tensor) -> torch.Tensor:
    """Mark L new tokens at slots index .. index + L - 1 (real: (B, L) bool), in place; their positions (B, L):
    next_position + cumsum(real) - 1, padding at the row's previous position, clamped at 0."""
    steps = real.long().cumsum(dim=1)  # (B, L)
    positions = (cache.next_position[:, None] + steps - 1).clamp(min=0)
    L = real.shape[1]
    cache.key_mask[:, cache.index : cache.index + L] = real
    cache.index += L
    cache.next_position = cache.next_position + steps[:, -1]
    return positions


def write(k_cache: torch.Tensor, v_cache: torch.Tensor, k, v, real: torch.Tensor, index: int) -> None:
    """Write new keys and values (B, L, K, H) at slots index .. index + L - 1 of (B, K, S, H), in place; padding
    (real (B, L) False) as zeros."""
    keep = real[:, :, None, None]
    L = k.shape[1]
    k_cache[:, :, index : index + L] = torch.where(keep, k, torch.zeros(())).transpose(1, 2)
    v_cache[:, :, index : index + L] = torch.where(keep, v, torch.zeros(())).transpose(1, 2)
