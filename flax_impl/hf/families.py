"""One declarative table per Hugging Face model_type: config fields, refused options, weight keys.

Read `flax_impl.hf.spec` for the vocabulary. Every default below is the transformers config class's own (checked
in parity_tests/test_hf.py against the installed transformers); every refusal says what the option does that
flax_impl does not. Our key names are torch_ref's state-dict names (`flax_impl.interop`).
"""

from __future__ import annotations

from flax_impl.hf.spec import ACTIVATION, Family, Field, Key, Require, inner_or_4d, width_times

# Options that are not about one family: a decoder with cross-attention, and pruned heads (uneven head counts).
_NO_CROSS_ATTENTION = Require("add_cross_attention", False, (False,), why="cross-attention layers are not implemented")

# Config fields that change neither the weights nor the eval-mode forward, in every family: ids, cache, init.
_COMMON_IGNORED = ("bos_token_id", "eos_token_id", "use_cache", "initializer_range")

GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    config=(
        Field("vocab_size", "vocab_size", 50257),
        Field("n_embd", "d_model", 768),
        Field("n_head", "n_heads", 12),
        Field("n_layer", "n_layers", 12),
        Field("n_inner", "d_ff", None, inner_or_4d("n_embd")),
        Field("n_positions", "max_len", 1024),
        Field("activation_function", "activation", "gelu_new", ACTIVATION),
        Field("layer_norm_epsilon", "norm_eps", 1e-5),
        Field("resid_pdrop", "dropout", 0.1),
        Field("attn_pdrop", "attention_dropout", 0.1),
    ),
    fixed=dict(
        position="learned",
        norm_first=True,
        final_norm=True,
        input_norm=False,
        causal=True,
        bias=True,
        embed_scale=False,
        padding_idx=None,
    ),
    require=(
        Require(
            "scale_attn_weights", True, (True,), why="unscaled q.k scores are not implemented (we divide by sqrt(H))"
        ),
        Require(
            "scale_attn_by_inverse_layer_idx",
            False,
            (False,),
            why="scores divided by (layer index + 1) are not implemented",
        ),
        Require(
            "reorder_and_upcast_attn",
            False,
            (False,),
            why="scaling k before q.k and upcasting the scores (a mixed-precision variant) is not implemented",
        ),
        Require("tie_word_embeddings", True, (True,), why="an untied LM head is not implemented yet"),
        _NO_CROSS_ATTENTION,
    ),
    keys=(
        Key("wte.weight", "input.embed.weight"),
        Key("wpe.weight", "input.pos.weight"),
        Key("h.{i}.ln_1.{p}", "blocks.{i}.ln1.{p}"),
        Key("h.{i}.attn.c_attn.weight", "blocks.{i}.attn.in_proj_weight", "conv1d"),
        Key("h.{i}.attn.c_attn.bias", "blocks.{i}.attn.in_proj_bias"),
        Key("h.{i}.attn.c_proj.weight", "blocks.{i}.attn.out_proj.weight", "conv1d"),
        Key("h.{i}.attn.c_proj.bias", "blocks.{i}.attn.out_proj.bias"),
        Key("h.{i}.ln_2.{p}", "blocks.{i}.ln2.{p}"),
        Key("h.{i}.mlp.c_fc.weight", "blocks.{i}.ff.0.weight", "conv1d"),
        Key("h.{i}.mlp.c_fc.bias", "blocks.{i}.ff.0.bias"),
        Key("h.{i}.mlp.c_proj.weight", "blocks.{i}.ff.3.weight", "conv1d"),
        Key("h.{i}.mlp.c_proj.bias", "blocks.{i}.ff.3.bias"),
        Key("ln_f.{p}", "final_norm.{p}"),
    ),
    # Older checkpoints carry each layer's causal-mask buffers ("attn.bias", "attn.masked_bias"): not weights.
    ignore=(r"h\.\d+\.attn\.(bias|masked_bias)",),
    ignored_hf=_COMMON_IGNORED
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

BLOOM = Family(
    model_type="bloom",
    architecture="BloomForCausalLM",
    prefix="transformer.",
    config=(
        Field("vocab_size", "vocab_size", 250880),
        Field("hidden_size", "d_model", 64),
        Field("hidden_size", "d_ff", 64, width_times(4, "hidden_size")),  # BloomMLP: dense_h_to_4h
        Field("n_head", "n_heads", 8),
        Field("n_layer", "n_layers", 2),
        Field("layer_norm_epsilon", "norm_eps", 1e-5),
        Field("hidden_dropout", "dropout", 0.0),
        Field("attention_dropout", "attention_dropout", 0.0),
    ),
    fixed=dict(
        position="alibi",  # Press et al.'s slope order, as _get_alibi_slopes
        activation="gelu_tanh",  # bloom_gelu_forward: the tanh form, its constant written 0.79788456
        norm_first=True,
        input_norm=True,  # word_embeddings_layernorm
        final_norm=True,
        causal=True,
        bias=True,
        embed_scale=False,
        padding_idx=None,
        max_len=2048,  # BLOOM's config has no length: ALiBi has none; BLOOM was trained at 2048
    ),
    require=(
        Require(
            "apply_residual_connection_post_layernorm",
            False,
            (False,),
            why="residuals taken after the norm are not implemented",
        ),
        Require("tie_word_embeddings", True, (True,), why="an untied LM head is not implemented yet"),
    ),
    keys=(
        Key("word_embeddings.weight", "input.embed.weight"),
        Key("word_embeddings_layernorm.{p}", "input.norm.{p}"),
        Key("h.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("h.{i}.self_attention.query_key_value.weight", "blocks.{i}.attn.in_proj_weight", "qkv_per_head"),
        Key("h.{i}.self_attention.query_key_value.bias", "blocks.{i}.attn.in_proj_bias", "qkv_per_head"),
        Key("h.{i}.self_attention.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("h.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln2.{p}"),
        Key("h.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.ff.0.{p}"),
        Key("h.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.ff.3.{p}"),
        Key("ln_f.{p}", "final_norm.{p}"),
    ),
    unrepresented=("max_len",),
    ignored_hf=_COMMON_IGNORED
    + (
        "pad_token_id",  # BLOOM's embedding has no padding_idx
        # Megatron tensor-parallel slicing of the two output projections: the same sums in another order.
        "pretraining_tp",
        "slow_but_exact",
    ),
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, BLOOM)}
