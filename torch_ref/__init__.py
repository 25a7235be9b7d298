"""torch_ref: the plain-PyTorch twins of flax_impl's modules, file for file, same names."""

from torch_ref.attention import MultiHeadAttention, from_torch_mha_mask
from torch_ref.block import GatedMLP, TransformerBlock
from torch_ref.cache import KVCache, init_cache
from torch_ref.config import TrainConfig, TransformerConfig
from torch_ref.dropout import Dropout
from torch_ref.embedding import Embed
from torch_ref.generation import GenerateOutput, filter_logits, generate
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
from torch_ref.transformer import Transformer
from torch_ref.utils import count_params, from_numpy_state_dict

__all__ = [
    "ByteTokenizer",
    "Dropout",
    "Embed",
    "GatedMLP",
    "GenerateOutput",
    "KVCache",
    "TransformerConfig",
    "LayerNorm",
    "LearnedPositions",
    "MultiHeadAttention",
    "RMSNorm",
    "TransformerBlock",
    "Transformer",
    "TransformerInput",
    "TrainConfig",
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "as_tokenizer",
    "batch_encode",
    "count_params",
    "encode_text",
    "filter_logits",
    "from_numpy_state_dict",
    "from_torch_mha_mask",
    "generate",
    "init_cache",
    "lr_lambda",
    "make_optimizer",
    "sinusoidal_table",
    "train_step",
]
