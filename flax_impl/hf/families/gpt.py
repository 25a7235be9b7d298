"""The learned-position decoders: gpt2, gpt_bigcode (GPT-2 with multi-query attention and nn.Linear weights),
opt (positions from the attention mask, 2 extra leading rows in the table; pre-LN or post-LN)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.converters import ACTIVATION, ACTIVATION_PYTORCH_TANH, TIE, inner_or_4d, plus
from flax_impl.hf.families.common import DECODER, MASK_BUFFERS, NO_CROSS_ATTENTION, only_default
from flax_impl.hf.spec import COMMON_IGNORED, Convert, Family, Field, Key, Require, Unsupported


def _gpt2_fields(activation: Field, *extra: Field) -> tuple[Field, ...]:
    """GPT2Config's Fields, which GPTBigCodeConfig repeats: `activation` (each class's default activation_function)
    after n_positions, `extra` before tie_word_embeddings."""
    return (
        Field("vocab_size", "vocab_size", 50257, kind="int"),
        Field("n_embd", "d_model", 768, kind="int"),
        Field("n_head", "n_heads", 12, kind="int"),
        Field("n_layer", "n_layers", 12, kind="int"),
        Field("n_inner", "d_ff", None, inner_or_4d("n_embd"), kind="int?"),
        Field("n_positions", "max_len", 1024, kind="int"),
        activation,
        Field("layer_norm_epsilon", "norm_eps", 1e-5, kind="float"),
        Field("resid_pdrop", "dropout", 0.1, kind="float"),
        Field("attn_pdrop", "attention_dropout", 0.1, kind="float"),
        *extra,
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
    )


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    config=_gpt2_fields(Field("activation_function", "activation", "gelu_new", ACTIVATION, kind="str")),
    fixed=dict(DECODER, position="learned", input_norm=False, bias=True),
    require=(
        only_default(
            "scale_attn_weights", True, "unscaled q.k scores are not implemented (ours: / sqrt(H))", kind="bool"
        ),
        only_default(
            "scale_attn_by_inverse_layer_idx", False, "scores divided by (layer index + 1) are not implemented",
            kind="bool",
        ),  # fmt: skip
        only_default(
            "reorder_and_upcast_attn", False,
            "scaling k before q.k and upcasting the scores (a mixed-precision variant) is not implemented", kind="bool",
        ),  # fmt: skip
        NO_CROSS_ATTENTION,
    ),
    keys=(
        Key("wte.weight", "input.embed.weight"),
        Key("wpe.weight", "input.pos.weight"),
        Key("h.{i}.ln_1.{p}", "blocks.{i}.ln1.{p}"),
        Key("h.{i}.attn.c_attn.weight", "blocks.{i}.attn.in_proj_weight", "conv1d"),  # rows [q; k; v] once transposed
        Key("h.{i}.attn.c_attn.bias", "blocks.{i}.attn.in_proj_bias"),
        Key("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.out_proj.weight", "conv1d"),
        Key("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.out_proj.bias"),
        Key("h.{i}.ln_2.{p}", "blocks.{i}.ln2.{p}"),
        Key("h.{i}.mlp.c_fc.weight", "blocks.{i}.ff.0.weight", "conv1d"),
        Key("h.{i}.mlp.c_fc.bias", "blocks.{i}.ff.0.bias"),
        Key("h.{i}.mlp.c_proj.weight", "blocks.{i}.ff.3.weight", "conv1d"),
        Key("h.{i}.mlp.c_proj.bias", "blocks.{i}.ff.3.bias"),
        Key("ln_f.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignore=MASK_BUFFERS,
    ignored_hf=COMMON_IGNORED
    + (
        "pad_token_id",  # GPT-2's embedding has no padding_idx
        "embd_pdrop",  # training only: our `dropout` (resid_pdrop) also applies at the input
        # GPT2DoubleHeadsModel's multiple-choice head, which we do not model:
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
    ),
)


def _mq_to_ours(v: Any, hf: Mapping[str, Any]) -> int:
    return 1 if v else int(hf["n_head"])


def _mq_to_hf(k: int, cfg: TransformerConfig) -> bool:
    if k not in (1, cfg.n_heads):
        raise Unsupported("GPT-BigCode has multi-query (1 kv head) or multi-head attention (N kv heads) only")
    return k == 1


_MULTI_QUERY = Convert("multi_query (1 kv head, else N)", _mq_to_ours, _mq_to_hf, reads={"n_head": (12, "int")})


def _multi_query(hf: Mapping[str, Any]) -> bool:
    return bool(hf["multi_query"])


GPT_BIGCODE = Family(
    model_type="gpt_bigcode",
    architecture="GPTBigCodeForCausalLM",
    prefix="transformer.",
    config=_gpt2_fields(
        Field("activation_function", "activation", "gelu_pytorch_tanh", ACTIVATION_PYTORCH_TANH, kind="str"),
        Field("multi_query", "n_kv_heads", True, _MULTI_QUERY, kind="bool"),
    ),
    fixed=dict(DECODER, position="learned", input_norm=False, bias=True),
    require=(
        only_default("scale_attn_weights", True, "unscaled q.k scores are not implemented", kind="bool"),
        NO_CROSS_ATTENTION,
    ),
    keys=(
        Key("wte.weight", "input.embed.weight"),
        Key("wpe.weight", "input.pos.weight"),
        Key("h.{i}.ln_1.{p}", "blocks.{i}.ln1.{p}"),
        # Multi-query c_attn: rows [q (N H); k (H); v (H)], ours as they are; multi-head: per head (N, 3, H).
        Key("h.{i}.attn.c_attn.{p}", "blocks.{i}.attn.in_proj_{p}", when=_multi_query),
        Key("h.{i}.attn.c_attn.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_per_head"),
        Key("h.{i}.attn.c_proj.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("h.{i}.ln_2.{p}", "blocks.{i}.ln2.{p}"),
        Key("h.{i}.mlp.c_fc.{p}", "blocks.{i}.ff.0.{p}"),
        Key("h.{i}.mlp.c_proj.{p}", "blocks.{i}.ff.3.{p}"),
        Key("ln_f.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignore=MASK_BUFFERS,
    ignored_hf=COMMON_IGNORED
    + (
        "pad_token_id",  # its embedding has no padding_idx
        "embd_pdrop",  # training only
        # Where the softmax is computed in half precision: transformers' eager softmax is float32 whatever these say.
        "attention_softmax_in_fp32",
        "scale_attention_softmax_in_fp32",
    ),
)


def _opt_final_to_ours(remove: Any, hf: Mapping[str, Any]) -> bool:
    return bool(hf["do_layer_norm_before"]) and not remove


def _opt_final_to_hf(final: bool, cfg: TransformerConfig) -> bool:
    if not cfg.norm_first and final:
        raise Unsupported("a post-LN OPT (do_layer_norm_before=false) has no final norm")
    return not final and cfg.norm_first


_OPT_FINAL = Convert(
    "decoder.final_layer_norm (pre-LN and not _remove_final_layer_norm)",
    _opt_final_to_ours,
    _opt_final_to_hf,
    reads={"do_layer_norm_before": (True, "bool")},
)


def _same_width(v: Any, hf: Mapping[str, Any]) -> bool:
    return v is None or v == hf["hidden_size"]


OPT = Family(
    model_type="opt",
    architecture="OPTForCausalLM",
    prefix="model.",
    config=(
        Field("vocab_size", "vocab_size", 50272, kind="int"),
        Field("hidden_size", "d_model", 768, kind="int"),
        Field("num_hidden_layers", "n_layers", 12, kind="int"),
        Field("num_attention_heads", "n_heads", 12, kind="int"),
        Field("ffn_dim", "d_ff", 3072, kind="int"),
        # OPTLearnedPositionalEmbedding: max_position_embeddings + 2 rows, position p at row p + 2.
        Field("max_position_embeddings", "max_len", 2048, plus(2, "max_position_embeddings"), kind="int"),
        Field("do_layer_norm_before", "norm_first", True, kind="bool"),  # False: post-LN (opt-350m)
        Field("_remove_final_layer_norm", "final_norm", False, _OPT_FINAL, kind="bool"),
        Field("activation_function", "activation", "relu", ACTIVATION, kind="str"),
        Field("dropout", "dropout", 0.1, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("enable_bias", "qkv_bias", True, kind="bool"),  # one switch for q, k, v, out_proj, fc1, fc2
        Field("enable_bias", "out_bias", True, kind="bool"),
        Field("enable_bias", "mlp_bias", True, kind="bool"),
        Field("pad_token_id", "padding_idx", 1, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
    ),
    # Positions: cumsum(attention_mask) * mask - 1, at row + 2 (a padded token at row 1); LayerNorm eps 1e-5 (nn's
    # default, not in the config); the norms keep their biases whatever enable_bias says.
    fixed=dict(DECODER, position="learned", positions_from="mask", position_offset=2, input_norm=False,
               norm_eps=1e-5, norm_bias=True),  # fmt: skip
    require=(
        Require(
            "word_embed_proj_dim",
            None,
            check=_same_width,
            why="projections between a narrower embedding and hidden_size (project_in / project_out, opt-350m) "
            "are not implemented",
            kind="int?",
        ),
        only_default(
            "layer_norm_elementwise_affine", True, "LayerNorms without a weight and bias are not implemented",
            kind="bool",
        ),  # fmt: skip
    ),
    keys=(
        Key("decoder.embed_tokens.weight", "input.embed.weight"),
        Key("decoder.embed_positions.weight", "input.pos.weight"),
        Key("decoder.layers.{i}.self_attn_layer_norm.{p}", "blocks.{i}.ln1.{p}"),
        Key("decoder.layers.{i}.self_attn.{part}_proj.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat",
            ("q", "k", "v")),  # fmt: skip
        Key("decoder.layers.{i}.self_attn.out_proj.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("decoder.layers.{i}.final_layer_norm.{p}", "blocks.{i}.ln2.{p}"),
        Key("decoder.layers.{i}.fc1.{p}", "blocks.{i}.ff.0.{p}"),
        Key("decoder.layers.{i}.fc2.{p}", "blocks.{i}.ff.3.{p}"),
        Key("decoder.final_layer_norm.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignored_hf=COMMON_IGNORED
    + (
        "layerdrop",  # training only (layers skipped at random)
        "init_std",
    ),
)
