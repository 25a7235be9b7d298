"""Position schemes in plain torch: sinusoidal table, learned positions, RoPE, ALiBi."""

import math

import torch
from torch import nn

from flax_impl.validation import check_bool, check_choice, check_float, check_int
from torch_ref.config import ROPE_STYLES, TransformerConfig, rope_width
from torch_ref.rope import frequencies


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """(L, D) float32: PE[pos, 2i] = sin(pos / 10000^(2i/D)), PE[pos, 2i+1] = cos(same) (Vaswani et al., 2017).

    Odd D keeps the sine of the last pair. Computed in float64, rounded once to float32. Raises as the Flax twin.
    """
    length, d_model = check_int("length", length, low=0), check_int("d_model", d_model, low=1)
    half = (d_model + 1) // 2
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    exponent = 2.0 * torch.arange(half, dtype=torch.float64) / d_model  # (ceil(D/2),): 2i / D
    div = torch.pow(torch.tensor(10_000.0, dtype=torch.float64), exponent)
    angle = pos / div  # (L, ceil(D/2))
    pe = torch.zeros(length, 2 * half, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe[:, :d_model].to(torch.float32)


class LearnedPositions(nn.Module):
    """Learned absolute positions: `weight` (max_len, D), N(0, 1) as nn.Embedding. forward(L) -> (L, D)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        max_len, d_model = check_int("max_len", max_len, low=1), check_int("d_model", d_model, low=1)
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, d_model))

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        length, offset = check_int("length", length, low=0), check_int("offset", offset, low=0)
        if offset + length > self.max_len:
            raise IndexError(
                f"learned positions cover max_len={self.max_len} positions; positions {offset}..{offset + length - 1}"
                f" (sequence length {length}) are out of range"
            )
        return self.weight[offset : offset + length]


def apply_rope(x, positions, *, base=10_000.0, style="half", fraction=1.0, scale=1.0, inv_freq=None, factor=1.0):
    """RoPE (Su et al., 2021) of x (B, L, N, H) at positions (L,) or (B, L); see flax_impl.positions.apply_rope.

    "half": pairs (x[i], x[i + r/2]) (GPT-NeoX / Llama rotate_half); "interleaved": (x[2i], x[2i+1]) (RoFormer,
    GPT-J). The first r = round(fraction * H) dims rotate by p * (base^(-2i/r) / scale), the factor computed in
    float64 and rounded once to float32; angles and rotation in float32. `inv_freq` (r/2,) replaces that factor
    (a rope_type's or a layer's table, torch_ref.rope); `factor` multiplies cos and sin. Raises as the Flax twin.
    """
    base = check_float("base", base, low=1.0, low_open=True)
    fraction = check_float("fraction", fraction, low=0.0, high=1.0, low_open=True)
    scale = check_float("scale", scale, low=0.0, low_open=True)
    style = check_choice("style", style, ROPE_STYLES)
    if x.dim() != 4:
        raise ValueError(f"apply_rope expects x of shape (B, L, N, H), got {tuple(x.shape)}")
    B, L, N, H = x.shape
    r = rope_width(H, fraction)
    if r % 2 or r == 0:
        raise ValueError(f"RoPE rotates pairs: rotated width {r} (H={H} x fraction={fraction}) must be even and > 0")
    positions = torch.as_tensor(positions)
    if tuple(positions.shape) not in ((L,), (B, L)):
        raise ValueError(f"positions must have shape (L,)=({L},) or (B, L)=({B}, {L}), got {tuple(positions.shape)}")
    if inv_freq is None:
        inv_freq = (1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r) / scale).to(torch.float32)
    elif tuple(inv_freq.shape) != (r // 2,):
        raise ValueError(f"inv_freq must have shape (r/2,) = ({r // 2},), got {tuple(inv_freq.shape)}")
    pos = positions.to(torch.float32)
    angle = (pos.unsqueeze(-1) * inv_freq.float()).unsqueeze(-2)  # (L, 1, r/2) or (B, L, 1, r/2)
    cos, sin = torch.cos(angle) * factor, torch.sin(angle) * factor
    xr = x[..., :r].float()
    if style == "half":
        a, b = xr[..., : r // 2], xr[..., r // 2 :]
        rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    else:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    return rotated if r == H else torch.cat([rotated, x[..., r:]], dim=-1)


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """(N,) float32 ALiBi slopes (Press et al., 2022): 2^(-max_bias*h/n) for n a power of two, else the closest
    lower power of two's slopes followed by every other slope of the next power of two."""
    n_heads = check_int("n_heads", n_heads, low=1)
    max_bias = check_float("max_bias", max_bias, low=0.0, low_open=True)

    def power_of_two(n):
        return [2.0 ** (-max_bias * h / n) for h in range(1, n + 1)]

    closest = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(q_len: int, k_len: int, slopes: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """(N, L, S) float32: -m|i - j| (bidirectional) or -m(i - j) for j <= i, 0 above (causal); queries are the
    last q_len of k_len positions."""
    q_len, k_len = check_int("q_len", q_len, low=0), check_int("k_len", k_len, low=0)
    causal = check_bool("causal", causal)
    if k_len < q_len:
        raise ValueError(f"alibi_bias needs 0 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    i = torch.arange(k_len - q_len, k_len, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    j = torch.arange(k_len, dtype=torch.float32).unsqueeze(0)  # (1, S)
    if causal:
        dist = torch.where(j <= i, i - j, torch.zeros(()))
    else:
        dist = (i - j).abs()
    return -torch.as_tensor(slopes, dtype=torch.float32)[:, None, None] * dist  # (N, L, S)


def rotate_qk(config: TransformerConfig, q, k, positions, rope: str | None = "global"):
    """RoPE on q (B, L, N, H) and k (B, L, K, H) when config.position == "rope" and the layer rotates (`rope`,
    its kind's "global" / "local" / None, torch_ref.masks.layer_kinds), identity otherwise."""
    if config.position != "rope" or rope is None:
        return q, k
    inv_freq, factor = frequencies(config, positions, rope)
    kw = dict(style=config.rope_style, fraction=config.rope_fraction, inv_freq=inv_freq, factor=factor)
    return apply_rope(q, positions, **kw), apply_rope(k, positions, **kw)
