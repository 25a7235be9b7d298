"""Llama's neighbours: gemma (Gemma 1: the (1 + w) RMSNorm, embeddings x sqrt(D), GeGLU with the tanh GELU), phi3
(fused qkv_proj and gate_up_proj, partial rotary, a sliding window) and starcoder2 (LayerNorm with biases, a plain
MLP, biases by one switch, a sliding window). Separate or fused q/k/v, RoPE "half" pairs."""

from __future__ import annotations

from flax_impl.hf.converters import (
    ACTIVATION,
    ACTIVATION_NAMES,
    ACTIVATION_PYTORCH_TANH,
    ROPE_TYPE,
    TIE,
    head_dim_field,
    partial_rotary_field,
    size_fields,
)
from flax_impl.hf.families.llama import FIXED, FULL_ROTARY, IGNORE, KEYS
from flax_impl.hf.rope_params import YARN_MSCALE, rope_fields
from flax_impl.hf.spec import COMMON_IGNORED, Derived, Family, Field, Key, Require, choice

# GemmaConfig rewrites hidden_act "gelu" (the released configs' value) to the tanh GELU, "gelu_pytorch_tanh".
# On save the tanh GELU is written under that name (listed first).
_GEMMA_ACTIVATION = choice(
    "hidden_act ('gelu' is the tanh GELU)", {"gelu_pytorch_tanh": "gelu_tanh", **ACTIVATION_NAMES, "gelu": "gelu_tanh"}
)

GEMMA = Family(
    model_type="gemma",
    architecture="GemmaForCausalLM",
    prefix="model.",
    config=(
        *size_fields(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=16, kv_kind="int"),
        Field("hidden_act", "activation", "gelu_pytorch_tanh", _GEMMA_ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", 8192, kind="int"),
        Field("rms_norm_eps", "norm_eps", 1e-6, kind="float"),
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
        *rope_fields(),
        head_dim_field(256),  # released Gemma: 256 (gemma-7b: 3072 / 16 = 192 would be D / N)
        Field("attention_bias", "qkv_bias", False, kind="bool"),  # one switch for q, k, v and o
        Field("attention_bias", "out_bias", False, kind="bool"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("pad_token_id", "padding_idx", 0, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
    ),
    # GemmaRMSNorm: x * (1 + w) in float32 (norm_offset 1, a weight stored as it is); GemmaTextScaledWordEmbedding:
    # embeddings x sqrt(D) rounded to the weights' dtype; GemmaMLP: down(act(gate(x)) * up(x)) without biases.
    fixed=dict(FIXED, norm_offset=1.0, embed_scale=True, mlp_bias=False, sliding_window=None),
    require=(
        FULL_ROTARY,
        *YARN_MSCALE,
        Require(
            "use_bidirectional_attention",
            None,
            (None, False),
            why="bidirectional Gemma (EmbeddingGemma) is not mapped: transformers' eager attention still masks "
            "it causally",
            kind="bool?",
        ),
    ),
    keys=KEYS,
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED,
)

# Phi3Config: longrope also written "su" or "yarn"; the top-level original_max_position_embeddings (4096) wins.
_PHI3_ROPE = rope_fields(top_original=4096, aliases={"su": "longrope", "yarn": "longrope"})

PHI3 = Family(
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    prefix="model.",
    config=(
        *size_fields(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=None, kv_kind="int?"),
        Field("resid_pdrop", "dropout", 0.0, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("hidden_act", "activation", "silu", ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", 4096, kind="int"),
        Field("rms_norm_eps", "norm_eps", 1e-5, kind="float"),
        Field("tie_word_embeddings", "lm_head", False, TIE, kind="bool"),
        *_PHI3_ROPE,
        head_dim_field(),
        # Phi-4-mini (model_type phi3) rotates 3/4 of each head.
        partial_rotary_field(1.0),
        Field("pad_token_id", "padding_idx", 32000, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
        Field("sliding_window", "sliding_window", None, kind="int?"),  # query i sees keys i - W < j <= i
    ),
    fixed=dict(FIXED, qkv_bias=False, out_bias=False, mlp_bias=False),
    require=(
        Require(
            "rope_parameters.rope_type",
            "default",
            ("default", "longrope", "su", "yarn"),
            why="Phi3Config reads only plain RoPE and longrope (also written 'su' or 'yarn')",
            kind="str",
        ),
    ),
    # Phi3Config keeps the length trained at outside rope_parameters, and it wins there.
    derived=(Derived("original_max_position_embeddings", lambda c: c.rope_original_max_len or 4096),),
    keys=(
        Key("embed_tokens.weight", "input.embed.weight"),
        Key("layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
        Key("layers.{i}.self_attn.qkv_proj.weight", "blocks.{i}.attn.in_proj_weight"),  # rows [q; k; v], as ours
        Key("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.out_proj.weight"),
        Key("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln2.weight"),
        # gate_up_proj: rows [gate; up] (Phi3MLP chunks it in two), two of ours written back as one tensor.
        Key("layers.{i}.mlp.gate_up_proj.weight", ("blocks.{i}.ff.gate.weight", "blocks.{i}.ff.up.weight"),
            "concat_rows"),  # fmt: skip
        Key("layers.{i}.mlp.down_proj.weight", "blocks.{i}.ff.down.weight"),
        Key("norm.weight", "final_norm.weight"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED
    + (
        "embd_pdrop",  # unused by transformers' Phi-3
    ),
)

STARCODER2 = Family(
    model_type="starcoder2",
    architecture="Starcoder2ForCausalLM",
    prefix="model.",
    config=(
        *size_fields(vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30,
                     num_attention_heads=24, num_key_value_heads=2, kv_kind="int"),
        Field("hidden_act", "activation", "gelu_pytorch_tanh", ACTIVATION_PYTORCH_TANH, kind="str"),
        Field("max_position_embeddings", "max_len", 4096, kind="int"),
        Field("norm_epsilon", "norm_eps", 1e-5, kind="float"),
        *rope_fields(),
        head_dim_field(),
        Field("sliding_window", "sliding_window", None, kind="int?"),  # query i sees keys i - W < j <= i
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("residual_dropout", "dropout", 0.0, kind="float"),
        Field("use_bias", "qkv_bias", True, kind="bool"),  # one switch for q, k, v, o, c_fc and c_proj
        Field("use_bias", "out_bias", True, kind="bool"),
        Field("use_bias", "mlp_bias", True, kind="bool"),
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
        Field("pad_token_id", "padding_idx", None, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
    ),
    # nn.LayerNorm (with its bias whatever use_bias says), c_fc -> GELU -> c_proj.
    fixed=dict(FIXED, norm="layernorm", norm_bias=True, mlp="plain"),
    require=(ROPE_TYPE, FULL_ROTARY),
    keys=(
        Key("embed_tokens.weight", "input.embed.weight"),
        Key("layers.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("layers.{i}.self_attn.{part}_proj.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat", ("q", "k", "v")),
        Key("layers.{i}.self_attn.o_proj.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("layers.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln2.{p}"),
        Key("layers.{i}.mlp.c_fc.{p}", "blocks.{i}.ff.0.{p}"),
        Key("layers.{i}.mlp.c_proj.{p}", "blocks.{i}.ff.3.{p}"),
        Key("norm.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED + ("embedding_dropout",),  # training only
)
