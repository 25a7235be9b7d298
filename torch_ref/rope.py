"""RoPE frequencies by rope_type, in plain torch: the twin of flax_impl/rope.py (the formulas are in its module
docstring), tables in float64 rounded once to float32, the dynamic base in float32 (as transformers)."""

import math

import torch

from torch_ref.config import TransformerConfig, rope_width


def theta(rotated: int, base: float) -> torch.Tensor:
    """base^(-2i/r), i = 0 .. r/2 - 1, float64 (r/2,)."""
    return 1.0 / float(base) ** (torch.arange(0, rotated, 2, dtype=torch.float64) / rotated)


def inv_freq(cfg: TransformerConfig, *, long: bool = False) -> torch.Tensor:
    """(r/2,) float64 inverse frequencies of cfg.rope_type at short lengths (or longrope's past L0 with `long`)."""
    r = rope_width(cfg.head_dim, cfg.rope_fraction)
    t, factor, L0 = theta(r, cfg.rope_base), cfg.rope_scale, cfg.rope_original_max_len
    if cfg.rope_type == "linear":
        return t / factor
    if cfg.rope_type == "llama3":
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelength = 2 * math.pi / t
        out = torch.where(wavelength > L0 / low, t / factor, t)
        smooth = (L0 / wavelength - low) / (high - low)
        medium = (wavelength >= L0 / high) & (wavelength <= L0 / low)
        return torch.where(medium, (1 - smooth) * out / factor + smooth * out, out)
    if cfg.rope_type == "yarn":
        def dim(rotations):  # the dim whose wavelength fits `rotations` times in L0
            return r * math.log(L0 / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_base))

        low, high = dim(cfg.rope_beta_fast), dim(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        return t / factor * ramp + t * (1 - ramp)
    if cfg.rope_type == "longrope":
        return t / torch.tensor(cfg.rope_long_factor if long else cfg.rope_short_factor, dtype=torch.float64)
    return t  # dynamic below L0


def attention_factor(cfg: TransformerConfig) -> float:
    """The factor on cos and sin: rope_attention_factor, else yarn's 0.1 ln(s) + 1 or longrope's
    sqrt(1 + ln(s) / ln(L0)) for s = rope_scale > 1; 1 otherwise."""
    if cfg.rope_type not in ("yarn", "longrope"):
        return 1.0
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    s = cfg.rope_scale
    if s <= 1:
        return 1.0
    if cfg.rope_type == "yarn":
        return 0.1 * math.log(s) + 1
    return math.sqrt(1 + math.log(s) / math.log(cfg.rope_original_max_len))


def frequencies(cfg: TransformerConfig, positions: torch.Tensor, rope: str = "global") -> tuple[torch.Tensor, float]:
    """(inv_freq (r/2,) float32, factor) of a layer whose kind's rope is "global" or "local", for a call at
    `positions`: "dynamic" and "longrope" switch past L0 by its largest position + 1 (over the batch)."""
    r = rope_width(cfg.head_dim, cfg.rope_fraction)
    if rope == "local":
        return theta(r, cfg.rope_local_base).float(), 1.0
    table = inv_freq(cfg).float()
    seq_len = int(positions.max()) + 1 if positions.numel() else 0
    if cfg.rope_type in ("dynamic", "longrope") and seq_len > cfg.rope_original_max_len:
        if cfg.rope_type == "longrope":
            table = inv_freq(cfg, long=True).float()
        else:
            s = torch.tensor(seq_len, dtype=torch.float32)
            grown = cfg.rope_base * (cfg.rope_scale * s / cfg.rope_original_max_len - (cfg.rope_scale - 1)) ** (
                r / (r - 2)
            )
            table = 1.0 / grown ** (torch.arange(0, r, 2, dtype=torch.float32) / r)
    return table, attention_factor(cfg)
