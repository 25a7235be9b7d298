"""The shared tokenizers (one definition, pure Python + numpy, in flax_impl/tokenizer.py); torch_ref reads them."""

from flax_impl.tokenizer import (
    BOS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    ByteTokenizer,
    TokenizerAdapter,
    TokenizerLike,
    as_tokenizer,
    batch_encode,
    encode_checked,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "MASK_ID",
    "PAD_ID",
    "ByteTokenizer",
    "TokenizerAdapter",
    "TokenizerLike",
    "as_tokenizer",
    "batch_encode",
    "encode_checked",
]
