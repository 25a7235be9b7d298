"""The PyTorch peers of `flax-impl bench`: what a user would otherwise run, each holding the same weights.

- "torch_ref": our plain-PyTorch twin, eager (the textbook attention: matmul, softmax, matmul).
- "torch.nn": the same weights in PyTorch's own `nn.TransformerEncoderLayer` (`nn.MultiheadAttention` inside, as
  in lesson 08's block); in eval mode under `torch.inference_mode()` PyTorch runs its native fused fast path
  (`torch._transformer_encoder_layer_fwd`), in training its regular path (`F.multi_head_attention_forward`, SDPA).
- "torch_ref+sdpa": the twin with its attention core replaced by `F.scaled_dot_product_attention` (projections,
  norms and feed-forward unchanged).
- "torch.compile": `torch.compile` of the twin (opt-in, `--torch-compile`).

Axes: B batch, L length, D model width, N heads, K kv heads, H head dim.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

import torch_ref
from flax_impl.apps.bench_results import PEERS
from flax_impl.config import TransformerConfig
from flax_impl.interop import to_torch_encoder_layer
from torch_ref.attention import MultiHeadAttention
from torch_ref.positions import rotate_qk, score_bias

# The attention each peer runs, per mode; {sdpa} is the backend F.scaled_dot_product_attention dispatches to.
PEER_ATTENTION = {
    "torch_ref": {"forward": "matmul, softmax, matmul (eager)", "train": "matmul, softmax, matmul (eager)"},
    "torch.nn": {
        "forward": "native fused encoder-layer fast path (torch._transformer_encoder_layer_fwd)",
        "train": "F.multi_head_attention_forward -> SDPA {sdpa}",
    },
    "torch_ref+sdpa": {"forward": "SDPA {sdpa}", "train": "SDPA {sdpa}"},
    "torch.compile": {"forward": "Inductor-generated", "train": "Inductor-generated"},
}


def torch_nn_unsupported(config: TransformerConfig) -> str | None:
    """Why `nn.TransformerEncoderLayer` cannot hold this architecture, or None when it can."""
    reasons = [
        (config.position in ("rope", "alibi"), f"position={config.position} acts inside attention"),
        (config.n_kv_heads != config.n_heads, "grouped-query attention"),
        (config.norm != "layernorm", f"norm={config.norm}"),
        (config.mlp != "plain", f"mlp={config.mlp}"),
        (config.activation not in ("gelu", "relu"), f"activation={config.activation}"),
        (config.parallel_residual, "parallel_residual"),
        (config.causal or config.sliding_window is not None, "causal / sliding-window masks"),
        (not (config.qkv_bias and config.out_bias and config.mlp_bias and config.norm_bias), "a bias switched off"),
    ]
    found = [why for bad, why in reasons if bad]
    return "; ".join(found) if found else None


class TorchNNEncoder(nn.Module):
    """ids (B, L) -> (B, L, D): the twin's input embedding, `nn.TransformerEncoderLayer`s, the twin's final norm.

    Args:
        twin: a torch_ref.Transformer whose weights are copied (its input and final norm are deep copies).
    """

    def __init__(self, twin: torch_ref.Transformer):
        super().__init__()
        cfg = twin.config
        self.input = copy.deepcopy(twin.input)
        self.layers = nn.ModuleList()
        for block in twin.blocks:
            layer = nn.TransformerEncoderLayer(
                cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout, activation=cfg.activation,
                layer_norm_eps=cfg.norm_eps, batch_first=True, norm_first=cfg.norm_first,
            )
            layer.load_state_dict(to_torch_encoder_layer(block.state_dict()))
            self.layers.append(layer)
        self.final_norm = copy.deepcopy(twin.final_norm) if cfg.final_norm else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.input(ids)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        return x if self.final_norm is None else self.final_norm(x)


class SDPAAttention(MultiHeadAttention):
    """torch_ref's attention (same parameters) with its core in `F.scaled_dot_product_attention`; no masks
    beyond the config's own (causal, position bias), as the bench uses none."""

    def forward(self, x, attention_mask=None, positions=None):
        if attention_mask is not None:
            raise ValueError("SDPAAttention (bench peer) takes no attention_mask")
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, (N + 2K) H)
        q, k, v = qkv.split([N * H, K * H, K * H], dim=-1)
        q = q.view(B, L, N, H)
        k = k.view(B, L, K, H).repeat_interleave(N // K, dim=2)  # (B, L, N, H)
        v = v.view(B, L, K, H).repeat_interleave(N // K, dim=2)  # (B, L, N, H)
        q, k = rotate_qk(cfg, q, k, torch.arange(L) if positions is None else positions)
        bias = score_bias(cfg, L, L)  # (N, L, S) or None
        if bias is not None and cfg.causal:
            bias = bias.masked_fill(torch.ones(L, L, dtype=torch.bool, device=bias.device).triu(1), float("-inf"))
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, N, L, H)
            attn_mask=None if bias is None else bias.to(q.dtype),
            dropout_p=self.dropout.p if self.training else 0.0,
            is_causal=cfg.causal and bias is None,
            scale=1.0 / math.sqrt(H),
        )  # (B, N, L, H)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


def sdpa_twin(twin: torch_ref.Transformer) -> torch_ref.Transformer:
    """A deep copy of `twin` whose attention modules run `SDPAAttention` (same weights).

    Raises:
        ValueError: a sliding window (SDPA has no window here).
    """
    if twin.config.sliding_window is not None:
        raise ValueError("torch_ref+sdpa: sliding_window is not supported")
    out = copy.deepcopy(twin)
    for block in out.blocks:
        attn = SDPAAttention(out.config)
        attn.load_state_dict(block.attn.state_dict())
        block.attn = attn
    return out


def build_peers(twin: torch_ref.Transformer, names: list[str], device: str) -> dict[str, nn.Module]:
    """{name: module} for the requested peers (`PEERS`), all holding `twin`'s weights, on `device`.

    Raises:
        ValueError: an unknown name, or "torch.nn" for an architecture it cannot hold (`torch_nn_unsupported`).
    """
    peers: dict[str, nn.Module] = {}
    for name in names:
        if name == "torch_ref":
            peers[name] = twin
        elif name == "torch.nn":
            why = torch_nn_unsupported(twin.config)
            if why:
                raise ValueError(f"peer torch.nn: nn.TransformerEncoderLayer cannot hold this encoder ({why})")
            peers[name] = TorchNNEncoder(twin)
        elif name == "torch_ref+sdpa":
            peers[name] = sdpa_twin(twin)
        elif name == "torch.compile":
            peers[name] = torch.compile(twin)
        else:
            raise ValueError(f"unknown peer {name!r}: choose from {', '.join(PEERS)}")
    for module in peers.values():
        module.to(device)
    return peers


def sdpa_backend(device: str, batch: int, length: int, config: TransformerConfig, dtype: Any, train: bool) -> str:
    """The `F.scaled_dot_product_attention` backend PyTorch picks for the bench's inputs (`torch._fused_sdp_choice`,
    the dispatcher's own choice): "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION" or "MATH"; "unknown"
    where this torch does not say.

    Args:
        device, dtype: of the inputs.
        batch, length: B and L.
        config: N, H, causality and the attention dropout (applied when `train`).
        train: gradients on and attention dropout active, as in the train step.
    """
    from torch.nn.attention import SDPBackend

    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    q = torch.zeros(batch, config.n_heads, length, config.head_dim, device=device, dtype=dtype)  # (B, N, L, H)
    q.requires_grad_(train)
    dropout_p = config.attention_dropout if train else 0.0
    try:
        return SDPBackend(choose(q, q, q, dropout_p=dropout_p, is_causal=config.causal)).name
    except (RuntimeError, TypeError, ValueError):
        return "unknown"
