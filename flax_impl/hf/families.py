"""One declarative table per Hugging Face model_type: config fields, refused options, weight keys.

Read `flax_impl.hf.spec` for the vocabulary. Every default below is the transformers config class's own (checked
in parity_tests/test_hf.py against the installed transformers); every refusal says what the option does that
flax_impl does not. Our key names are torch_ref's state-dict names (`flax_impl.interop`).
"""

from __future__ import annotations

from flax_impl.hf.spec import ACTIVATION, Family, Field, Key, Require, inner_or_4d

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

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2,)}
