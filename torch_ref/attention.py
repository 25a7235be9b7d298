"""Multi-head self-attention in plain torch, with nn.MultiheadAttention's parameter names and packing, and an
optional KV cache (one path: prefill is the forward that also fills the cache); QK-norm, the families' score
scales and soft-capping as flax_impl/attention.py.

Masks as in flax_impl.masks (torch_ref.masks here): (B, S) 1/True = real token; bool (B|1, N|1, L, S) True = may
attend; float (B|1, N|1, L, S) added to the scores (-inf = masked out). A query row with no key to attend to
returns zeros. Keys no query may attend to are zeroed first, so a NaN at a padded position reaches no real token;
an integer (B, S) mask holding a value other than 0/1 raises ValueError (the Flax twin's rules).
"""

import torch
from torch import nn

from torch_ref.cache import write
from torch_ref.config import TransformerConfig, as_config
from torch_ref.masks import from_torch_mha_mask, layer_kinds, mask_rules  # noqa: F401  (re-exported)
from torch_ref.norm import LayerNorm, RMSNorm
from torch_ref.positions import alibi_slopes, rotate_qk


def attention_scale(config: TransformerConfig) -> float:
    """attention_multiplier, else 1 / sqrt(query_pre_attn_scalar), else 1 / sqrt(head_dim)."""
    if config.attention_multiplier is not None:
        return config.attention_multiplier
    return (config.query_pre_attn_scalar or config.head_dim) ** -0.5


class LayerNormPerHead(nn.Module):
    """LayerNorm over H of x (..., heads, H), each head its own weight (heads, H), no bias, in float32, times
    (offset + weight), the weight starting at 1 - offset."""

    def __init__(self, heads: int, head_dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((heads, head_dim), 1.0 - offset))

    def forward(self, x):
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=-1, keepdim=True, correction=0)
        return ((x32 - mean) * torch.rsqrt(var + self.eps) * (self.offset + self.weight.float())).to(x.dtype)


def make_qk_norms(config: TransformerConfig):
    """(q_norm, k_norm) for config.qk_norm, or (None, None) (flax_impl.attention_config.QK_NORMS); epsilon
    norm_eps, offset norm_offset as every other norm."""
    name, N, K, H, eps = config.qk_norm, config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    c = config.norm_offset
    if name == "none":
        return None, None
    if name == "layernorm_per_head":
        return LayerNormPerHead(N, H, eps, c), LayerNormPerHead(K, H, eps, c)
    if name == "layernorm":
        return tuple(LayerNorm(H, eps=eps, bias=config.norm_bias, offset=c) for _ in "qk")
    widths = (N * H, K * H) if name == "rmsnorm_full_width" else (H, H)
    return RMSNorm(widths[0], eps=eps, offset=c), RMSNorm(widths[1], eps=eps, offset=c)


class MultiHeadAttention(nn.Module):
    """x (B, L, D) -> (B, L, D), with an optional KV cache. `in_proj_weight` ((N + 2K) H, D) = [q; k; v] (K = N,
    H = D / N: nn.MultiheadAttention's (3D, D)), `in_proj_bias`, `out_proj` (N H -> D), `q_norm` / `k_norm` with
    a qk_norm. Query head n reads kv head n // (N / K). Scores q.k * attention_scale, soft-capped, + bias, masked.
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
        self.out_proj = nn.Linear(N * H, D, bias=config.out_bias)
        self.q_norm, self.k_norm = make_qk_norms(config)
        self.dropout = nn.Dropout(config.attention_dropout)
        nn.init.xavier_uniform_(self.in_proj_weight)
        if config.out_bias:
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, attention_mask=None, positions=None, kind=None, cache=None, cache_index: int = 0):
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        kind = kind or layer_kinds(cfg)[0]
        q, k, v = self._project(x, positions, kind["rope"])  # (B, L, N, H), (B, L, K, H), (B, L, K, H)
        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, L, H)
            q_slots = torch.arange(L)
        else:
            write(cache[0], cache[1], k, v, attention_mask[:, cache_index : cache_index + L], cache_index)
            keys, values = cache
            q_slots = torch.arange(cache_index, cache_index + L)
        slopes = alibi_slopes(N, cfg.alibi_max_bias) if cfg.position == "alibi" else None
        allowed, bias = mask_rules(
            attention_mask, q_slots, keys.shape[2], causal=cfg.causal, window=kind["window"], slopes=slopes
        )
        k_all = keys.repeat_interleave(N // K, dim=1)  # (B, N, S, H): query head n reads kv head n // (N / K)
        v_all = values.repeat_interleave(N // K, dim=1)
        if allowed is not None:  # keys no query may read: zero, so that 0 * NaN cannot reach a real query
            live = allowed.any(dim=-2).unsqueeze(-1)  # (B|1, N|1, S, 1)
            k_all = torch.where(live, k_all, torch.zeros(()))
            v_all = torch.where(live, v_all, torch.zeros(()))
        q = q.transpose(1, 2) * attention_scale(cfg)  # (B, N, L, H)
        scores = (q @ k_all.transpose(-2, -1)).float()  # (B, N, L, S)
        if cfg.attn_logit_softcap is not None:
            scores = cfg.attn_logit_softcap * torch.tanh(scores / cfg.attn_logit_softcap)
        if bias is not None:
            scores = scores + bias
        if allowed is not None:
            scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)
        if allowed is not None:  # no key to attend to: zeros, not NaN
            probs = probs * allowed.any(dim=-1, keepdim=True)
        probs = self.dropout(probs.to(v_all.dtype))
        out = self.out_proj((probs @ v_all).transpose(1, 2).reshape(B, L, N * H))  # (B, L, D)
        return out if cache is None else (out, cache)

    def _project(self, x, positions, rope):
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, (N + 2K) H)
        q, k, v = qkv.split([N * H, K * H, K * H], dim=-1)
        if cfg.qk_norm == "rmsnorm_full_width":  # over the whole projection width, before the split into heads
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.reshape(B, L, N, H), k.reshape(B, L, K, H), v.reshape(B, L, K, H)
        if self.q_norm is not None and cfg.qk_norm != "rmsnorm_full_width":  # per head, over H
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate_qk(cfg, q, k, torch.arange(L) if positions is None else positions, rope)
        return q, k, v
