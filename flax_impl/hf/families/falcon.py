"""Falcon: RoPE "half" pairs over the whole head, LayerNorm, a plain MLP, biases by one switch, and three ways
to store the fused query_key_value, chosen by config.json:

- new_decoder_architecture (Falcon-40B/180B): K = num_kv_heads kv heads, rows grouped per kv head as
  (K, N/K + 2, H); attention and MLP in parallel, each with its own norm (`ln_attn`, `ln_mlp`; one shared
  `input_layernorm` when num_ln_in_parallel_attn is 1);
- classic multi_query (Falcon-7B): one kv head, rows [q (N H); k (H); v (H)];
- classic multi-head: rows per head (N, 3, H);
the classic blocks run attention and MLP in parallel from one `input_layernorm` (parallel_attn), or in sequence
with a `post_attention_layernorm` before the MLP.

On save the classic layouts are written where they hold the model (1 or N kv heads, one norm), the new
architecture otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.converters import ACTIVATION, ROPE_TYPE, TIE, inner_or_4d, linear_rope_fields
from flax_impl.hf.spec import COMMON_IGNORED, Convert, Derived, Family, Field, Key, Require, Unsupported


def _new(cfg: TransformerConfig) -> bool:
    """Whether our config needs the new architecture: two norms in parallel, or 1 < K < N kv heads."""
    two_norms = cfg.parallel_residual and not cfg.parallel_shared_norm
    return two_norms or cfg.n_kv_heads not in (1, cfg.n_heads)


def _kv_to_ours(v: Any, hf: Mapping[str, Any]) -> int:
    heads = int(hf["num_attention_heads"])
    kv = heads if v is None else int(v)
    if hf["new_decoder_architecture"]:
        return kv
    if hf["multi_query"]:
        return 1
    if kv != heads:
        raise Unsupported(f"the classic multi-head layout stores {heads} kv heads (transformers fails on {kv})")
    return kv


def _kv_to_hf(k: int, cfg: TransformerConfig) -> int:
    if not cfg.parallel_residual and k not in (1, cfg.n_heads):
        raise Unsupported("a sequential Falcon block (parallel_attn=false) has 1 or N kv heads")
    return k


_KV_HEADS = Convert(
    "num_kv_heads (new_decoder_architecture), else 1 (multi_query) or N",
    _kv_to_ours,
    _kv_to_hf,
    reads={
        "num_attention_heads": (71, "int"),
        "new_decoder_architecture": (False, "bool?"),
        "multi_query": (True, "bool?"),
    },
)


# transformers tests these options by truthiness: null is false.
_BOOL = Convert("null = false", lambda v, hf: bool(v), lambda v, cfg: v)
_PARALLEL = Convert(
    "parallel_attn (always parallel in the new architecture)",
    lambda v, hf: bool(v or hf["new_decoder_architecture"]),
    lambda v, cfg: v,
    reads={"new_decoder_architecture": (False, "bool?")},
)


def _two_norms(hf: Mapping[str, Any]) -> bool:
    """FalconDecoderLayer's ln_attn / ln_mlp: the new architecture with num_ln_in_parallel_attn 2 (its default)."""
    return bool(hf["new_decoder_architecture"]) and hf["num_ln_in_parallel_attn"] in (None, 2)


def _shared_to_hf(shared: bool, cfg: TransformerConfig) -> int | None:
    if not _new(cfg):
        return None
    return 1 if shared and cfg.parallel_residual else 2


_SHARED_NORM = Convert(
    "num_ln_in_parallel_attn (new architecture: 2 norms unless 1)",
    lambda v, hf: not _two_norms(hf),
    _shared_to_hf,
    reads={"new_decoder_architecture": (False, "bool?")},
)


def _layout_ok(v: Any, hf: Mapping[str, Any]) -> bool:
    """What transformers' FalconDecoderLayer can run: the new architecture only with parallel_attn; the classic
    one only with one norm (it would build ln_attn / ln_mlp and call input_layernorm)."""
    if hf["new_decoder_architecture"]:
        return bool(hf["parallel_attn"]) and v in (None, 1, 2)
    return v in (None, 1) or not hf["parallel_attn"]


FALCON = Family(
    model_type="falcon",
    architecture="FalconForCausalLM",
    prefix="transformer.",
    config=(
        Field("vocab_size", "vocab_size", 65024, kind="int"),
        Field("hidden_size", "d_model", 4544, kind="int"),
        Field("num_hidden_layers", "n_layers", 32, kind="int"),
        Field("num_attention_heads", "n_heads", 71, kind="int"),
        Field("num_kv_heads", "n_kv_heads", None, _KV_HEADS, kind="int?"),
        Field("parallel_attn", "parallel_residual", True, _PARALLEL, kind="bool?"),
        Field("num_ln_in_parallel_attn", "parallel_shared_norm", None, _SHARED_NORM, kind="int?"),
        Field("layer_norm_epsilon", "norm_eps", 1e-5, kind="float"),
        Field("hidden_dropout", "dropout", 0.0, kind="float?"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float?"),
        Field("bias", "qkv_bias", False, _BOOL, kind="bool?"),  # one switch for query_key_value, dense and MLP
        Field("bias", "out_bias", False, _BOOL, kind="bool?"),
        Field("bias", "mlp_bias", False, _BOOL, kind="bool?"),
        Field("max_position_embeddings", "max_len", 2048, kind="int"),
        Field("ffn_hidden_size", "d_ff", None, inner_or_4d("hidden_size"), kind="int?"),
        Field("activation", "activation", "gelu", ACTIVATION, kind="str?"),
        Field("tie_word_embeddings", "lm_head", True, TIE, kind="bool"),
        *linear_rope_fields(),
    ),
    fixed=dict(position="rope", rope_style="half", rope_fraction=1.0, norm="layernorm", norm_bias=True,
               mlp="plain", norm_first=True, final_norm=True, input_norm=False, causal=True, embed_scale=False,
               padding_idx=None, sliding_window=None, lm_head_bias=False, type_vocab_size=0),  # fmt: skip
    require=(
        ROPE_TYPE,
        Require(
            "alibi",
            False,
            (False, None),
            why="Falcon's ALiBi multiplies the slopes by the positions in bfloat16 and divides the bias by "
            "sqrt(head_dim): not expressible with our ALiBi",
            kind="bool?",
        ),
        Require(
            "num_ln_in_parallel_attn",
            None,
            check=_layout_ok,
            why="transformers' FalconDecoderLayer cannot run it (the new architecture needs parallel_attn; the "
            "classic one has one norm)",
            kind="int?",
        ),
    ),
    derived=(
        Derived("new_decoder_architecture", _new),
        Derived("multi_query", lambda c: c.n_kv_heads == 1),
    ),
    keys=(
        Key("word_embeddings.weight", "input.embed.weight"),
        Key("h.{i}.ln_attn.{p}", "blocks.{i}.ln1.{p}", when=_two_norms),
        Key("h.{i}.ln_mlp.{p}", "blocks.{i}.ln2.{p}", when=_two_norms),
        Key("h.{i}.input_layernorm.{p}", "blocks.{i}.ln1.{p}"),
        Key("h.{i}.post_attention_layernorm.{p}", "blocks.{i}.ln2.{p}"),  # the sequential block's second norm
        # Grouped (K, N/K + 2, H), [q; k; v] or per head (N, 3, H), by new_decoder_architecture and multi_query.
        Key("h.{i}.self_attention.query_key_value.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_falcon"),
        Key("h.{i}.self_attention.dense.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("h.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.ff.0.{p}"),
        Key("h.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.ff.3.{p}"),
        Key("ln_f.{p}", "final_norm.{p}"),
        Key("lm_head.weight", "lm_head.weight", base=False),
    ),
    ignored_hf=COMMON_IGNORED + ("pad_token_id",),  # word_embeddings has no padding_idx
)
