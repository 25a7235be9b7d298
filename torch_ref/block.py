"""Lesson 08's Transformer block in plain torch: pre-LN (default), post-LN, or parallel residual; plain or gated MLP."""

from torch import nn

from torch_ref.attention import MultiHeadAttention
from torch_ref.config import TransformerConfig, as_config
from torch_ref.norm import make_norm

ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
}


class GatedMLP(nn.Module):
    """dropout(down(act(gate(x)) * up(x))): SwiGLU with act = silu (Llama's MLP), GeGLU with a GELU."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config = as_config(config)
        D, F, bias = config.d_model, config.d_ff, config.mlp_bias
        self.gate = nn.Linear(D, F, bias=bias)
        self.up = nn.Linear(D, F, bias=bias)
        self.down = nn.Linear(F, D, bias=bias)
        self.act = ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(self.act(self.gate(x)) * self.up(x)))


class TransformerBlock(nn.Module):
    """x (B, L, D) -> (B, L, D). Pre-LN: x + attn(ln1(x)), x + ff(ln2(x)); post-LN: ln1(x + attn(x)),
    ln2(x + ff(x)); parallel residual: x + attn(ln1(x)) + ff(ln2(x)) (ff(ln1(x)) with one shared norm).
    ff = Linear(D, F), activation, Dropout, Linear(F, D), Dropout; or a GatedMLP. branch_norm "sandwich":
    x + post_attn_norm(attn(ln1(x))), x + post_ff_norm(ff(ln2(x))) (Gemma 2); "post": the same without ln1, ln2
    (OLMo 2). Every branch output is multiplied by residual_multiplier before its residual add (Granite)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        config = as_config(config)
        D, F, bias = config.d_model, config.d_ff, config.mlp_bias
        self.norm_first, self.parallel = config.norm_first, config.parallel_residual
        self.residual_multiplier = config.residual_multiplier
        self.attn = MultiHeadAttention(config)
        pre, post = config.branch_norm != "post", config.branch_norm != "none"
        shared = config.parallel_residual and config.parallel_shared_norm
        self.ln1 = make_norm(config) if pre else None
        self.ln2 = make_norm(config) if pre and not shared else None
        self.post_attn_norm = make_norm(config) if post else None
        self.post_ff_norm = make_norm(config) if post else None
        if config.mlp == "gated":
            self.ff = GatedMLP(config)
        else:
            self.ff = nn.Sequential(
                nn.Linear(D, F, bias=bias),
                ACTIVATIONS[config.activation](),
                nn.Dropout(config.dropout),
                nn.Linear(F, D, bias=bias),
                nn.Dropout(config.dropout),
            )

    def forward(self, x, attention_mask=None, positions=None, kind=None, cache=None, cache_index: int = 0):
        """x (B, L, D) -> (B, L, D); with a (k, v) cache (written in place), (out, cache)."""

        def attend(h):
            out = self.attn(h, attention_mask, positions, kind, cache, cache_index)
            return out if cache is None else out[0]

        out = self._residuals(x, attend)
        return out if cache is None else (out, cache)

    def _residuals(self, x, attend):
        if self.parallel:
            h = self.ln1(x)
            return x + self._scaled(attend(h)) + self._scaled(self.ff(h if self.ln2 is None else self.ln2(x)))
        if self.norm_first:
            x = x + self._branch(attend, self.ln1, self.post_attn_norm, x)
            return x + self._branch(self.ff, self.ln2, self.post_ff_norm, x)
        x = self.ln1(x + self._scaled(attend(x)))
        return self.ln2(x + self._scaled(self.ff(x)))

    def _branch(self, f, pre, post, x):
        """m post(f(pre(x))), a missing norm skipped."""
        h = f(x if pre is None else pre(x))
        return self._scaled(h if post is None else post(h))

    def _scaled(self, h):
        m = self.residual_multiplier
        return h if m == 1 else h * m

