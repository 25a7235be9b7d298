"""Multi-head self-attention in plain torch, with nn.MultiheadAttention's parameter names and packing, and an
optional KV cache (one path: prefill is the forward that also fills the cache).

Masks as in flax_impl.attention: (B, S) 1/True = real token; bool (B|1, N|1, L, S) True = may attend; float
(B|1, N|1, L, S) added to the scores (-inf = masked out). A query row with no key to attend to returns zeros.
Keys no query may attend to are zeroed first, so a NaN at a padded position reaches no real token; an integer
(B, S) mask holding a value other than 0/1 raises ValueError (the Flax twin's rules, flax_impl.attention).
"""

import math

import torch
from torch import nn

from torch_ref.cache import write
from torch_ref.config import TransformerConfig, as_config
from torch_ref.positions import alibi_slopes, rotate_qk


def from_torch_mha_mask(mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's bool mask (True = masked out) -> ours (True = may attend)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"from_torch_mha_mask converts bool masks only, got dtype {mask.dtype}")
    return ~mask


def layer_kinds(config: TransformerConfig) -> list[dict]:
    """Every layer's kind (see flax_impl.attention.LayerKind): {"window": W or None}, one dict per layer."""
    return [{"window": config.sliding_window} for _ in range(config.n_layers)]


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


class MultiHeadAttention(nn.Module):
    """x (B, L, D) -> (B, L, D), with an optional KV cache. `in_proj_weight` ((N + 2K) H, D) = [q; k; v] (K = N:
    nn.MultiheadAttention's (3D, D)), `in_proj_bias`, `out_proj`. Query head n reads kv head n // (N / K).
    With `cache=(k, v)` (B, K, S, H) the new keys and values are written at slots cache_index.. (in place) and the
    queries attend over every slot by the same rules; `attention_mask` is then the (B, S) slot mask.

    Initialised as nn.MultiheadAttention: xavier-uniform in_proj_weight, zero biases.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config = as_config(config)
        D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.config = config
        self.in_proj_weight = nn.Parameter(torch.empty((N + 2 * K) * H, D))
        self.in_proj_bias = nn.Parameter(torch.zeros((N + 2 * K) * H)) if config.qkv_bias else None
        self.out_proj = nn.Linear(D, D, bias=config.out_bias)
        self.dropout = nn.Dropout(config.attention_dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if config.out_bias:
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, attention_mask=None, positions=None, kind=None, cache=None, cache_index: int = 0):
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        window = (kind or {"window": cfg.sliding_window})["window"]
        q, k, v = self._project(x, positions)  # (B, L, N, H), (B, L, K, H), (B, L, K, H)
        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, L, H)
            q_slots = torch.arange(L)
        else:
            write(cache[0], cache[1], k, v, attention_mask[:, cache_index : cache_index + L], cache_index)
            keys, values = cache
            q_slots = torch.arange(cache_index, cache_index + L)
        slopes = alibi_slopes(N, cfg.alibi_max_bias) if cfg.position == "alibi" else None
        allowed, bias = mask_rules(
            attention_mask, q_slots, keys.shape[2], causal=cfg.causal, window=window, slopes=slopes
        )
        k_all = keys.repeat_interleave(N // K, dim=1)  # (B, N, S, H): query head n reads kv head n // (N / K)
        v_all = values.repeat_interleave(N // K, dim=1)
        if allowed is not None:  # keys no query may read: zero, so that 0 * NaN cannot reach a real query
            live = allowed.any(dim=-2).unsqueeze(-1)  # (B|1, N|1, S, 1)
            k_all = torch.where(live, k_all, torch.zeros(()))
            v_all = torch.where(live, v_all, torch.zeros(()))
        q = q.transpose(1, 2) * (1.0 / math.sqrt(H))  # (B, N, L, H)
        scores = (q @ k_all.transpose(-2, -1)).float()  # (B, N, L, S)
        if bias is not None:
            scores = scores + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        if allowed is not None:  # no key to attend to: zeros, not NaN
            probs = probs * allowed.any(dim=-1, keepdim=True)
        probs = self.dropout(probs.to(v_all.dtype))
        out = self.out_proj((probs @ v_all).transpose(1, 2).reshape(B, L, D))  # (B, L, D)
        return out if cache is None else (out, cache)

    def _project(self, x, positions):
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, (N + 2K) H)
        q, k, v = qkv.split([N * H, K * H, K * H], dim=-1)
        q, k, v = q.view(B, L, N, H), k.view(B, L, K, H), v.view(B, L, K, H)
        q, k = rotate_qk(cfg, q, k, torch.arange(L) if positions is None else positions)
        return q, k, v
