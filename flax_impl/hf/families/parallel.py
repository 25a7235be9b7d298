"""The partial-rotary decoders, most with parallel attention and MLP: gpt_neox (two norms, per-head fused qkv),
gptj and codegen (one norm, interleaved pairs, a head with a bias), phi (Phi-1/1.5/2: one norm, biases everywhere)
and stablelm (LayerNorm, a gated MLP, sequential or parallel with one norm).

Partial rotary: the first int(H x f) dims of each head rotate (transformers truncates); GPT-J and CodeGen give
that width as rotary_dim.
"""

from __future__ import annotations

from flax_impl.hf.converters import (
    ACTIVATION,
    ROPE_TYPE,
    TIE,
    head_dim_require,
    inner_or_4d,
    kv_heads,
    linear_rope_fields,
    partial_rotary_field,
    rotary_dims,
    size_fields,
)
from flax_impl.hf.families.common import MASK_BUFFERS, only_default
from flax_impl.hf.spec import COMMON_IGNORED, Convert, Family, Field, Key, Require

_ROPE_DECODER = dict(
    position="rope",
    rope_style="half",  # rotate_half pairs x[i] with x[i + r/2] within the rotated width r
    norm="layernorm",
    norm_bias=True,
    norm_first=True,
    final_norm=True,
    input_norm=False,
    causal=True,
    embed_scale=False,
    sliding_window=None,
    type_vocab_size=0,
)
_NOT_TIED_WITH_BIAS = only_default(
    "tie_word_embeddings", False, "the LM head has a bias of its own: a tied head with a bias is not implemented",
    kind="bool",
)

GPT_NEOX = Family(
    model_type="gpt_neox",
    architecture="GPTNeoXForCausalLM",
    prefix="gpt_neox.",
    config=(
        Field("vocab_size", "vocab_size", 50432, kind="int"),
        Field("hidden_size", "d_model", 6144, kind="int"),
        Field("num_hidden_layers", "n_layers", 44, kind="int"),
        Field("num_attention_heads", "n_heads", 64, kind="int"),
        Field("intermediate_size", "d_ff", 24576, kind="int"),
        Field("hidden_act", "activation", "gelu", ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", 2048, kind="int"),
        Field("layer_norm_eps", "norm_eps", 1e-5, kind="float"),
        Field("hidden_dropout", "dropout", 0.0, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("tie_word_embeddings", "lm_head", False, TIE, kind="bool"),
        # x + attn(input_layernorm(x)) + mlp(post_attention_layernorm(x)); else the sequential pre-LN block.
        Field("use_parallel_residual", "parallel_residual", True, kind="bool"),
        Field("attention_bias", "qkv_bias", True, kind="bool"),  # one switch for query_key_value and dense
        Field("attention_bias", "out_bias", True, kind="bool"),
        *linear_rope_fields(),
        partial_rotary_field(0.25),
    ),
    fixed=dict(_ROPE_DECODER, mlp="plain", mlp_bias=True, parallel_shared_norm=False, padding_idx=None,
               lm_head_bias=False),  # fmt: skip
    require=(ROPE_TYPE,),
    keys=(
        Key("embed_in.weight", "input.embed.weight"),
        Key("layers.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("layers.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln2.{p}"),
        Key("layers.{i}.attention.query_key_value.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_per_head"),  # (N, 3, H)
        Key("layers.{i}.attention.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("layers.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.ff.0.{p}"),
        Key("layers.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.ff.3.{p}"),
        Key("final_layer_norm.{p}", "final_norm.{p}"),
        Key("embed_out.weight", "lm_head.weight", base=False),  # transformers 5 saves its lm_head under this name
    ),
    # Older checkpoints' causal-mask and RoPE buffers.
    ignore=(r"layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",),
    ignored_hf=COMMON_IGNORED
    + (
        "pad_token_id",  # embed_in has no padding_idx
        "classifier_dropout",  # task heads only
        "is_decoder",  # GPTNeoXForCausalLM is causal whatever it says
    ),
    # transformers 4's names, read into rope_parameters as GPTNeoXConfig does.
    renamed={"rotary_pct": "rope_parameters.partial_rotary_factor", "rotary_emb_base": "rope_parameters.rope_theta"},
)


def _gptj_like(
    model_type: str,
    architecture: str,
    qkv: tuple[Key, ...],
    ignore: tuple[str, ...],
    require: tuple[Require, ...] = (),
    ignored_hf: tuple[str, ...] = (),
) -> Family:
    """GPT-J and CodeGen: x + attn(ln_1(x)) + mlp(ln_1(x)), interleaved partial rotary (base 10000, written into
    their code), no attention biases, an untied head with a bias."""
    return Family(
        model_type=model_type,
        architecture=architecture,
        prefix="transformer.",
        config=(
            Field("vocab_size", "vocab_size", 50400, kind="int"),
            Field("n_embd", "d_model", 4096, kind="int"),
            Field("n_layer", "n_layers", 28, kind="int"),
            Field("n_head", "n_heads", 16, kind="int"),
            Field("n_inner", "d_ff", None, inner_or_4d("n_embd"), kind="int?"),
            Field("n_positions", "max_len", 2048, kind="int"),
            Field("rotary_dim", "rope_fraction", 64, rotary_dims("n_embd", "n_head"), kind="int"),
            Field("activation_function", "activation", "gelu_new", ACTIVATION, kind="str"),
            Field("layer_norm_epsilon", "norm_eps", 1e-5, kind="float"),
            Field("resid_pdrop", "dropout", 0.0, kind="float"),
            Field("attn_pdrop", "attention_dropout", 0.0, kind="float"),
        ),
        fixed=dict(_ROPE_DECODER, rope_style="interleaved", rope_base=10_000.0, rope_scale=1.0, mlp="plain",
                   parallel_residual=True, parallel_shared_norm=True, qkv_bias=False, out_bias=False,
                   mlp_bias=True, padding_idx=None, lm_head="untied", lm_head_bias=True),  # fmt: skip
        require=(_NOT_TIED_WITH_BIAS, *require),
        keys=(
            Key("wte.weight", "input.embed.weight"),
            Key("h.{i}.ln_1.{p}", "blocks.{i}.ln1.{p}"),
            *qkv,
            Key("h.{i}.attn.out_proj.weight", "blocks.{i}.attn.out_proj.weight"),
            Key("h.{i}.mlp.fc_in.{p}", "blocks.{i}.ff.0.{p}"),
            Key("h.{i}.mlp.fc_out.{p}", "blocks.{i}.ff.3.{p}"),
            Key("ln_f.{p}", "final_norm.{p}"),
            Key("lm_head.{p}", "lm_head.{p}", base=False),
        ),
        ignore=ignore,
        ignored_hf=COMMON_IGNORED
        + (
            "pad_token_id",  # wte has no padding_idx
            "embd_pdrop",  # training only
            *ignored_hf,
        ),
    )


GPTJ = _gptj_like(
    "gptj",
    "GPTJForCausalLM",
    (Key("h.{i}.attn.{part}_proj.weight", "blocks.{i}.attn.in_proj_weight", "qkv_concat", ("q", "k", "v")),),
    MASK_BUFFERS,
)
CODEGEN = _gptj_like(
    "codegen",
    "CodeGenForCausalLM",
    # qkv_proj's rows are 4 groups of (q, v, k), each D / 4 rows.
    (Key("h.{i}.attn.qkv_proj.weight", "blocks.{i}.attn.in_proj_weight", "qkv_codegen"),),
    (r"h\.\d+\.attn\.causal_mask",),
    require=(
        Require(
            "n_embd",
            4096,
            check=lambda v, hf: v % 4 == 0,
            why="CodeGen's qkv_proj is split into 4 groups of D / 4 rows",
            kind="int",
        ),
    ),
    ignored_hf=("n_ctx",),  # unused by transformers' CodeGen
)

PHI = Family(
    model_type="phi",
    architecture="PhiForCausalLM",
    prefix="model.",
    config=(
        *size_fields(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                     num_attention_heads=32, num_key_value_heads=None, kv_kind="int?"),
        Field("resid_pdrop", "dropout", 0.0, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float?"),
        Field("hidden_act", "activation", "gelu_new", ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", 2048, kind="int"),
        Field("layer_norm_eps", "norm_eps", 1e-5, kind="float"),
        *linear_rope_fields(),
        partial_rotary_field(0.5),
        Field("pad_token_id", "padding_idx", None, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
        # A LayerNorm (weight and bias) over each head's H dims on q and k, before RoPE.
        Field("qk_layernorm", "qk_norm", False, Convert("qk_layernorm", lambda v, hf: "layernorm" if v else "none",
                                                        lambda v, cfg: v == "layernorm"), kind="bool"),
    ),
    # x + attn(ln(x)) + mlp(ln(x)); biases on q, k, v, dense, fc1, fc2 and the head.
    fixed=dict(_ROPE_DECODER, mlp="plain", parallel_residual=True, parallel_shared_norm=True, bias=True,
               lm_head="untied", lm_head_bias=True),  # fmt: skip
    require=(
        ROPE_TYPE,
        _NOT_TIED_WITH_BIAS,
        # PhiAttention reads head_dim, but its QK LayerNorms are hidden / heads wide.
        head_dim_require("hidden_size", "num_attention_heads"),
    ),
    keys=(
        Key("embed_tokens.weight", "input.embed.weight"),
        Key("layers.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("layers.{i}.self_attn.q_layernorm.{p}", "blocks.{i}.attn.q_norm.{p}"),
        Key("layers.{i}.self_attn.k_layernorm.{p}", "blocks.{i}.attn.k_norm.{p}"),
        Key("layers.{i}.self_attn.{part}_proj.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat", ("q", "k", "v")),
        Key("layers.{i}.self_attn.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("layers.{i}.mlp.fc1.{p}", "blocks.{i}.ff.0.{p}"),
        Key("layers.{i}.mlp.fc2.{p}", "blocks.{i}.ff.3.{p}"),
        Key("final_layernorm.{p}", "final_norm.{p}"),
        Key("lm_head.{p}", "lm_head.{p}", base=False),
    ),
    ignored_hf=COMMON_IGNORED + ("embd_pdrop",),  # training only
)

STABLELM = Family(
    model_type="stablelm",
    architecture="StableLmForCausalLM",
    prefix="model.",
    config=(
        Field("vocab_size", "vocab_size", 50304, kind="int"),
        Field("intermediate_size", "d_ff", 6912, kind="int"),
        Field("hidden_size", "d_model", 2560, kind="int"),
        Field("num_hidden_layers", "n_layers", 32, kind="int"),
        Field("num_attention_heads", "n_heads", 32, kind="int"),
        Field("num_key_value_heads", "n_kv_heads", 32, kv_heads("num_attention_heads"), kind="int"),
        Field("hidden_act", "activation", "silu", ACTIVATION, kind="str"),
        Field("max_position_embeddings", "max_len", 4096, kind="int"),
        Field("layer_norm_eps", "norm_eps", 1e-5, kind="float"),
        Field("tie_word_embeddings", "lm_head", False, TIE, kind="bool"),
        *linear_rope_fields(),
        partial_rotary_field(0.25),
        Field("use_qkv_bias", "qkv_bias", False, kind="bool"),
        # x + attn(ln(x)) + mlp(ln(x)) with input_layernorm only; else the sequential pre-LN block.
        Field("use_parallel_residual", "parallel_residual", False, kind="bool"),
        Field("hidden_dropout", "dropout", 0.0, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("pad_token_id", "padding_idx", None, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
    ),
    # LayerNorms with biases; gate/up/down and o_proj without; down(silu(gate(x)) * up(x)).
    fixed=dict(_ROPE_DECODER, mlp="gated", parallel_shared_norm=True, out_bias=False, mlp_bias=False,
               lm_head_bias=False),  # fmt: skip
    require=(
        ROPE_TYPE,
        only_default("qk_layernorm", False, "a LayerNorm per head on q and k is not implemented yet", kind="bool"),
        head_dim_require("hidden_size", "num_attention_heads"),
    ),
    keys=(
        Key("embed_tokens.weight", "input.embed.weight"),
        Key("layers.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("layers.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln2.{p}"),
        Key("layers.{i}.self_attn.{part}_proj.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat", ("q", "k", "v")),
        Key("layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.out_proj.weight"),
        Key("layers.{i}.mlp.gate_proj.weight", "blocks.{i}.ff.gate.weight"),
        Key("layers.{i}.mlp.up_proj.weight", "blocks.{i}.ff.up.weight"),
        Key("layers.{i}.mlp.down_proj.weight", "blocks.{i}.ff.down.weight"),
        Key("norm.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignored_hf=COMMON_IGNORED,
)
