"""The Llama-family tables (llama, mistral, qwen2): RoPE "half" pairs (rotate_half), RMSNorm, SwiGLU MLP,
grouped-query attention, separate q/k/v projections (the "qkv_concat" layout), optional untied LM head.

Defaults are the transformers config classes' own (checked in parity_tests/test_hf.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.converters import ACTIVATION, TIE, head_dim_field, size_fields
from flax_impl.hf.rope_params import YARN_MSCALE, rope_fields
from flax_impl.hf.spec import COMMON_IGNORED, Convert, Derived, Family, Field, Key, Require, Unsupported

FIXED = dict(
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
        *size_fields(vocab_size=d["vocab_size"], hidden_size=4096, intermediate_size=d["intermediate_size"],
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=d["num_key_value_heads"],
                     kv_kind="int?"),  # fmt: skip
        Field("hidden_act", "activation", "silu", ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", d["max_position_embeddings"], kind="int"),
        Field("rms_norm_eps", "norm_eps", 1e-6, kind="float"),
        Field("tie_word_embeddings", "lm_head", False, TIE, kind="bool"),
        *rope_fields(),
        head_dim_field(),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float?"),
        Field("pad_token_id", "padding_idx", None, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
    )


FULL_ROTARY = Require(
    "rope_parameters.partial_rotary_factor",
    None,
    (None, 1, 1.0),
    why="these families rotate the whole head (partial rotary is not part of their modeling code)",
    kind="float?",
)
_REQUIRE = (FULL_ROTARY, *YARN_MSCALE)

# The weight table in two runs that Gemma 2's sandwich block (gemma_qwen3.py) shares around norms of its own: the
# embedding, the pre-attention norm and the attention projections; the gated MLP, the final norm and the head.
ATTENTION_KEYS = (
    Key("embed_tokens.weight", "input.embed.weight"),
    Key("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
    Key("layers.{i}.self_attn.{part}_proj.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat", ("q", "k", "v")),
    Key("layers.{i}.self_attn.o_proj.{p}", "blocks.{i}.attn.out_proj.{p}"),
)
MLP_HEAD_KEYS = (
    Key("layers.{i}.mlp.gate_proj.{p}", "blocks.{i}.ff.gate.{p}"),
    Key("layers.{i}.mlp.up_proj.{p}", "blocks.{i}.ff.up.{p}"),
    Key("layers.{i}.mlp.down_proj.{p}", "blocks.{i}.ff.down.{p}"),
    Key("norm.weight", "final_norm.weight"),
    Key("lm_head.weight", "lm_head.weight", base=False),
)
KEYS = (*ATTENTION_KEYS, Key("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight"), *MLP_HEAD_KEYS)
# Older checkpoints store each layer's RoPE inverse frequencies, a buffer computed from the config.
IGNORE = (r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

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
    fixed=dict(FIXED, sliding_window=None),
    require=_REQUIRE,
    keys=KEYS,
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED + ("pretraining_tp",),  # unused by transformers 5 (4: sliced matmuls, same sums)
)

# Granite: Llama with four scalars: embeddings x embedding_multiplier, each branch's output x residual_multiplier
# before its residual add, scores q.k x attention_multiplier (instead of / sqrt(H)), logits / logits_scaling.
_FLOAT = Convert("a number", lambda v, hf: float(v), lambda v, cfg: v)
GRANITE = dataclasses.replace(
    LLAMA,
    model_type="granite",
    architecture="GraniteForCausalLM",
    config=LLAMA.config
    + tuple(
        Field(name, name, 1.0, _FLOAT, kind="float")
        for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    ),
    ignored_hf=COMMON_IGNORED,
)

MISTRAL = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    prefix="model.",
    config=_common(
        dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32)
    )
    + (Field("sliding_window", "sliding_window", 4096, kind="int?"),),  # query i sees keys i - W < j <= i
    fixed=dict(FIXED, qkv_bias=False, out_bias=False, mlp_bias=False),
    require=_REQUIRE,
    keys=KEYS,
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED,
)


def _qwen2_types(window: Any, hf: Mapping[str, Any]) -> list[str]:
    """Qwen2Config's layer types: `layer_types`, else "sliding_attention" from max_window_layers on when
    use_sliding_window (its __post_init__); a sliding layer without a window attends fully."""
    n = hf["num_hidden_layers"]
    types = hf["layer_types"] or [
        "sliding_attention" if window is not None and i >= hf["max_window_layers"] else "full_attention"
        for i in range(n)
    ]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise Unsupported(f"layer types {unknown}: each must be 'full_attention' or 'sliding_attention'")
    if len(types) != n:
        raise Unsupported(f"layer_types has {len(types)} entries for {n} layers")
    return list(types)


def _qwen2_window_to_ours(window: Any, hf: Mapping[str, Any]) -> int | None:
    """sliding_window counts only with use_sliding_window, and only where a layer is "sliding_attention"."""
    window = window if hf["use_sliding_window"] else None
    return window if window is not None and "sliding_attention" in _qwen2_types(window, hf) else None


def _qwen2_types_to_ours(v: Any, hf: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Per-layer kinds where they differ (None: every layer alike, which sliding_window then says)."""
    window = _qwen2_window_to_ours(hf["sliding_window"], hf)
    types = _qwen2_types(window, hf)
    return None if window is None or len(set(types)) == 1 else tuple(types)


def _qwen2_types_to_hf(v: tuple[str, ...] | None, cfg: TransformerConfig) -> list[str]:
    return list(v) if v is not None else [
        "full_attention" if cfg.sliding_window is None else "sliding_attention"
    ] * cfg.n_layers


_QWEN2_READS = {
    "use_sliding_window": (False, "bool"),
    "max_window_layers": (28, "int"),
    "layer_types": (None, "list[str]?"),
    "num_hidden_layers": (32, "int"),
    "sliding_window": (4096, "int?"),
}
_QWEN2_WINDOW = Convert(
    "Qwen2 sliding window (use_sliding_window, layer_types)", _qwen2_window_to_ours, lambda v, cfg: v,
    reads=_QWEN2_READS,
)  # fmt: skip
QWEN2_LAYER_TYPES = Field(
    "layer_types", "layer_types", None,
    Convert("layer_types (sliding from max_window_layers on)", _qwen2_types_to_ours, _qwen2_types_to_hf,
            reads=_QWEN2_READS),
    kind="list[str]?",
)  # fmt: skip
QWEN2_WINDOW = Field("sliding_window", "sliding_window", 4096, _QWEN2_WINDOW, kind="int?")
QWEN2_DERIVED = (
    Derived("use_sliding_window", lambda c: c.sliding_window is not None),
    Derived("max_window_layers", lambda c: 0),
)


QWEN2 = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    prefix="model.",
    config=_common(
        dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, max_position_embeddings=32768)
    )
    + (QWEN2_WINDOW, QWEN2_LAYER_TYPES),
    fixed=dict(FIXED, qkv_bias=True, out_bias=False, mlp_bias=False),  # Qwen2Attention: biases on q, k, v only
    require=_REQUIRE,
    derived=QWEN2_DERIVED,
    keys=KEYS,
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED,
)
