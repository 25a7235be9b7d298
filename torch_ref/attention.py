"""Multi-head self-attention in plain torch, with nn.MultiheadAttention's parameter names and packing.

Masks as in flax_impl.attention: (B, S) 1/True = real token; bool (B|1, N|1, L, S) True = may attend; float
(B|1, N|1, L, S) added to the scores (-inf = masked out). A query row with no key to attend to returns zeros.
Keys no query may attend to are zeroed first, so a NaN at a padded position reaches no real token; an integer
(B, S) mask holding a value other than 0/1 raises ValueError (the Flax twin's rules, flax_impl.attention).
"""

import math

import torch
from torch import nn

from torch_ref.config import TransformerConfig, as_config
from torch_ref.positions import alibi_slopes, rotate_qk, score_bias


def from_torch_mha_mask(mask: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's bool mask (True = masked out) -> ours (True = may attend)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"from_torch_mha_mask converts bool masks only, got dtype {mask.dtype}")
    return ~mask


def allowed_and_additive(mask, q_len: int, k_len: int, causal: bool, window: int | None = None):
    """Split a mask into a bool 'may attend' (broadcastable to (B, N, L, S)) and an additive float part."""
    allowed, additive = None, None
    if mask is not None:
        if mask.dim() == 2:
            if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
                raise ValueError(f"a (B, S) attention_mask holds 0/1 only, got values {mask.unique()[:5].tolist()}")
            allowed = mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        elif mask.dtype == torch.bool:
            allowed = mask
        else:
            additive = mask.float()
            allowed = ~torch.isneginf(additive)
            additive = torch.where(allowed, additive, torch.zeros(()))
    if causal:
        i = torch.arange(k_len - q_len, k_len).unsqueeze(1)  # (L, 1)
        j = torch.arange(k_len).unsqueeze(0)  # (1, S)
        tril = j <= i
        if window is not None:  # sliding window: the last `window` positions
            tril = tril & (i - j < window)
        tril = tril[None, None]  # (1, 1, L, S)
        allowed = tril if allowed is None else allowed & tril
    return allowed, additive


class MultiHeadAttention(nn.Module):
    """x (B, L, D) -> (B, L, D). `in_proj_weight` ((N + 2K) H, D) = [q; k; v] (K = N: nn.MultiheadAttention's
    (3D, D)), `in_proj_bias`, `out_proj`. Query head n reads kv head n // (N / K).

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

    def forward(self, x, attention_mask=None, positions=None):
        return self._forward(x, attention_mask, positions)[0]

    def prefill(self, x, attention_mask, positions, cache_len: int):
        """forward, also returning (k, v) (B, K, S, H) of cache_len slots; padded slots and slots L.. zero."""
        out, (k, v) = self._forward(x, attention_mask, positions)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, L, H)
        if attention_mask is not None and attention_mask.dim() == 2:  # padding enters the cache as zeros
            real = attention_mask.bool()[:, None, :, None]
            k, v = torch.where(real, k, torch.zeros(())), torch.where(real, v, torch.zeros(()))
        pad = (0, 0, 0, cache_len - x.shape[1])
        return out, (nn.functional.pad(k, pad), nn.functional.pad(v, pad))

    def decode(self, x, kv, index: int, key_mask, positions):
        """L new tokens at slots index.. attend over the cache (slots j <= i that key_mask (B, S) marks real)."""
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = self._project(x, positions)
        k_cache, v_cache = kv[0].clone(), kv[1].clone()
        k_cache[:, :, index : index + L] = k.transpose(1, 2)  # (B, K, S, H)
        v_cache[:, :, index : index + L] = v.transpose(1, 2)
        S = k_cache.shape[2]
        q = q.transpose(1, 2) * (1.0 / math.sqrt(H))  # (B, N, L, H)
        k_all = k_cache.repeat_interleave(N // K, dim=1)  # (B, N, S, H)
        v_all = v_cache.repeat_interleave(N // K, dim=1)
        scores = (q @ k_all.transpose(-2, -1)).float()  # (B, N, L, S)
        i = torch.arange(index, index + L).unsqueeze(1)  # (L, 1)
        j = torch.arange(S).unsqueeze(0)  # (1, S)
        allowed = (j <= i) & key_mask[:, None, None, :]  # (B, 1, L, S)
        if cfg.sliding_window is not None:
            allowed = allowed & (i - j < cfg.sliding_window)
        if cfg.position == "alibi":
            scores = scores - alibi_slopes(N, cfg.alibi_max_bias)[:, None, None] * (i - j).float()
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)
        out = (probs.to(v_all.dtype) @ v_all).transpose(1, 2).reshape(B, L, D)
        return self.out_proj(out), (k_cache, v_cache)

    def _project(self, x, positions):
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, (N + 2K) H)
        q, k, v = qkv.split([N * H, K * H, K * H], dim=-1)
        q, k, v = q.view(B, L, N, H), k.view(B, L, K, H), v.view(B, L, K, H)
        q, k = rotate_qk(cfg, q, k, torch.arange(L) if positions is None else positions)
        return q, k, v

    def _forward(self, x, attention_mask, positions):
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k_kv, v_kv = self._project(x, positions)
        q = q.transpose(1, 2) * (1.0 / math.sqrt(H))  # (B, N, L, H)
        k = k_kv.repeat_interleave(N // K, dim=2).transpose(1, 2)  # (B, N, S, H)
        v = v_kv.repeat_interleave(N // K, dim=2).transpose(1, 2)  # (B, N, S, H)
        allowed, additive = allowed_and_additive(attention_mask, L, L, cfg.causal, cfg.sliding_window)
        if allowed is not None:  # keys no query may read: zero, so that 0 * NaN cannot reach a real query
            live = allowed.any(dim=-2).unsqueeze(-1)  # (B|1, N|1, S, 1)
            k, v = torch.where(live, k, torch.zeros(())), torch.where(live, v, torch.zeros(()))
        scores = (q @ k.transpose(-2, -1)).float()  # (B, N, L, S)
        bias = score_bias(cfg, L, L)
        if bias is not None:
            scores = scores + bias
        if additive is not None:
            scores = scores + additive
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        if allowed is not None:  # no key to attend to: zeros, not NaN
            probs = probs * allowed.any(dim=-1, keepdim=True)
        probs = self.dropout(probs.to(v.dtype))
        out = (probs @ v).transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.out_proj(out), (k_kv, v_kv)
