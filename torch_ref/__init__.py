"""torch_ref: the plain-PyTorch twins of flax_impl's modules, file for file, same names."""

from torch_ref.attention import MultiHeadAttention, from_torch_mha_mask
from torch_ref.block import GatedMLP, TransformerBlock
from torch_ref.config import TrainConfig, TransformerConfig
from torch_ref.dropout import Dropout
from torch_ref.embedding import Embed
from torch_ref.encoder import TransformerEncoder
from torch_ref.norm import LayerNorm, RMSNorm
from torch_ref.pipeline import TransformerInput, encode_text
from torch_ref.positions import (
    LearnedPositions,
    alibi_bias,
    alibi_slopes,
    apply_rope,
    sinusoidal_table,
)
from torch_ref.tokenizer import ByteTokenizer, as_tokenizer, batch_encode
from torch_ref.train import lr_lambda, make_optimizer, train_step
from torch_ref.utils import count_params, from_numpy_state_dict

__all__ = [
    "ByteTokenizer",
    "Dropout",
    "Embed",
    "GatedMLP",
    "TransformerConfig",
    "LayerNorm",
    "LearnedPositions",
    "MultiHeadAttention",
    "RMSNorm",
    "TransformerBlock",
    "TransformerEncoder",
    "TransformerInput",
    "TrainConfig",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "as_tokenizer",
    "batch_encode",
    "count_params",
    "encode_text",
    "from_numpy_state_dict",
    "from_torch_mha_mask",
    "lr_lambda",
    "make_optimizer",
    "sinusoidal_table",
    "train_step",
]
