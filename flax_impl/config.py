"""EncoderConfig: the one configuration both twins read (pure Python: imports neither jax nor torch).

Axis legend used throughout the project: B batch, L query length, S key length, D model width (d_model),
N heads, H head dim (D / N), F feed-forward width (d_ff), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
ROPE_STYLES = ("half", "interleaved")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of the encoder stack; the defaults are lesson 08's 6 x 512 encoder.

    `position` selects where position enters: added at the input ("sinusoidal", "learned"), rotating q and k
    ("rope"), biasing the attention scores ("alibi"), or nowhere ("none"). `activation` names the GELU variant
    explicitly: "gelu" is the exact erf form (torch.nn.GELU()), "gelu_tanh" the tanh approximation. `dtype` is
    the Flax compute dtype, `param_dtype` the storage dtype; torch_ref ignores both (it follows its tensors).
    """

    vocab_size: int = 10_000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float | None = None  # None -> same as `dropout`
    max_len: int = 512
    position: str = "sinusoidal"
    rope_base: float = 10_000.0
    rope_style: str = "half"
    rope_fraction: float = 1.0
    rope_scale: float = 1.0  # linear position interpolation: positions are divided by this
    norm_first: bool = True
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    padding_idx: int | None = None
    input_norm: bool = False
    final_norm: bool = True
    embed_scale: bool = False
    bias: bool = True
    tie_lm_head: bool = False
    scan_layers: bool = True
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.attention_dropout is None:
            object.__setattr__(self, "attention_dropout", self.dropout)
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r} must be a probability in [0, 1]")
        _check_choice("position", self.position, POSITIONS)
        _check_choice("rope_style", self.rope_style, ROPE_STYLES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if not self.rope_base > 1.0:
            raise ValueError(f"rope_base={self.rope_base!r} must be > 1")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction={self.rope_fraction!r} must be in (0, 1]")
        if not self.rope_scale > 0.0:
            raise ValueError(f"rope_scale={self.rope_scale!r} must be > 0")
        if self.position == "rope":
            rotated = rope_width(self.head_dim, self.rope_fraction)
            if rotated % 2:
                raise ValueError(
                    f"RoPE rotates pairs: rotated width {rotated} (head_dim={self.head_dim} x "
                    f"rope_fraction={self.rope_fraction}) must be even"
                )
        if not self.layer_norm_eps > 0.0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps!r} must be > 0")
        if self.padding_idx is not None and not 0 <= self.padding_idx < self.vocab_size:
            raise ValueError(f"padding_idx={self.padding_idx!r} must be in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """Build from a dict; an unknown key raises ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> EncoderConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys {unknown}")
        if "dropout" in changes and "attention_dropout" not in changes:
            changes["attention_dropout"] = None if self.attention_dropout == self.dropout else self.attention_dropout
        return dataclasses.replace(self, **changes)


def rope_width(head_dim: int, fraction: float) -> int:
    """Number of leading head dims RoPE rotates: int(fraction * head_dim)."""
    return int(round(fraction * head_dim))


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")
