"""flax_impl: Transformer building blocks in JAX/Flax NNX, each with a PyTorch twin in torch_ref.

Attributes are imported on first use, so that `flax_impl.config` (pure Python) can be read without jax. The
library imports neither torch, torch_ref nor argparse (weights reach torch as numpy:
`torch_ref.from_numpy_state_dict(to_numpy_state_dict(model))`); the `flax-impl` command lives in `flax_impl.apps`.

Example:
    >>> import flax_impl as fi
    >>> from flax import nnx
    >>> cfg = fi.TransformerConfig(vocab_size=260, d_model=64, n_heads=4, d_ff=256, n_layers=2)
    >>> model = fi.Transformer(cfg, rngs=nnx.Rngs(0)); model.eval()
    >>> ids, mask = fi.batch_encode(["hello", "hi"], fi.ByteTokenizer())    # (B, L) each
    >>> model(ids, mask).shape                                              # (B, L, D)
    (2, 5, 64)

Generation (causal models): `flax_impl.generate(model, prompts, max_new_tokens=...)`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "TransformerConfig": "flax_impl.config",
    "FlaxConfig": "flax_impl.config",
    "Dropout": "flax_impl.dropout",
    "Embed": "flax_impl.embedding",
    "check_ids": "flax_impl.embedding",
    "LearnedPositions": "flax_impl.positions",
    "sinusoidal_table": "flax_impl.positions",
    "apply_rope": "flax_impl.positions",
    "alibi_slopes": "flax_impl.positions",
    "alibi_bias": "flax_impl.positions",
    "MultiHeadAttention": "flax_impl.attention",
    "KVCache": "flax_impl.cache",
    "init_cache": "flax_impl.cache",
    "generate": "flax_impl.generation",
    "GenerateOutput": "flax_impl.generation",
    "filter_logits": "flax_impl.generation",
    "GenerationConfig": "flax_impl.generation_config",
    "from_torch_mha_mask": "flax_impl.attention",
    "TransformerBlock": "flax_impl.block",
    "GatedMLP": "flax_impl.block",
    "save_checkpoint": "flax_impl.checkpoint",
    "restore_checkpoint": "flax_impl.checkpoint",
    "checkpoint_steps": "flax_impl.checkpoint",
    "LayerNorm": "flax_impl.norm",
    "RMSNorm": "flax_impl.norm",
    "TransformerInput": "flax_impl.pipeline",
    "encode_text": "flax_impl.pipeline",
    "ByteTokenizer": "flax_impl.tokenizer",
    "as_tokenizer": "flax_impl.tokenizer",
    "batch_encode": "flax_impl.tokenizer",
    "Transformer": "flax_impl.transformer",
    "to_numpy_state_dict": "flax_impl.interop",
    "load_torch_state_dict": "flax_impl.interop",
    "from_torch_encoder_layer": "flax_impl.interop",
    "to_torch_encoder_layer": "flax_impl.interop",
    "save": "flax_impl.interop",
    "load": "flax_impl.interop",
    "count_params": "flax_impl.utils",
    "make_mesh": "flax_impl.distributed",
    "parse_mesh": "flax_impl.distributed",
    "check_shardable": "flax_impl.distributed",
    "create_sharded_model": "flax_impl.distributed",
    "create_sharded_optimizer": "flax_impl.distributed",
    "shard_batch": "flax_impl.distributed",
    "sharded_forward": "flax_impl.distributed",
    "sharded_train_step": "flax_impl.distributed",
    "param_shardings": "flax_impl.distributed",
    "reshard": "flax_impl.distributed",
    "TrainConfig": "flax_impl.config",
    "train_step": "flax_impl.train",
    "eval_step": "flax_impl.train",
    "make_optimizer": "flax_impl.train",
    "lr_schedule": "flax_impl.train",
    "masked_token_batch": "flax_impl.train",
    "next_token_batch": "flax_impl.train",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # let type checkers and IDEs see the real names
    from flax_impl.attention import MultiHeadAttention, from_torch_mha_mask  # noqa: F401
    from flax_impl.block import GatedMLP, TransformerBlock  # noqa: F401
    from flax_impl.cache import KVCache, init_cache  # noqa: F401
    from flax_impl.checkpoint import checkpoint_steps, restore_checkpoint, save_checkpoint  # noqa: F401
    from flax_impl.config import FlaxConfig, TrainConfig, TransformerConfig  # noqa: F401
    from flax_impl.distributed import (  # noqa: F401
        check_shardable,
        create_sharded_model,
        create_sharded_optimizer,
        make_mesh,
        param_shardings,
        parse_mesh,
        reshard,
        shard_batch,
        sharded_forward,
        sharded_train_step,
    )
    from flax_impl.dropout import Dropout  # noqa: F401
    from flax_impl.embedding import Embed, check_ids  # noqa: F401
    from flax_impl.generation import GenerateOutput, filter_logits, generate  # noqa: F401
    from flax_impl.generation_config import GenerationConfig  # noqa: F401
    from flax_impl.interop import (  # noqa: F401
        from_torch_encoder_layer,
        load,
        load_torch_state_dict,
        save,
        to_numpy_state_dict,
        to_torch_encoder_layer,
    )
    from flax_impl.norm import LayerNorm, RMSNorm  # noqa: F401
    from flax_impl.pipeline import TransformerInput, encode_text  # noqa: F401
    from flax_impl.positions import (  # noqa: F401
        LearnedPositions,
        alibi_bias,
        alibi_slopes,
        apply_rope,
        sinusoidal_table,
    )
    from flax_impl.tokenizer import ByteTokenizer, as_tokenizer, batch_encode  # noqa: F401
    from flax_impl.train import (  # noqa: F401
        eval_step,
        lr_schedule,
        make_optimizer,
        masked_token_batch,
        next_token_batch,
        train_step,
    )
    from flax_impl.transformer import Transformer  # noqa: F401
    from flax_impl.utils import count_params  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flax_impl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
