"""Configs by who reads them (pure Python: imports neither jax nor torch).

`TransformerConfig` is the architecture both twins read; `FlaxConfig` the Flax-only execution settings;
`TrainConfig` the optimiser both training steps read.

Every field is checked at construction (and by `replace` / `from_dict`) with `flax_impl.validation`'s rule: a
value of the wrong type raises `ArgumentTypeError` (a TypeError that is also a ValueError): a bool is not a
count, "False" is not a bool, "1e-5" is not a number; a value of the right type out of range (NaN, inf, 0 heads,
an unknown name) raises ValueError. The message names the field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, TypeVar

from flax_impl.attention_config import check_attention_fields
from flax_impl.validation import ArgumentTypeError, check_bool, check_choice, check_float, check_int

_C = TypeVar("_C", bound="_DictMixin")


class _DictMixin:
    """to_dict / from_dict for the frozen config dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Build from a dict; an unknown key raises ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)


POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")
ROPE_STYLES = ("half", "interleaved")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
BRANCH_NORMS = ("none", "sandwich", "post")
MLPS = ("plain", "gated")
LM_HEADS = ("tied", "untied")
POSITIONS_FROM = ("index", "mask", "tokens")
BIAS_SWITCHES = ("qkv_bias", "out_bias", "mlp_bias", "norm_bias")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "einsum", "dot_product_attention")
TRANSFORMER_BOOLS = (
    "norm_first",
    "causal",
    "input_norm",
    "final_norm",
    "embed_scale",
    "bias",
    "parallel_residual",
    "parallel_shared_norm",
    "lm_head_bias",
)
TRANSFORMER_CHOICES = {
    "position": POSITIONS,
    "rope_style": ROPE_STYLES,
    "activation": ACTIVATIONS,
    "norm": NORMS,
    "mlp": MLPS,
    "lm_head": LM_HEADS,
    "positions_from": POSITIONS_FROM,
    "branch_norm": BRANCH_NORMS,
}
# Scalars of the block and the model (Gemma, Granite): a value of 1 (or None) is off and costs nothing.
POSITIVE_SCALARS = ("embedding_multiplier", "residual_multiplier", "logits_scaling")


@dataclass(frozen=True)
class TransformerConfig(_DictMixin):
    """The architecture, read by both twins; the defaults are lesson 08's 6 x 512 encoder.

    `position` selects where position enters: added at the input ("sinusoidal", "learned"), rotating q and k
    ("rope"), biasing the attention scores ("alibi"), or nowhere ("none"). `activation` names the GELU variant
    explicitly: "gelu" is the exact erf form (torch.nn.GELU()), "gelu_tanh" the tanh approximation. `causal`
    masks future keys (a decoder-only stack); `norm_first` chooses pre-LN (lesson 08) or post-LN. How the Flax
    side computes (dtypes, scanned layers, the attention kernel) is `FlaxConfig`'s, not this config's.

    Decoder families (docs/models.md): `n_kv_heads` K < N is grouped-query attention (query head n reads kv head
    n // (N / K)); `norm` "rmsnorm" (Zhang & Sennrich, 2019) replaces LayerNorm; `mlp` "gated" is
    down(act(gate(x)) * up(x)) (Shazeer, 2020: SwiGLU with activation "silu", GeGLU with "gelu"/"gelu_tanh");
    `bias` switches every bias, and `qkv_bias`, `out_bias`, `mlp_bias`, `norm_bias` (None: follow `bias`) each
    one group; `parallel_residual` computes x + attn(n1(x)) + mlp(n2(x)) from the same x (one shared norm when
    `parallel_shared_norm`); `sliding_window` W lets query i see keys i - W < j <= i (with `causal`);
    `alibi_max_bias` is the 8 of ALiBi's slopes 2^(-8h/N); `lm_head` "untied" adds its own (V, D) output
    matrix (with a bias if `lm_head_bias`) instead of reusing the embedding; `type_vocab_size` > 0 adds BERT's
    token-type embeddings at the input.

    Norm variants and scalars: `norm_offset` c scales every norm's output by (c + w), w stored as it is and
    initialised to 1 - c (Gemma's x * (1 + w): c = 1); `branch_norm` "sandwich" normalises each branch's output
    before its residual add, beside the pre-norms (Gemma 2 / 3), "post" instead of them (OLMo 2); Granite's
    `embedding_multiplier` and `residual_multiplier` scale the token embeddings and each branch's output, its
    `logits_scaling` divides the logits, and Gemma 2's `final_logit_softcap` c caps them to c tanh(logits / c).

    The next families' attention (rules in `flax_impl.attention_config`, meanings in docs/models.md): `head_dim`
    (None: D / N), `qk_norm`, `query_pre_attn_scalar` / `attention_multiplier` (the factor on q.k),
    `attn_logit_softcap`; per layer `layer_types` (which layers have the window), `rope_layers` (which rotate),
    `rope_local_base` (the sliding layers' own RoPE base); `rope_type` and its `rope_*` parameters
    (`flax_impl.rope`). Sequence fields are stored as tuples.

    Positions (what the sinusoidal / learned rows and RoPE are taken at) when a forward is given none:
    `positions_from` "index" counts slots, p = 0 .. L - 1 (transformers' default); "mask" counts real tokens,
    p = cumsum(attention_mask) - 1 (OPT); "tokens" counts tokens that are not `padding_idx`, p = cumsum(ids !=
    padding_idx) - 1 (RoBERTa); `position_offset` is added to each (OPT 2, RoBERTa padding_idx + 1), and a padded
    token gets position_offset - 1 (at least 0). Cached decoding always counts real tokens from position_offset
    (as transformers' generate). A table of learned positions has `max_len` rows, the offset included.

    Raises:
        ArgumentTypeError: a field of the wrong type (module docstring).
        ValueError: a field out of its range or set, or two fields that do not fit together (n_heads must divide
            d_model, sliding_window needs causal, ...).

    Example:
        >>> cfg = TransformerConfig.from_dict({"d_model": 256, "n_heads": 4, "n_layers": 2})
        >>> cfg.head_dim
        64
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
    norm_eps: float = 1e-5
    causal: bool = False
    padding_idx: int | None = None
    input_norm: bool = False
    final_norm: bool = True
    embed_scale: bool = False
    bias: bool = True
    n_kv_heads: int | None = None  # None -> n_heads
    norm: str = "layernorm"
    mlp: str = "plain"
    qkv_bias: bool | None = None  # None -> bias (likewise the three below)
    out_bias: bool | None = None
    mlp_bias: bool | None = None
    norm_bias: bool | None = None
    parallel_residual: bool = False
    parallel_shared_norm: bool = True
    sliding_window: int | None = None
    alibi_max_bias: float = 8.0
    lm_head: str = "tied"
    lm_head_bias: bool = False
    type_vocab_size: int = 0
    positions_from: str = "index"
    position_offset: int = 0
    norm_offset: float = 0.0
    branch_norm: str = "none"
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    final_logit_softcap: float | None = None
    # Attention and RoPE per family (rules: flax_impl.attention_config; meanings: docs/models.md).
    head_dim: int | None = None  # None -> d_model // n_heads
    qk_norm: str = "none"
    query_pre_attn_scalar: float | None = None  # scores q.k / sqrt(this) instead of / sqrt(head_dim)
    attention_multiplier: float | None = None  # scores q.k * this instead of / sqrt(head_dim)
    attn_logit_softcap: float | None = None  # scores cap * tanh(scores / cap) before the mask
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"; None: all alike
    rope_layers: tuple[bool, ...] | None = None  # per layer: does it rotate q and k; None: every layer
    rope_local_base: float | None = None  # sliding layers: plain RoPE of this base; None: as the other layers
    rope_type: str = "linear"
    rope_original_max_len: int | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float | None = None  # None: the rope_type's own (yarn, longrope)
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Types and ranges first, each field on its own (flax_impl.validation), then the rules between fields.
        _set = functools.partial(object.__setattr__, self)
        for name in TRANSFORMER_BOOLS:
            _set(name, check_bool(name, getattr(self, name)))
        for name in BIAS_SWITCHES:
            value = check_bool(name, getattr(self, name), none_ok=True)
            _set(name, self.bias if value is None else value)
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_len"):
            _set(name, check_int(name, getattr(self, name), low=1))
        kv = check_int("n_kv_heads", self.n_kv_heads, low=1, none_ok=True)
        _set("n_kv_heads", self.n_heads if kv is None else kv)
        _set("sliding_window", check_int("sliding_window", self.sliding_window, low=1, none_ok=True))
        _set("type_vocab_size", check_int("type_vocab_size", self.type_vocab_size, low=0))
        _set("position_offset", check_int("position_offset", self.position_offset, low=0))
        _set("padding_idx", check_int("padding_idx", self.padding_idx, low=0, high=self.vocab_size, none_ok=True))
        _set("dropout", check_float("dropout", self.dropout, low=0.0, high=1.0))
        drop = check_float("attention_dropout", self.attention_dropout, low=0.0, high=1.0, none_ok=True)
        _set("attention_dropout", self.dropout if drop is None else drop)
        _set("rope_base", check_float("rope_base", self.rope_base, low=1.0, low_open=True))
        _set("rope_fraction", check_float("rope_fraction", self.rope_fraction, low=0.0, high=1.0, low_open=True))
        for name in ("rope_scale", "norm_eps", "alibi_max_bias", *POSITIVE_SCALARS):
            _set(name, check_float(name, getattr(self, name), low=0.0, low_open=True))
        _set("norm_offset", check_float("norm_offset", self.norm_offset))
        cap = check_float("final_logit_softcap", self.final_logit_softcap, low=0.0, low_open=True, none_ok=True)
        _set("final_logit_softcap", cap)
        for name, allowed in TRANSFORMER_CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.sliding_window is not None and not self.causal:
            raise ValueError(f"sliding_window={self.sliding_window} needs causal=True (a window of past keys)")
        if self.parallel_residual and not self.norm_first:
            raise ValueError("parallel_residual=True needs norm_first=True (both branches read the normalised input)")
        if self.branch_norm != "none" and (self.parallel_residual or not self.norm_first):
            raise ValueError(
                f"branch_norm={self.branch_norm!r} normalises each branch's output before its residual add: it needs "
                f"norm_first=True and parallel_residual=False, got norm_first={self.norm_first}, "
                f"parallel_residual={self.parallel_residual}"
            )
        if self.lm_head_bias and self.lm_head != "untied":
            raise ValueError("lm_head_bias=True needs lm_head='untied' (a tied head reuses the embedding, no bias)")
        if self.positions_from == "tokens" and self.padding_idx is None:
            raise ValueError("positions_from='tokens' counts the tokens that are not padding_idx: set padding_idx")
        check_attention_fields(self, _set)
        if self.position == "rope":
            rotated = rope_width(self.head_dim, self.rope_fraction)
            if rotated % 2 or rotated == 0:
                raise ValueError(
                    f"RoPE rotates pairs: rotated width {rotated} (head_dim={self.head_dim} x "
                    f"rope_fraction={self.rope_fraction}) must be even and > 0"
                )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """Build from a dict; an unknown key raises ValueError naming it (a Flax-only key names FlaxConfig)."""
        flax_only = sorted(set(d) & {f.name for f in dataclasses.fields(FlaxConfig)})
        if flax_only:
            raise ValueError(
                f"{flax_only} are Flax execution settings, not architecture: pass them as FlaxConfig(...) "
                "(flax_config=...) to the Flax module"
            )
        return super().from_dict(d)

    def replace(self, **changes: Any) -> TransformerConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys {unknown}")
        if "dropout" in changes and "attention_dropout" not in changes:
            changes["attention_dropout"] = None if self.attention_dropout == self.dropout else self.attention_dropout
        if "bias" in changes:  # a switch that followed `bias` keeps following it
            for name in BIAS_SWITCHES:
                if name not in changes and getattr(self, name) == self.bias:
                    changes[name] = None
        if "n_heads" in changes and "n_kv_heads" not in changes and self.n_kv_heads == self.n_heads:
            changes["n_kv_heads"] = None
        if {"d_model", "n_heads"} & set(changes) and "head_dim" not in changes:  # a derived H follows D / N
            if self.head_dim * self.n_heads == self.d_model:
                changes["head_dim"] = None
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FlaxConfig(_DictMixin):
    """How the Flax side computes; torch_ref reads none of it (it follows its tensors' dtypes).

    `dtype` is the compute dtype, `param_dtype` the storage dtype. `scan_layers` stacks the blocks' parameters on
    a leading (n_layers,) axis and applies them with `nnx.scan` (compile time flat in depth); `scan_unroll` puts
    that many layers in each iteration of the scanned loop (n_layers unrolls it fully, so XLA sees every layer;
    compile time then grows with depth); `remat` recomputes each block in the backward pass. `attention_impl`
    picks the attention kernel (same results to float32 rounding): "einsum" (the chunked softmax of
    `flax_impl._kernels.attention`), "dot_product_attention" (`jax.nn.dot_product_attention`, its default XLA
    implementation, no attention dropout), or "auto": the latter on GPU/TPU when no attention dropout is active,
    else "einsum".

    Raises:
        ArgumentTypeError: a field of the wrong type.
        ValueError: an unknown dtype or attention_impl, or scan_unroll < 1.

    Example:
        >>> FlaxConfig(dtype="bfloat16", scan_layers=False).param_dtype
        'float32'
    """

    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    scan_unroll: int = 1
    remat: bool = False
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("dtype", "param_dtype"):
            check_choice(name, getattr(self, name), DTYPES)
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        object.__setattr__(self, "scan_unroll", check_int("scan_unroll", self.scan_unroll, low=1))
        for name in ("scan_layers", "remat"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))

    def replace(self, **changes: Any) -> FlaxConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown FlaxConfig keys {unknown}")
        return dataclasses.replace(self, **changes)


def as_config(config: object) -> TransformerConfig:
    """A module's `config` argument: a TransformerConfig as it is, a dict through `from_dict`.

    Raises:
        ArgumentTypeError: anything else (a TypeError naming `config` and its type).
        ValueError: a dict with unknown keys or bad values.
    """
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    if not isinstance(config, TransformerConfig):
        raise ArgumentTypeError(
            f"config={config!r:.60} must be a TransformerConfig or a dict, got {type(config).__name__}"
        )
    return config


def as_flax_config(flax_config: object) -> FlaxConfig:
    """A Flax module's `flax_config` argument: None -> FlaxConfig(), a FlaxConfig as it is.

    Raises:
        ArgumentTypeError: anything else.
    """
    if flax_config is None:
        return FlaxConfig()
    if not isinstance(flax_config, FlaxConfig):
        raise ArgumentTypeError(
            f"flax_config={flax_config!r:.60} must be a FlaxConfig or None, got {type(flax_config).__name__}"
        )
    return flax_config


def rope_width(head_dim: int, fraction: float) -> int:
    """Number of leading head dims RoPE rotates: int(fraction * head_dim)."""
    return int(round(fraction * head_dim))


@dataclass(frozen=True)
class TrainConfig(_DictMixin):
    """Optimiser hyper-parameters shared by `flax_impl.train` (optax) and `torch_ref.train` (torch.optim).

    AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay: p <- p - lr_t * (m_hat / (sqrt(v_hat) + eps)
    + weight_decay * p), eps outside the square root, bias-corrected moments, on both sides. `weight_decay`
    defaults to torch's 0.01 and is passed explicitly to optax.adamw (whose own default is 1e-4). Learning rate:
    linear warmup 0 -> `learning_rate` over `warmup_steps`, then cosine decay to `end_lr_ratio * learning_rate`
    at `total_steps` (and constant after). Gradients are clipped to global norm `clip_norm` (None = off) before
    AdamW. `mask_prob` is the fraction of tokens the masked-token objective predicts.

    Raises:
        ArgumentTypeError: a field of the wrong type.
        ValueError: a field out of range (learning_rate, eps, clip_norm > 0; b1, b2 in [0, 1); end_lr_ratio in
            [0, 1]; mask_prob in (0, 1]; total_steps > warmup_steps >= 0), or not finite.
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        _set = functools.partial(object.__setattr__, self)
        _set("warmup_steps", check_int("warmup_steps", self.warmup_steps, low=0))
        _set("total_steps", check_int("total_steps", self.total_steps, low=1))
        if self.total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps={self.total_steps} must be > warmup_steps={self.warmup_steps}")
        for name in ("learning_rate", "eps"):
            _set(name, check_float(name, getattr(self, name), low=0.0, low_open=True))
        _set("clip_norm", check_float("clip_norm", self.clip_norm, low=0.0, low_open=True, none_ok=True))
        _set("weight_decay", check_float("weight_decay", self.weight_decay, low=0.0))
        _set("end_lr_ratio", check_float("end_lr_ratio", self.end_lr_ratio, low=0.0, high=1.0))
        for name in ("b1", "b2"):
            _set(name, check_float(name, getattr(self, name), low=0.0, high=1.0, high_open=True))
        _set("mask_prob", check_float("mask_prob", self.mask_prob, low=0.0, high=1.0, low_open=True))
