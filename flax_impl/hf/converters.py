"""Converters, Fields and checks the family tables share (`flax_impl.hf.spec` for the vocabulary): activation
names, tied heads, the sizes under transformers' standard names, widths written as multiples, kv heads, RoPE
settings (base, linear factor, partial rotary) and the head_dim check.

Axes: D model width, N heads, K kv heads, H head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from flax_impl.config import TransformerConfig, rope_width
from flax_impl.hf.spec import Convert, Field, Require, Unsupported, choice

# Hugging Face activation names (transformers.activations.ACT2CLS) -> ours. gelu_new, gelu_fast and
# gelu_pytorch_tanh are the same tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))); "gelu" is exact erf.
ACTIVATION_NAMES = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "swish": "silu",
}
ACTIVATION = choice("activation", ACTIVATION_NAMES)
# The same, writing the tanh GELU back as "gelu_pytorch_tanh" (GPT-BigCode's and StarCoder2's default): torch's
# fused tanh GELU and the Python formula of "gelu_new" differ by roundoff, so the saved folder must name the kernel
# the checkpoint came with for transformers to reload it with the same outputs.
ACTIVATION_PYTORCH_TANH = choice("activation", {"gelu_pytorch_tanh": "gelu_tanh", **ACTIVATION_NAMES})

TIE = Convert("tie_word_embeddings", lambda v, hf: "tied" if v else "untied", lambda v, cfg: v == "tied")


def width_times(factor: int, width_key: str) -> Convert:
    """F = factor x D where transformers hard-codes the MLP width (BLOOM, MPT); on save d_ff must be that."""

    def to_hf(v: int, cfg: TransformerConfig) -> int:
        if v != factor * cfg.d_model:
            raise Unsupported(f"the MLP width is fixed at {factor} x d_model = {factor * cfg.d_model}")
        return cfg.d_model

    return Convert(f"{factor} x {width_key}", lambda v, hf: factor * int(v), to_hf)


def inner_or_4d(width_key: str) -> Convert:
    """GPT-2's n_inner: None means 4 x n_embd."""

    def to_ours(v: Any, hf: Mapping[str, Any]) -> int:
        return 4 * int(hf[width_key]) if v is None else int(v)

    return Convert(f"n_inner (None = 4 x {width_key})", to_ours, lambda v, cfg: v)


def kv_heads(heads_key: str) -> Convert:
    """num_key_value_heads K: None means K = N (plain multi-head attention)."""

    def to_ours(v: Any, hf: Mapping[str, Any]) -> int:
        return int(hf[heads_key]) if v is None else int(v)

    return Convert("num_key_value_heads (None = N)", to_ours, lambda v, cfg: v)


def size_fields(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int | None,
    kv_kind: str,
) -> tuple[Field, ...]:
    """The sizes under transformers' standard names, in this order: vocab_size -> vocab_size, hidden_size ->
    d_model, intermediate_size -> d_ff, num_hidden_layers -> n_layers, num_attention_heads -> n_heads,
    num_key_value_heads -> n_kv_heads (null: as many as heads, `kv_heads`).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads:
            the config class's default for each key.
        kv_kind: the JSON kind of num_key_value_heads: "int?" where the config class accepts null, else "int".

    Returns:
        The six Fields.
    """
    return (
        Field("vocab_size", "vocab_size", vocab_size, kind="int"),
        Field("hidden_size", "d_model", hidden_size, kind="int"),
        Field("intermediate_size", "d_ff", intermediate_size, kind="int"),
        Field("num_hidden_layers", "n_layers", num_hidden_layers, kind="int"),
        Field("num_attention_heads", "n_heads", num_attention_heads, kind="int"),
        Field("num_key_value_heads", "n_kv_heads", num_key_value_heads, kv_heads("num_attention_heads"), kind=kv_kind),
    )


def _linear_factor(v: Any, hf: Mapping[str, Any]) -> float:
    return float(v) if hf["rope_parameters.rope_type"] == "linear" else 1.0


# rope_parameters.factor is our rope_scale only under rope_type "linear" (positions divided by it).
ROPE_LINEAR_FACTOR = Convert(
    "factor of rope_type 'linear'",
    _linear_factor,
    lambda v, cfg: v,
    reads={"rope_parameters.rope_type": ("default", "str")},
)


def head_dim_check(hidden_key: str, heads_key: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    """head_dim must be None or hidden_size / num_attention_heads (ours is always D / N). With N < 1 the check
    passes: TransformerConfig refuses N itself, naming it."""
    return lambda v, hf: v is None or hf[heads_key] < 1 or v == hf[hidden_key] // hf[heads_key]


def linear_rope_fields(theta: float = 10_000.0) -> tuple[Field, Field]:
    """rope_parameters.rope_theta -> rope_base and the linear factor -> rope_scale (transformers 4's top-level
    rope_theta / rope_scaling are read into rope_parameters first, as transformers does), for a family that refuses
    the other RoPE types (`ROPE_TYPE`); `flax_impl.hf.rope_params.rope_fields` maps every type."""
    return (
        Field("rope_parameters.rope_theta", "rope_base", theta, kind="float"),
        Field("rope_parameters.factor", "rope_scale", 1.0, ROPE_LINEAR_FACTOR, omit_default=True, kind="float"),
    )


ROPE_TYPE = Require(
    "rope_parameters.rope_type",
    "default",
    ("default", "linear"),
    why="only plain RoPE and linear position interpolation are implemented (not dynamic/yarn/llama3/longrope)",
    kind="str",
)


def head_dim_require(hidden_key: str, heads_key: str, default: int | None = None) -> Require:
    """A config.json head_dim must be null or hidden / heads (ours is always D / N); `default`: the config
    class's (None: hidden / heads)."""
    return Require(
        "head_dim",
        default,
        check=head_dim_check(hidden_key, heads_key),
        why="a head_dim other than hidden_size / num_attention_heads is not implemented",
        kind="int?",
    )


def _head_dim(hf: Mapping[str, Any], hidden_key: str, heads_key: str) -> int:
    """H: config.json's head_dim where the table reads one and it is set, else hidden / heads."""
    if hf.get("head_dim") is not None:
        return int(hf["head_dim"])
    return int(hf[hidden_key]) // max(int(hf[heads_key]), 1)


def head_dim_field(default: int | None = None) -> Field:
    """config.json head_dim (null: hidden_size / num_attention_heads, as the attention classes read it) <->
    head_dim; always written on save."""
    return Field("head_dim", "head_dim", default, Convert("head_dim (null = D / N)", lambda v, hf: v,
                                                         lambda v, cfg: cfg.head_dim), kind="int?")  # fmt: skip


def _fraction_for(rotated: int, H: int) -> float:
    """The float f nearest rotated / H with int(H * f) == rotated (transformers truncates H * f)."""
    f = rotated / H
    while int(H * f) < rotated:
        f = math.nextafter(f, 2.0)
    return f


def rotary_fraction(hidden_key: str, heads_key: str) -> Convert:
    """partial_rotary_factor f -> rope_fraction: transformers rotates int(H * f) dims (truncated), so ours is
    that width over H exactly; on save the fraction that gives the same width back. `hidden_key` and `heads_key`
    must be keys the family's Fields name."""

    def to_ours(v: Any, hf: Mapping[str, Any]) -> float:
        H = _head_dim(hf, hidden_key, heads_key)
        if not 0 < v <= 1:
            raise Unsupported("the fraction of head dims rotated must be in (0, 1]")
        return max(int(H * v), 1) / max(H, 1)

    def to_hf(v: float, cfg: TransformerConfig) -> float:
        return _fraction_for(rope_width(cfg.head_dim, v), cfg.head_dim)

    return Convert("partial_rotary_factor (int(H x f) dims rotated)", to_ours, to_hf)


def partial_rotary_field(default: float) -> Field:
    """rope_parameters.partial_rotary_factor (`default`: the config class's) -> rope_fraction, through
    `rotary_fraction` over hidden_size / num_attention_heads."""
    return Field(
        "rope_parameters.partial_rotary_factor",
        "rope_fraction",
        default,
        rotary_fraction("hidden_size", "num_attention_heads"),
        kind="float",
    )


def rotary_dims(hidden_key: str, heads_key: str) -> Convert:
    """GPT-J / CodeGen rotary_dim r (dims rotated per head) -> rope_fraction r / H (`hidden_key`, `heads_key` as
    in `rotary_fraction`)."""

    def to_ours(v: Any, hf: Mapping[str, Any]) -> float:
        H = _head_dim(hf, hidden_key, heads_key)
        if v is None or not 0 < v <= H or v % 2:
            raise Unsupported(f"rotary_dim must be an even number of dims in (0, head_dim={H}]")
        return v / H

    def to_hf(v: float, cfg: TransformerConfig) -> int:
        return rope_width(cfg.head_dim, v)

    return Convert("rotary_dim (dims rotated per head)", to_ours, to_hf)


def plus(offset: int, what: str) -> Convert:
    """Ours = the HF value + offset (OPT's learned table has 2 rows more than max_position_embeddings)."""
    return Convert(f"{what} + {offset}", lambda v, hf: int(v) + offset, lambda v, cfg: v - offset)

