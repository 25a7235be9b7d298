"""The Llama-family tables (llama, mistral, qwen2): RoPE "half" pairs (rotate_half), RMSNorm, SwiGLU MLP,
grouped-query attention, separate q/k/v projections (the "qkv_concat" layout), optional untied LM head.

Defaults are the transformers config classes' own (checked in parity_tests/test_hf.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.spec import (
    ACTIVATION,
    COMMON_IGNORED,
    ROPE_LINEAR_FACTOR,
    TIE,
    Convert,
    Derived,
    Family,
    Field,
    Key,
    Require,
    Unsupported,
    head_dim_check,
    kv_heads,
)

_FIXED = dict(
    position="rope",
    rope_style="half",  # rotate_half pairs x[i] with x[i + H/2]
    rope_fraction=1.0,
    norm="rmsnorm",  # weight * x / sqrt(mean(x^2) + eps), in float32
    norm_bias=False,
    mlp="gated",  # down(silu(gate(x)) * up(x))
    norm_first=True,
    final_norm=True,
    input_norm=False,
    causal=True,
    embed_scale=False,
    dropout=0.0,  # no residual or embedding dropout in these families
    lm_head_bias=False,
    parallel_residual=False,
    type_vocab_size=0,
)


def _common(defaults: Mapping[str, Any]) -> tuple[Field, ...]:
    """The Fields the three families share; `defaults` holds each class's own defaults for them."""
    d = defaults
    return (
        Field("vocab_size", "vocab_size", d["vocab_size"], kind="int"),
        Field("hidden_size", "d_model", 4096, kind="int"),
        Field("intermediate_size", "d_ff", d["intermediate_size"], kind="int"),
        Field("num_hidden_layers", "n_layers", 32, kind="int"),
        Field("num_attention_heads", "n_heads", 32, kind="int"),
        Field(
            "num_key_value_heads", "n_kv_heads", d["num_key_value_heads"], kv_heads("num_attention_heads"), kind="int?"
        ),
        Field("hidden_act", "activation", "silu", ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", d["max_position_embeddings"], kind="int"),
        Field("rms_norm_eps", "norm_eps", 1e-6, kind="float"),
        Field("tie_word_embeddings", "lm_head", False, TIE, kind="bool"),
        Field("rope_parameters.rope_theta", "rope_base", 10_000.0, kind="float"),
        Field("rope_parameters.factor", "rope_scale", 1.0, ROPE_LINEAR_FACTOR, omit_default=True, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float?"),
        Field("pad_token_id", "padding_idx", None, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
    )


_REQUIRE = (
    Require(
        "rope_parameters.rope_type",
        "default",
        ("default", "linear"),
        why="only plain RoPE and linear position interpolation are implemented (not dynamic/yarn/llama3/longrope)",
        kind="str",
    ),
    Require(
        "rope_parameters.partial_rotary_factor",
        None,
        (None, 1, 1.0),
        why="these families rotate the whole head (partial rotary is not part of their modeling code)",
        kind="float?",
    ),
)
_HEAD_DIM = Require(
    "head_dim",
    None,
    check=head_dim_check("hidden_size", "num_attention_heads"),
    why="a head_dim other than hidden_size / num_attention_heads is not implemented",
    kind="int?",
)
_DERIVED = (
    Derived("head_dim", lambda c: c.head_dim),
    Derived("rope_parameters.rope_type", lambda c: "linear" if c.rope_scale != 1.0 else "default"),
)

_KEYS = (
    Key("embed_tokens.weight", "input.embed.weight"),
    Key("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
    Key("layers.{i}.self_attn.{part}_proj.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat", ("q", "k", "v")),
    Key("layers.{i}.self_attn.o_proj.{p}", "blocks.{i}.attn.out_proj.{p}"),
    Key("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight"),
    Key("layers.{i}.mlp.gate_proj.{p}", "blocks.{i}.ff.gate.{p}"),
    Key("layers.{i}.mlp.up_proj.{p}", "blocks.{i}.ff.up.{p}"),
    Key("layers.{i}.mlp.down_proj.{p}", "blocks.{i}.ff.down.{p}"),
    Key("norm.weight", "final_norm.weight"),
    Key("lm_head.weight", "lm_head.weight", base=False),
)
# Older checkpoints store each layer's RoPE inverse frequencies, a buffer computed from the config.
_IGNORE = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    prefix="model.",
    config=_common(
        dict(vocab_size=32000, intermediate_size=11008, num_key_value_heads=None, max_position_embeddings=2048)
    )
    + (
        Field("attention_bias", "qkv_bias", False, kind="bool"),
        Field("attention_bias", "out_bias", False, kind="bool"),  # one switch for q, k, v and o in LlamaAttention
        Field("mlp_bias", "mlp_bias", False, kind="bool"),
    ),
    fixed=dict(_FIXED, sliding_window=None),
    require=(*_REQUIRE, _HEAD_DIM),
    derived=_DERIVED,
    keys=_KEYS,
    ignore=_IGNORE,
    ignored_hf=COMMON_IGNORED + ("pretraining_tp",),  # unused by transformers 5 (4: sliced matmuls, same sums)
)

MISTRAL = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    prefix="model.",
    config=_common(
        dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32)
    )
    + (Field("sliding_window", "sliding_window", 4096, kind="int?"),),  # query i sees keys i - W < j <= i
    fixed=dict(_FIXED, qkv_bias=False, out_bias=False, mlp_bias=False),
    require=(*_REQUIRE, _HEAD_DIM),
    derived=_DERIVED,
    keys=_KEYS,
    ignore=_IGNORE,
    ignored_hf=COMMON_IGNORED,
)


def _qwen2_window_to_ours(window: Any, hf: Mapping[str, Any]) -> int | None:
    """Qwen2Config: sliding_window counts only with use_sliding_window, and only on the layers whose layer_type
    is "sliding_attention" (by default those at index >= max_window_layers). We hold one window for all layers."""
    window = window if hf["use_sliding_window"] else None
    n = hf["num_hidden_layers"]
    types = hf["layer_types"] or [
        "sliding_attention" if window is not None and i >= hf["max_window_layers"] else "full_attention"
        for i in range(n)
    ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise Unsupported(f"layer types {unknown}: each must be 'full_attention' or 'sliding_attention'")
    per_layer = {window if t == "sliding_attention" else None for t in types} or {window}
    if len(per_layer) > 1:
        raise Unsupported(f"layers mix full and sliding-window attention (layer_types {types}); one window for all")
    return per_layer.pop()


_QWEN2_WINDOW = Convert(
    "Qwen2 sliding window (use_sliding_window, layer_types)",
    _qwen2_window_to_ours,
    lambda v, cfg: v,
    reads={
        "use_sliding_window": (False, "bool"),
        "max_window_layers": (28, "int"),
        "layer_types": (None, "list[str]?"),
        "num_hidden_layers": (32, "int"),
    },
)


def _qwen2_layer_types(cfg: TransformerConfig) -> list[str]:
    return ["full_attention" if cfg.sliding_window is None else "sliding_attention"] * cfg.n_layers


QWEN2 = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    prefix="model.",
    config=_common(
        dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, max_position_embeddings=32768)
    )
    + (Field("sliding_window", "sliding_window", 4096, _QWEN2_WINDOW, kind="int?"),),
    fixed=dict(_FIXED, qkv_bias=True, out_bias=False, mlp_bias=False),  # Qwen2Attention: biases on q, k, v only
    require=(*_REQUIRE, _HEAD_DIM),  # Qwen2Attention reads head_dim when config.json has one
    derived=(
        _DERIVED[1],
        Derived("use_sliding_window", lambda c: c.sliding_window is not None),
        Derived("max_window_layers", lambda c: 0),
        Derived("layer_types", _qwen2_layer_types),
    ),
    keys=_KEYS,
    ignore=_IGNORE,
    ignored_hf=COMMON_IGNORED,
)
