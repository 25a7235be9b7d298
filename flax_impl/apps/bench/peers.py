"""The PyTorch peers of `flax-impl bench`, each holding the Flax encoder's weights:

- "torch_ref": our plain-PyTorch twin, eager (matmul, softmax, matmul);
- "torch.nn": PyTorch's own `nn.TransformerEncoderLayer`s between the twin's embedding and final norm; in eval
  mode under `torch.inference_mode()` PyTorch runs its native fused fast path, in training its regular path;
- "torch_ref+sdpa": the twin with its attention core in `F.scaled_dot_product_attention`;
- "torch.compile": `torch.compile` of the twin (opt-in).

Axes: B batch, L length, D model width, N heads, K kv heads, H head dim.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import torch_ref
from flax_impl.apps.bench.encoder_sides import LR, PEERS, unsupported
from flax_impl.config import TransformerConfig
from flax_impl.interop import to_numpy_state_dict
from flax_impl.torch_keys import to_torch_encoder_layer
from torch_ref.attention import MultiHeadAttention, mask_rules
from torch_ref.positions import alibi_slopes, rotate_qk

# The attention each peer runs, per mode; {sdpa} is the backend F.scaled_dot_product_attention dispatches to.
PEER_ATTENTION = {
    "torch_ref": {"forward": "matmul, softmax, matmul (eager)", "train": "matmul, softmax, matmul (eager)"},
    "torch.nn": {"forward": "native fused encoder-layer fast path (torch._transformer_encoder_layer_fwd)",
                 "train": "F.multi_head_attention_forward -> SDPA {sdpa}"},
    "torch_ref+sdpa": {"forward": "SDPA {sdpa}", "train": "SDPA {sdpa}"},
    "torch.compile": {"forward": "Inductor-generated", "train": "Inductor-generated"},
}


class TorchNNEncoder(nn.Module):
    """ids (B, L) -> (B, L, D): deep copies of the twin's input and final norm around `nn.TransformerEncoderLayer`s
    holding its blocks' weights."""

    def __init__(self, twin: torch_ref.Transformer):
        super().__init__()
        cfg = twin.config
        self.input = copy.deepcopy(twin.input)
        self.layers = nn.ModuleList()
        for block in twin.blocks:
            layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, dropout=cfg.dropout,
                                               activation=cfg.activation, layer_norm_eps=cfg.norm_eps,
                                               batch_first=True, norm_first=cfg.norm_first)
            layer.load_state_dict(to_torch_encoder_layer(block.state_dict()))
            self.layers.append(layer)
        self.final_norm = copy.deepcopy(twin.final_norm) if cfg.final_norm else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.input(ids)  # (B, L, D)
        for layer in self.layers:
            x = layer(x)
        return x if self.final_norm is None else self.final_norm(x)


class SDPAAttention(MultiHeadAttention):
    """torch_ref's attention (same parameters) with its core in `F.scaled_dot_product_attention`; only the
    config's own masks (causal, position bias), as the bench uses no padding."""

    def forward(self, x, attention_mask=None, positions=None, kind=None, cache=None, cache_index=0):
        if attention_mask is not None or cache is not None:
            raise ValueError("SDPAAttention (bench peer) takes no attention_mask and no cache")
        cfg = self.config
        B, L, D = x.shape
        N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).split([N * H, K * H, K * H], -1)
        q = q.view(B, L, N, H)
        k = k.view(B, L, K, H).repeat_interleave(N // K, dim=2)  # (B, L, N, H)
        v = v.view(B, L, K, H).repeat_interleave(N // K, dim=2)  # (B, L, N, H)
        q, k = rotate_qk(cfg, q, k, torch.arange(L) if positions is None else positions)
        bias = None  # the twin's mask rules as one additive (1|B, N|1, L, S) mask, unless plain causal does
        if cfg.position == "alibi" or cfg.sliding_window is not None:
            slopes = alibi_slopes(N, cfg.alibi_max_bias) if cfg.position == "alibi" else None
            allowed, bias = mask_rules(None, torch.arange(L), L, causal=cfg.causal, window=cfg.sliding_window,
                                       slopes=slopes)  # fmt: skip
            bias = torch.zeros(()) if bias is None else bias
            bias = bias.masked_fill(~allowed, float("-inf")) if allowed is not None else bias
            bias = bias.to(x.device)
        out = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, N, L, H)
            attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=self.dropout.p if self.training else 0.0,
            is_causal=cfg.causal and bias is None, scale=1.0 / math.sqrt(H))  # (B, N, L, H)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


def build_peers(twin: torch_ref.Transformer, names: list[str], device: str) -> dict[str, nn.Module]:
    """{name: module} for peers from `PEERS`, all holding `twin`'s weights, on `device`; ValueError for an
    unknown name or an architecture the peer cannot hold."""
    peers: dict[str, nn.Module] = {}
    for name in names:
        why = unsupported(name, twin.config)
        if name not in PEERS or why:
            raise ValueError(f"peer {name!r}: " + (f"cannot hold this encoder ({why})" if why else
                                                   f"choose from {', '.join(PEERS)}"))
        if name == "torch_ref":
            peers[name] = twin
        elif name == "torch.nn":
            peers[name] = TorchNNEncoder(twin)
        elif name == "torch_ref+sdpa":
            peers[name] = copy.deepcopy(twin)
            for block in peers[name].blocks:
                attn = SDPAAttention(twin.config)
                attn.load_state_dict(block.attn.state_dict())
                block.attn = attn
        else:
            peers[name] = torch.compile(twin)
    return {name: module.to(device) for name, module in peers.items()}


def sdpa_backend(device: str, batch: int, length: int, config: TransformerConfig, dtype: Any, train: bool) -> str:
    """The backend `F.scaled_dot_product_attention` picks for the bench's inputs (`torch._fused_sdp_choice`, the
    dispatcher's own choice): "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH" or "unknown"."""
    from torch.nn.attention import SDPBackend

    choose = getattr(torch, "_fused_sdp_choice", None)
    q = torch.zeros(batch, config.n_heads, length, config.head_dim, device=device, dtype=dtype)  # (B, N, L, H)
    q.requires_grad_(train)
    try:
        return SDPBackend(choose(q, q, q, dropout_p=config.attention_dropout if train else 0.0,
                                 is_causal=config.causal)).name
    except (RuntimeError, TypeError, ValueError):  # choose is None: this torch does not say
        return "unknown"


class TorchSide:
    """torch_ref's encoder with the Flax weights (or torch's own init) and its peers; `runner` hands out
    argument-less calls of one forward or train step (synchronised on GPU); bf16 runs under autocast."""

    def __init__(self, config: TransformerConfig, flax_model: Any, *, device: str, seed: int,
                 peers: tuple[str, ...] = ("torch_ref",), precision: str = "fp32"):
        torch.manual_seed(seed)
        self.config, self.device, self.dtype = config, device, torch.bfloat16 if precision == "bf16" else torch.float32
        self.twin = torch_ref.Transformer(config)
        if flax_model is not None:
            self.twin.load_state_dict(torch_ref.from_numpy_state_dict(to_numpy_state_dict(flax_model)))
        self.models = build_peers(self.twin, list(peers), device)
        dev = "cuda" if device.startswith("cuda") else "cpu"
        self.autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if precision == "bf16" else \
            contextlib.nullcontext
        self.sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def kernels(self, mode: str, B: int, L: int) -> dict[str, str]:
        backend = sdpa_backend(self.device, B, L, self.config, self.dtype, train=mode == "train")
        return {name: PEER_ATTENTION[name][mode].format(sdpa=backend) for name in self.models}

    def runner(self, name: str, mode: str, ids: np.ndarray, target: np.ndarray) -> Callable[[], None]:
        """Peer `name`'s "forward" (eval, under inference_mode) or "train" step on ids (B, L), target (B, L, D)."""
        model = self.models[name]
        trainable = self.twin if name == "torch.compile" else model  # torch.compile shares the twin's weights
        ids_t, target_t = torch.from_numpy(ids).to(self.device), torch.from_numpy(target).to(self.device)
        if mode == "forward":
            trainable.eval()

            def forward() -> None:
                with torch.inference_mode(), self.autocast():
                    model(ids_t)
                self.sync()

            return forward
        trainable.train()
        opt = torch.optim.SGD(trainable.parameters(), lr=LR)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                h = model(ids_t)  # (B, L, D)
            (h.float() - target_t).square().mean().backward()
            opt.step()
            self.sync()

        return train_step
