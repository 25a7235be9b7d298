"""The BERT-like encoders: bert, roberta, xlm-roberta, distilbert. Post-LN blocks (a LayerNorm after each residual
sum), learned positions, a LayerNorm after the input sum, no final norm, the exact GELU; the base models
(BertModel, ...) have no LM head: `model.logits(h)` is the tied readout.

RoBERTa / XLM-R take positions from the ids: cumsum(ids != pad) * (ids != pad) + pad_token_id, i.e. our
positions_from="tokens" with position_offset = pad_token_id + 1 (a padded token at pad_token_id).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_impl.hf.converters import ACTIVATION
from flax_impl.hf.families.common import NO_CROSS_ATTENTION, only_default
from flax_impl.hf.spec import COMMON_IGNORED, SAME, Convert, Family, Field, Key, Unsupported

_ENCODER = dict(
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
    lm_head="tied",  # the base models have no LM head; model.logits(h) is the tied readout
)
_NOT_A_DECODER = only_default(
    "is_decoder", False, "the model as a causal decoder (XLMHeadModel) is not supported", kind="bool"
)


def _bert_fields(vocab: int, pad: int, pad_convert: Convert = SAME) -> tuple[Field, ...]:
    return (
        Field("vocab_size", "vocab_size", vocab, kind="int"),
        Field("hidden_size", "d_model", 768, kind="int"),
        Field("num_hidden_layers", "n_layers", 12, kind="int"),
        Field("num_attention_heads", "n_heads", 12, kind="int"),
        Field("intermediate_size", "d_ff", 3072, kind="int"),
        Field("hidden_act", "activation", "gelu", ACTIVATION, kind="str"),  # "gelu" is the exact erf form
        Field("hidden_dropout_prob", "dropout", 0.1, kind="float"),
        Field("attention_probs_dropout_prob", "attention_dropout", 0.1, kind="float"),
        Field("max_position_embeddings", "max_len", 512, kind="int"),
        # token_type_embeddings, added before embeddings.LayerNorm:
        Field("type_vocab_size", "type_vocab_size", 2, kind="int"),
        Field("layer_norm_eps", "norm_eps", 1e-12, kind="float"),
        Field("pad_token_id", "padding_idx", pad, pad_convert, kind="int?"),  # nn.Embedding(padding_idx=...)
    )


def _roberta_pad(v: Any, hf: Mapping[str, Any]) -> int:
    if v is None:
        raise Unsupported("RoBERTa counts its positions from the ids that are not pad_token_id: it needs one")
    return int(v)


# nn.Embedding(..., padding_idx=pad_token_id); RoBERTa's positions also count from it.
_PAD = Convert("pad_token_id (positions count the other ids)", _roberta_pad, lambda v, cfg: v)
_POSITION_OFFSET = Convert(
    "pad_token_id + 1 (the first real token's position)",
    lambda v, hf: 0 if v is None else int(v) + 1,
    lambda v, cfg: v - 1,
)

_BERT_KEYS = (
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
)
_BERT_IGNORED_HF = COMMON_IGNORED + (
    "classifier_dropout",  # task heads only
    "tie_word_embeddings",  # the base model has no LM head to tie
)

BERT = Family(
    model_type="bert",
    architecture="BertModel",
    prefix="bert.",
    saved_prefix="",  # BertModel's own keys
    config=_bert_fields(30522, 0),
    fixed=_ENCODER,
    require=(
        only_default("is_decoder", False, "BERT as a causal decoder (BertLMHeadModel) is not supported", kind="bool"),
        # transformers 4's key; transformers 5 has absolute positions only
        only_default(
            "position_embedding_type", "absolute",
            "relative position embeddings (relative_key, relative_key_query) are not implemented", kind="str?",
        ),  # fmt: skip
        NO_CROSS_ATTENTION,
    ),
    keys=_BERT_KEYS,
    # Task heads we do not model (BertModel's pooler; the MLM / next-sentence heads of BertForPreTraining and
    # BertForMaskedLM), and the position_ids buffer of older checkpoints. `last_hidden_state` needs none of them.
    ignore=(r"pooler\..*", r"cls\..*", r"embeddings\.position_ids"),
    ignored_hf=_BERT_IGNORED_HF,
)


def _roberta(model_type: str, architecture: str, vocab: int) -> Family:
    return Family(
        model_type=model_type,
        architecture=architecture,
        prefix="roberta.",
        saved_prefix="",  # RobertaModel's own keys
        config=_bert_fields(vocab, 1, _PAD)
        + (Field("pad_token_id", "position_offset", 1, _POSITION_OFFSET, kind="int?"),),
        fixed=dict(_ENCODER, positions_from="tokens"),
        require=(_NOT_A_DECODER, NO_CROSS_ATTENTION),
        keys=_BERT_KEYS,
        # The pooler, the task heads of RobertaForMaskedLM (lm_head.*), ...ForSequenceClassification
        # (classifier.*), and older checkpoints' buffers.
        ignore=(r"pooler\..*", r"lm_head\..*", r"classifier\..*", r"embeddings\.position_ids"),
        ignored_hf=_BERT_IGNORED_HF,
    )


ROBERTA = _roberta("roberta", "RobertaModel", 50265)
XLM_ROBERTA = _roberta("xlm-roberta", "XLMRobertaModel", 30522)


DISTILBERT = Family(
    model_type="distilbert",
    architecture="DistilBertModel",
    prefix="distilbert.",
    saved_prefix="",
    config=(
        Field("vocab_size", "vocab_size", 30522, kind="int"),
        Field("dim", "d_model", 768, kind="int"),
        Field("n_layers", "n_layers", 6, kind="int"),
        Field("n_heads", "n_heads", 12, kind="int"),
        Field("hidden_dim", "d_ff", 4 * 768, kind="int"),
        Field("activation", "activation", "gelu", ACTIVATION, kind="str"),
        Field("dropout", "dropout", 0.1, kind="float"),
        Field("attention_dropout", "attention_dropout", 0.1, kind="float"),
        Field("max_position_embeddings", "max_len", 512, kind="int"),
        Field("pad_token_id", "padding_idx", 0, kind="int?"),
    ),
    fixed=dict(_ENCODER, norm_eps=1e-12, type_vocab_size=0),  # its LayerNorms' eps is 1e-12 in the code
    require=(),
    keys=(
        Key("embeddings.word_embeddings.weight", "input.embed.weight"),
        Key("embeddings.position_embeddings.weight", "input.pos.weight"),
        Key("embeddings.LayerNorm.{p}", "input.norm.{p}"),
        Key("transformer.layer.{i}.attention.{part}_lin.{p}", "blocks.{i}.attn.in_proj_{p}", "qkv_concat",
            ("q", "k", "v")),  # fmt: skip
        Key("transformer.layer.{i}.attention.out_lin.{p}", "blocks.{i}.attn.out_proj.{p}"),
        Key("transformer.layer.{i}.sa_layer_norm.{p}", "blocks.{i}.ln1.{p}"),
        Key("transformer.layer.{i}.ffn.lin1.{p}", "blocks.{i}.ff.0.{p}"),
        Key("transformer.layer.{i}.ffn.lin2.{p}", "blocks.{i}.ff.3.{p}"),
        Key("transformer.layer.{i}.output_layer_norm.{p}", "blocks.{i}.ln2.{p}"),
    ),
    # The MLM head (vocab_transform, vocab_layer_norm, vocab_projector), the task heads, older buffers.
    ignore=(r"vocab_(transform|layer_norm|projector)\..*", r"(pre_classifier|classifier|qa_outputs)\..*",
            r"embeddings\.position_ids"),  # fmt: skip
    ignored_hf=COMMON_IGNORED
    + (
        # How the stored position table is initialised (sin / cos rows); the forward reads whatever is stored, as
        # learned positions, and the checkpoint holds the table.
        "sinusoidal_pos_embds",
        "qa_dropout",  # task heads only
        "seq_classif_dropout",
        "tie_word_embeddings",  # DistilBertModel has no LM head to tie
    ),
)
