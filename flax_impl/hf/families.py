"""One declarative table per Hugging Face model_type: config fields, refused options, weight keys. This file holds
the learned-position and ALiBi families (bert, gpt2, bloom, mpt) and the registry `FAMILIES`; the Llama family
(llama, mistral, qwen2) is in `flax_impl.hf.rope_families`.

Read `flax_impl.hf.spec` for the vocabulary. Every default below is the transformers config class's own (checked
in parity_tests/test_hf.py against the installed transformers); every refusal says what the option does that
flax_impl does not. Our key names are torch_ref's state-dict names (`flax_impl.interop`).
"""

from __future__ import annotations

from flax_impl.hf.rope_families import LLAMA, MISTRAL, QWEN2
from flax_impl.hf.spec import (
    ACTIVATION,
    COMMON_IGNORED,
    TIE,
    Family,
    Field,
    Key,
    Require,
    inner_or_4d,
    width_times,
)

_NO_CROSS_ATTENTION = Require(
    "add_cross_attention", False, (False,), why="cross-attention layers are not implemented", kind="bool"
)
# A plain pre-LN decoder with LayerNorm and a plain MLP: what GPT-2, BLOOM and MPT share.
_DECODER = dict(
    norm="layernorm",
    mlp="plain",
    norm_first=True,
    final_norm=True,
    causal=True,
    embed_scale=False,
    padding_idx=None,  # their embeddings have no padding_idx
    sliding_window=None,
    parallel_residual=False,
    type_vocab_size=0,
    lm_head_bias=False,
)

GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    config=(
        Field("vocab_size", "vocab_size", 50257, kind="int"),
        Field("n_embd", "d_model", 768, kind="int"),
        Field("n_head", "n_heads", 12, kind="int"),
        Field("n_layer", "n_layers", 12, kind="int"),
        Field("n_inner", "d_ff", None, inner_or_4d("n_embd"), kind="int?"),
        Field("n_positions", "max_len", 1024, kind="int"),
        Field("activation_function", "activation", "gelu_new", ACTIVATION, kind="str"),
        Field("layer_norm_epsilon", "norm_eps", 1e-5, kind="float"),
        Field("resid_pdrop", "dropout", 0.1, kind="float"),
        Field("attn_pdrop", "attention_dropout", 0.1, kind="float"),
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
    ),
    fixed=dict(_DECODER, position="learned", input_norm=False, bias=True),
    require=(
        Require(
            "scale_attn_weights",
            True,
            (True,),
            why="unscaled q.k scores are not implemented (ours: / sqrt(H))",
            kind="bool",
        ),
        Require(
            "scale_attn_by_inverse_layer_idx",
            False,
            (False,),
            why="scores divided by (layer index + 1) are not implemented",
            kind="bool",
        ),
        Require(
            "reorder_and_upcast_attn",
            False,
            (False,),
            why="scaling k before q.k and upcasting the scores (a mixed-precision variant) is not implemented",
            kind="bool",
        ),
        _NO_CROSS_ATTENTION,
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
    # Older checkpoints carry each layer's causal-mask buffers ("attn.bias", "attn.masked_bias"): not weights.
    ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
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

BERT = Family(
    model_type="bert",
    architecture="BertModel",
    prefix="bert.",
    saved_prefix="",  # BertModel's own keys
    config=(
        Field("vocab_size", "vocab_size", 30522, kind="int"),
        Field("hidden_size", "d_model", 768, kind="int"),
        Field("num_hidden_layers", "n_layers", 12, kind="int"),
        Field("num_attention_heads", "n_heads", 12, kind="int"),
        Field("intermediate_size", "d_ff", 3072, kind="int"),
        Field("hidden_act", "activation", "gelu", ACTIVATION, kind="str"),  # BERT's "gelu" is the exact erf form
        Field("hidden_dropout_prob", "dropout", 0.1, kind="float"),
        Field("attention_probs_dropout_prob", "attention_dropout", 0.1, kind="float"),
        Field("max_position_embeddings", "max_len", 512, kind="int"),
        # token_type_embeddings, added before embeddings.LayerNorm:
        Field("type_vocab_size", "type_vocab_size", 2, kind="int"),
        Field("layer_norm_eps", "norm_eps", 1e-12, kind="float"),
        Field("pad_token_id", "padding_idx", 0, kind="int?"),  # nn.Embedding(..., padding_idx=pad_token_id)
    ),
    fixed=dict(
        position="learned",
        norm="layernorm",
        mlp="plain",
        norm_first=False,  # post-LN: LayerNorm after each residual sum
        input_norm=True,  # embeddings.LayerNorm
        final_norm=False,
        causal=False,
        bias=True,
        embed_scale=False,
        sliding_window=None,
        parallel_residual=False,
        lm_head="tied",  # BertModel has no LM head; model.logits(h) is the tied readout
    ),
    require=(
        Require(
            "is_decoder",
            False,
            (False,),
            why="BERT as a causal decoder (BertLMHeadModel) is not supported",
            kind="bool",
        ),
        Require(
            "position_embedding_type",  # transformers 4's key; transformers 5 has absolute positions only
            "absolute",
            ("absolute",),
            why="relative position embeddings (relative_key, relative_key_query) are not implemented",
            kind="str?",
        ),
        _NO_CROSS_ATTENTION,
    ),
    keys=(
        Key("embeddings.word_embeddings.weight", "input.embed.weight"),
        Key("embeddings.position_embeddings.weight", "input.pos.weight"),
        Key("embeddings.token_type_embeddings.weight", "input.token_type.weight"),
        Key("embeddings.LayerNorm.{p}", "input.norm.{p}"),
        Key(
            "encoder.layer.{i}.attention.self.{part}.{p}",
            "blocks.{i}.attn.in_proj_{p}",
            "qkv_concat",
            ("query", "key", "value"),
        ),
        Key("encoder.layer.{i}.attention.output.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("encoder.layer.{i}.attention.output.LayerNorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("encoder.layer.{i}.intermediate.dense.{p}", "blocks.{i}.ff.0.{p}"),
        Key("encoder.layer.{i}.output.dense.{p}", "blocks.{i}.ff.3.{p}"),
        Key("encoder.layer.{i}.output.LayerNorm.{p}", "blocks.{i}.ln2.{p}"),
    ),
    # Task heads we do not model (BertModel's pooler; the MLM / next-sentence heads of BertForPreTraining and
    # BertForMaskedLM), and the position_ids buffer of older checkpoints. `last_hidden_state` needs none of them.
    ignore=(r"pooler\..*", r"cls\..*", r"embeddings\.position_ids"),
    ignored_hf=COMMON_IGNORED
    + (
        "classifier_dropout",  # task heads only
        "tie_word_embeddings",  # BertModel has no LM head to tie
    ),
)

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
        _DECODER,
        position="alibi",  # Press et al.'s slope order, as _get_alibi_slopes
        alibi_max_bias=8.0,
        activation="gelu_tanh",  # bloom_gelu_forward: the tanh form, its constant written 0.79788456
        input_norm=True,  # word_embeddings_layernorm
        bias=True,
        max_len=2048,  # BLOOM's config has no length: ALiBi has none; BLOOM was trained at 2048
    ),
    require=(
        Require(
            "apply_residual_connection_post_layernorm",
            False,
            (False,),
            why="residuals taken after the norm are not implemented",
            kind="bool",
        ),
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


def _mpt_refuse(key: str, default: object, why: str, *, kind: str) -> Require:
    return Require(key, default, (default,), why=why, kind=kind)


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
    fixed=dict(_DECODER, position="alibi", alibi_max_bias=8.0, activation="gelu", input_norm=False, bias=False),
    require=(
        _mpt_refuse("expansion_ratio", 4, "transformers' MptMLP is 4 x d_model whatever the ratio", kind="int"),
        _mpt_refuse("no_bias", True, "transformers' MPT has no biases whatever no_bias says", kind="bool"),
        _mpt_refuse("logit_scale", None, "scaled logits are not implemented", kind="float|str?"),
        _mpt_refuse("embedding_fraction", 1.0, "scaled embedding gradients are not implemented", kind="float"),
        Require(
            "norm_type",
            "low_precision_layernorm",
            ("low_precision_layernorm", "layernorm"),
            why="only LayerNorm is implemented (as transformers' MPT)",
            kind="str",
        ),
        _mpt_refuse(
            "attn_config.alibi_bias_max",
            8,
            "transformers' MptModel builds its ALiBi slopes with the default 8 whatever alibi_bias_max says "
            "(MosaicML's code reads it): another value would compute differently there",
            kind="int",
        ),
        _mpt_refuse(
            "attn_config.alibi", True, "MPT without ALiBi has no position information in transformers", kind="bool"
        ),
        _mpt_refuse("attn_config.clip_qkv", None, "clipping q, k, v is not implemented", kind="float?"),
        _mpt_refuse("attn_config.qk_ln", False, "LayerNorm on q and k is not implemented", kind="bool"),
        _mpt_refuse(
            "attn_config.softmax_scale", None, "a softmax scale other than 1/sqrt(H) is not implemented", kind="float?"
        ),
        _mpt_refuse("attn_config.prefix_lm", False, "prefix-LM attention is not implemented", kind="bool"),
        _mpt_refuse(
            "attn_config.attn_uses_sequence_id", False, "sequence-id attention masks are not implemented", kind="bool"
        ),
        _mpt_refuse(
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
    ),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (BERT, BLOOM, GPT2, LLAMA, MISTRAL, MPT, QWEN2)}
