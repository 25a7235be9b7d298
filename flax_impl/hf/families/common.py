"""What several family tables share."""

from __future__ import annotations

from typing import Any

from flax_impl.hf.spec import Require


def only_default(hf: str, default: Any, why: str, *, kind: str) -> Require:
    """A Require that accepts transformers' default alone.

    Args:
        hf: the config.json key.
        default: the config class's default, the one value implemented.
        why: what another value would do that flax_impl does not (in the refusal).
        kind: the key's JSON kind.

    Returns:
        Require(hf, default, (default,), why=why, kind=kind).
    """
    return Require(hf, default, (default,), why=why, kind=kind)


NO_CROSS_ATTENTION = only_default(
    "add_cross_attention", False, "cross-attention layers are not implemented", kind="bool"
)
# Older GPT-2-style checkpoints (gpt2, gpt_bigcode, gptj) carry each layer's causal-mask buffers ("attn.bias",
# "attn.masked_bias"): not weights.
MASK_BUFFERS = (r"h\.\d+\.attn\.(bias|masked_bias)",)
# A plain pre-LN decoder with LayerNorm and a plain MLP: what GPT-2, BLOOM, MPT, OPT and GPT-BigCode share.
DECODER = dict(
    norm="layernorm",
    mlp="plain",
    norm_first=True,
    final_norm=True,
    causal=True,
    embed_scale=False,
    padding_idx=None,  # their embeddings have no padding_idx (OPT's table says otherwise)
    sliding_window=None,
    parallel_residual=False,
    type_vocab_size=0,
    lm_head_bias=False,
)
