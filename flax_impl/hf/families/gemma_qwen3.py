"""The families of the attention features: qwen3 (QK-norm, a head width of its own, Qwen2's windows), gemma2 (sandwich
norms, query_pre_attn_scalar, attention and final logit soft-capping, alternating sliding and full layers) and
gemma3_text (Gemma 2's block with Gemma's (1 + w) QK-norm, a RoPE base of its own on the sliding layers and the
RoPE type of the full ones).

The released checkpoints switch these on: head_dim 128 with 1024 / 16 (Qwen3-0.6B), 256 with 2304 / 8 (Gemma 2
2B), query_pre_attn_scalar 256 != head_dim 128 (Gemma 2 27B), soft-caps 50 and 30 (Gemma 2), every sixth layer
full with a window of 512 or 1024 and linear RoPE scaling 8 on the full layers only (Gemma 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.converters import ACTIVATION, ACTIVATION_PYTORCH_TANH, TIE, head_dim_field, size_fields
from flax_impl.hf.families.common import only_default
from flax_impl.hf.families.llama import (
    ATTENTION_KEYS,
    FIXED,
    FULL_ROTARY,
    IGNORE,
    KEYS,
    MLP_HEAD_KEYS,
    QWEN2_DERIVED,
    QWEN2_LAYER_TYPES,
    QWEN2_WINDOW,
)
from flax_impl.hf.rope_params import YARN_MSCALE, rope_fields
from flax_impl.hf.spec import COMMON_IGNORED, Convert, Derived, Family, Field, Key, Require, Unsupported

_QK_NORM_KEYS = (
    Key("layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
    Key("layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
)


def _llama_like(defaults: Mapping[str, Any], act: Field) -> tuple[Field, ...]:
    d = defaults
    return (
        *size_fields(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                     num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                     num_key_value_heads=d["num_key_value_heads"], kv_kind="int?"),
        act,
        Field("max_position_embeddings", "max_len", d["max_position_embeddings"], kind="int"),
        Field("rms_norm_eps", "norm_eps", 1e-6, kind="float"),
        Field("tie_word_embeddings", "lm_head", d["tie_word_embeddings"], TIE, kind="bool"),
        head_dim_field(d["head_dim"]),
        Field("attention_bias", "qkv_bias", False, kind="bool"),  # one switch for q, k, v and o
        Field("attention_bias", "out_bias", False, kind="bool"),
        Field("attention_dropout", "attention_dropout", 0.0, kind="float?"),
        Field("pad_token_id", "padding_idx", d["pad_token_id"], kind="int?"),  # nn.Embedding(padding_idx=...)
    )  # fmt: skip


QWEN3 = Family(
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    prefix="model.",
    config=_llama_like(
        dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
             tie_word_embeddings=False, head_dim=128, pad_token_id=None),
        Field("hidden_act", "activation", "silu", ACTIVATION, kind="str"),
    )  # fmt: skip
    + (*rope_fields(), QWEN2_WINDOW, QWEN2_LAYER_TYPES),
    # Qwen3Attention: RMSNorm over each head's H dims on q and k after the split into heads, before RoPE.
    fixed=dict(FIXED, qk_norm="rmsnorm", mlp_bias=False),
    require=(FULL_ROTARY, *YARN_MSCALE),
    derived=QWEN2_DERIVED,
    keys=KEYS + _QK_NORM_KEYS,
    ignore=IGNORE,
    ignored_hf=COMMON_IGNORED,
)


# ---------------------------------------------------------------------------------------------------------------
# Gemma 2 and 3.


def _gemma_type_list(hf: Mapping[str, Any], every: int) -> list[str]:
    """Each layer's type: layer_types, else sliding except every `every`-th layer (Gemma 2: every 2nd; Gemma 3: its
    sliding_window_pattern, 6), as the config classes' __post_init__."""
    every = hf.get("sliding_window_pattern") or every
    n = hf["num_hidden_layers"]
    out = hf["layer_types"] or ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    if sorted(set(out) - {"sliding_attention", "full_attention"}) or len(out) != n:
        raise Unsupported(f"{n} entries each 'full_attention' or 'sliding_attention' are needed, got {out}")
    return list(out)


def _gemma_layers(every: int) -> tuple[Convert, Convert]:
    """(sliding_window, layer_types) converters. Ours: the window of the sliding layers (None where none slides)
    and the per-layer types where they differ (None where every layer is alike, which sliding_window then says)."""
    reads = {"num_hidden_layers": (26, "int"), "sliding_window": (4096, "int?"), "layer_types": (None, "list[str]?")}
    if every != 2:
        reads["sliding_window_pattern"] = (every, "int")

    def window(v: Any, hf: Mapping[str, Any]) -> int | None:
        return v if v is not None and "sliding_attention" in _gemma_type_list(hf, every) else None

    def types(v: Any, hf: Mapping[str, Any]) -> tuple[str, ...] | None:
        out = _gemma_type_list(hf, every)
        return tuple(out) if window(hf["sliding_window"], hf) is not None and len(set(out)) > 1 else None

    def types_to_hf(v: tuple[str, ...] | None, cfg: TransformerConfig) -> list[str]:
        return list(v) if v is not None else [
            "full_attention" if cfg.sliding_window is None else "sliding_attention"
        ] * cfg.n_layers

    return (Convert("sliding_window (of the sliding layers)", window, lambda v, cfg: v, reads=reads),
            Convert("layer_types (full every n-th)", types, types_to_hf, reads=reads))  # fmt: skip


_SCALAR = Convert("query_pre_attn_scalar", lambda v, hf: float(v),
                  lambda v, cfg: int(v) if float(v).is_integer() else v)  # fmt: skip


def _gemma2_like(
    model_type: str, architecture: str, defaults: Mapping[str, Any], every: int, extra: tuple[Field, ...],
    require: tuple[Require, ...], keys: tuple[Key, ...], derived: tuple[Derived, ...], fixed: Mapping[str, Any],
    renamed: Mapping[str, str],
) -> Family:
    d = defaults
    return Family(
        model_type=model_type,
        architecture=architecture,
        prefix="model.",
        config=_llama_like(d, Field("hidden_activation", "activation", "gelu_pytorch_tanh", ACTIVATION_PYTORCH_TANH,
                                    kind="str"))  # fmt: skip
        + (
            Field("query_pre_attn_scalar", "query_pre_attn_scalar", 256, _SCALAR, kind="int"),  # scores / sqrt(this)
            Field("attn_logit_softcapping", "attn_logit_softcap", d["attn_logit_softcapping"], kind="float?"),
            Field("final_logit_softcapping", "final_logit_softcap", d["final_logit_softcapping"], kind="float?"),
            Field("sliding_window", "sliding_window", 4096, _gemma_layers(every)[0], kind="int?"),
            Field("layer_types", "layer_types", None, _gemma_layers(every)[1], kind="list[str]?"),
            *extra,
        ),  # fmt: skip
        # Gemma2RMSNorm: x (1 + w) in float32; embeddings x sqrt(D); GeGLU (tanh GELU); a norm on each branch's
        # output before the residual add beside the pre-norms ("sandwich").
        fixed=dict(FIXED, norm_offset=1.0, embed_scale=True, mlp_bias=False, branch_norm="sandwich", **fixed),
        require=(
            Require("use_bidirectional_attention", d["use_bidirectional_attention"], (None, False), kind="bool?",
                    why="bidirectional Gemma (EmbeddingGemma) is not mapped"),
            *require,
        ),  # fmt: skip
        derived=derived,
        keys=(
            *ATTENTION_KEYS,  # Llama's: embed_tokens, input_layernorm, q/k/v_proj, o_proj
            Key("layers.{i}.post_attention_layernorm.weight", "blocks.{i}.post_attn_norm.weight"),
            Key("layers.{i}.pre_feedforward_layernorm.weight", "blocks.{i}.ln2.weight"),
            Key("layers.{i}.post_feedforward_layernorm.weight", "blocks.{i}.post_ff_norm.weight"),
            *MLP_HEAD_KEYS,  # Llama's: gate/up/down_proj, norm, lm_head
            *keys,
        ),
        ignore=IGNORE,
        ignored_hf=COMMON_IGNORED,
        renamed=renamed,
    )


_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, max_position_embeddings=8192, tie_word_embeddings=True, head_dim=256, pad_token_id=0,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, use_bidirectional_attention=None,
)  # fmt: skip
GEMMA2 = _gemma2_like(
    "gemma2", "Gemma2ForCausalLM", _GEMMA2_DEFAULTS, 2, extra=rope_fields(), require=(FULL_ROTARY, *YARN_MSCALE),
    keys=(), derived=(), fixed={}, renamed={},
)  # fmt: skip

# Gemma 3's rope_parameters hold one dict per layer type; transformers 4 configs give the full layers' as the
# top-level rope_theta / rope_scaling and the sliding layers' base as rope_local_base_freq.
_FULL, _SLIDING = "rope_parameters.full_attention.", "rope_parameters.sliding_attention."
GEMMA3_TEXT = _gemma2_like(
    "gemma3_text", "Gemma3ForCausalLM",
    dict(_GEMMA2_DEFAULTS, vocab_size=262_208, max_position_embeddings=131_072, attn_logit_softcapping=None,
         final_logit_softcapping=None, use_bidirectional_attention=False),
    6,
    extra=(
        *rope_fields(1_000_000.0, prefix=_FULL),
        Field(_SLIDING + "rope_theta", "rope_local_base", 10_000.0, kind="float"),
    ),
    require=(
        only_default(_SLIDING + "rope_type", "default", "the sliding layers rotate with plain RoPE of their own base",
                     kind="str"),
        Require(_FULL + "partial_rotary_factor", None, (None, 1, 1.0), kind="float?",
                why="Gemma 3 rotates the whole head"),
    ),
    keys=tuple(Key(k.hf, k.ours) for k in _QK_NORM_KEYS),
    derived=(Derived(_SLIDING + "rope_type", lambda c: "default"),),
    # Gemma3RMSNorm (1 + w) on q and k over each head's H dims, before RoPE.
    fixed=dict(qk_norm="rmsnorm"),
    renamed={
        "rope_parameters.rope_type": _FULL + "rope_type", "rope_parameters.rope_theta": _FULL + "rope_theta",
        "rope_parameters.factor": _FULL + "factor", "rope_local_base_freq": _SLIDING + "rope_theta",
    },
)  # fmt: skip
