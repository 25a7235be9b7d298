"""The ALiBi decoders: bloom (Press et al.'s slopes, a LayerNorm after the embedding, per-head fused qkv) and mpt
(no biases anywhere, [q; k; v] blocks, 4 x d_model MLP)."""

from __future__ import annotations

from flax_impl.hf.converters import TIE, width_times
from flax_impl.hf.families.common import DECODER, only_default
from flax_impl.hf.spec import COMMON_IGNORED, Family, Field, Key, Require

BLOOM = Family(
    model_type="bloom",
    architecture="BloomForCausalLM",
    prefix="transformer.",
    config=(
        Field("vocab_size", "vocab_size", 250880, kind="int"),
        Field("hidden_size", "d_model", 64, kind="int"),
        Field("hidden_size", "d_ff", 64, width_times(4, "hidden_size"), kind="int"),  # BloomMLP: dense_h_to_4h
        Field("n_head", "n_heads", 8, kind="int"),
        Field("n_layer", "n_layers", 2, kind="int"),
        Field("layer_norm_epsilon", "norm_eps", 1e-5, kind="float"),
        Field("hidden_dropout", "dropout", 0.0, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float"),
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
    ),
    fixed=dict(
        DECODER,
        position="alibi",  # Press et al.'s slope order, as _get_alibi_slopes
        alibi_max_bias=8.0,
        activation="gelu_tanh",  # bloom_gelu_forward: the tanh form, its constant written 0.79788456
        input_norm=True,  # word_embeddings_layernorm
        bias=True,
        max_len=2048,  # BLOOM's config has no length: ALiBi has none; BLOOM was trained at 2048
    ),
    require=(
        only_default(
            "apply_residual_connection_post_layernorm", False, "residuals taken after the norm are not implemented",
            kind="bool",
        ),  # fmt: skip
    ),
    keys=(
        Key("word_embeddings.weight", "input.embed.weight"),
        Key("word_embeddings_layernorm.{p}", "input.norm.{p}"),
        Key("h.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("h.{i}.self_attention.query_key_value.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_per_head"),
        Key("h.{i}.self_attention.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("h.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln2.{p}"),
        Key("h.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.ff.0.{p}"),
        Key("h.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.ff.3.{p}"),
        Key("ln_f.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    unrepresented=("max_len",),
    ignored_hf=COMMON_IGNORED
    + (
        "pad_token_id",  # BLOOM's embedding has no padding_idx
        # Megatron tensor-parallel slicing of the two output projections: the same sums in another order.
        "pretraining_tp",
        "slow_but_exact",
    ),
)


MPT = Family(
    model_type="mpt",
    architecture="MptForCausalLM",
    prefix="transformer.",
    config=(
        Field("vocab_size", "vocab_size", 50368, kind="int"),
        Field("d_model", "d_model", 2048, kind="int"),
        Field("d_model", "d_ff", 2048, width_times(4, "d_model"), kind="int"),  # MptMLP: up_proj is 4 x d_model
        Field("n_heads", "n_heads", 16, kind="int"),
        Field("n_layers", "n_layers", 24, kind="int"),
        Field("max_seq_len", "max_len", 2048, kind="int"),
        Field("layer_norm_epsilon", "norm_eps", 1e-5, kind="float"),
        # transformers' MPT drops residual branches at this rate; it annotates the rate `int`, MosaicML writes 0.0:
        Field("attn_config.attn_pdrop", "dropout", 0, kind="float"),
        Field("attn_config.attn_pdrop", "attention_dropout", 0, kind="float"),
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
    ),
    # transformers' MPT has no biases anywhere (LayerNorm without bias) and the exact GELU.
    # MPT's slope order for a head count that is not a power of two (the next power's odd-indexed slopes first)
    # is Press et al.'s, as ours.
    fixed=dict(DECODER, position="alibi", alibi_max_bias=8.0, activation="gelu", input_norm=False, bias=False),
    require=(
        Require(
            "norm_type",
            "low_precision_layernorm",
            ("low_precision_layernorm", "layernorm"),
            why="only LayerNorm is implemented (as transformers' MPT)",
            kind="str",
        ),
        only_default(
            "attn_config.alibi_bias_max",
            8,
            "transformers' MptModel builds its ALiBi slopes with the default 8 whatever alibi_bias_max says "
            "(MosaicML's code reads it): another value would compute differently there",
            kind="int",
        ),
        only_default(
            "attn_config.alibi", True, "MPT without ALiBi has no position information in transformers", kind="bool"
        ),
        only_default("attn_config.clip_qkv", None, "clipping q, k, v is not implemented", kind="float?"),
        only_default("attn_config.qk_ln", False, "LayerNorm on q and k is not implemented", kind="bool"),
        only_default(
            "attn_config.softmax_scale", None, "a softmax scale other than 1/sqrt(H) is not implemented", kind="float?"
        ),
        only_default("attn_config.prefix_lm", False, "prefix-LM attention is not implemented", kind="bool"),
        only_default(
            "attn_config.attn_uses_sequence_id", False, "sequence-id attention masks are not implemented", kind="bool"
        ),
        only_default(
            "attn_config.attn_type", "multihead_attention", "multi-query attention is not implemented", kind="str"
        ),
    ),
    keys=(
        Key("wte.weight", "input.embed.weight"),
        Key("blocks.{i}.norm_1.weight", "blocks.{i}.ln1.weight"),
        Key("blocks.{i}.attn.Wqkv.weight", "blocks.{i}.attn.in_proj_weight"),  # [q; k; v] blocks (chunk(3))
        Key("blocks.{i}.attn.out_proj.weight", "blocks.{i}.attn.out_proj.weight"),
        Key("blocks.{i}.norm_2.weight", "blocks.{i}.ln2.weight"),
        Key("blocks.{i}.ffn.up_proj.weight", "blocks.{i}.ff.0.weight"),
        Key("blocks.{i}.ffn.down_proj.weight", "blocks.{i}.ff.3.weight"),
        Key("norm_f.weight", "final_norm.weight"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignored_hf=COMMON_IGNORED
    + (
        "pad_token_id",  # MPT's embedding has no padding_idx
        "learned_pos_emb",  # transformers' MPT has no learned positions (a wpe tensor would be an unexpected key)
        "resid_pdrop",  # unused by transformers' MPT
        "emb_pdrop",  # unused by transformers' MPT
        "init_device",
        "attn_config.attn_impl",  # the kernel, not the math
        # Read by MosaicML's own code, never by transformers' MPT, which computes what we do whatever they say:
        "expansion_ratio",  # MptMLP's up_proj is 4 x d_model (a folder of another width fails on its shapes)
        "no_bias",  # transformers' MPT has no biases (a checkpoint with biases fails on its keys)
        "logit_scale",  # MptForCausalLM does not scale its logits
        "embedding_fraction",  # MosaicML scales the embedding's gradient by it; transformers does not
    ),
)
