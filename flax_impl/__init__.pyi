"""The public names of flax_impl, listed once: type checkers read this stub, and `flax_impl/__init__.py` reads it to
import each name from its module on first use (so that the pure-Python `flax_impl.config` loads without jax)."""

from flax_impl.attention import MultiHeadAttention as MultiHeadAttention, from_torch_mha_mask as from_torch_mha_mask
from flax_impl.block import GatedMLP as GatedMLP, TransformerBlock as TransformerBlock
from flax_impl.cache import KVCache as KVCache, init_cache as init_cache
from flax_impl.checkpoint import (
    CheckpointInfo as CheckpointInfo,
    checkpoint_info as checkpoint_info,
    checkpoint_steps as checkpoint_steps,
    restore_checkpoint as restore_checkpoint,
    save_checkpoint as save_checkpoint,
)
from flax_impl.checkpoint_dir import CheckpointError as CheckpointError
from flax_impl.config import (
    FlaxConfig as FlaxConfig,
    TrainConfig as TrainConfig,
    TransformerConfig as TransformerConfig,
)
from flax_impl.distributed import (
    check_shardable as check_shardable,
    create_sharded_model as create_sharded_model,
    create_sharded_optimizer as create_sharded_optimizer,
    make_mesh as make_mesh,
    param_shardings as param_shardings,
    parse_mesh as parse_mesh,
    reshard as reshard,
    shard_batch as shard_batch,
    sharded_forward as sharded_forward,
    sharded_train_step as sharded_train_step,
)
from flax_impl.dropout import Dropout as Dropout
from flax_impl.embedding import Embed as Embed, check_ids as check_ids
from flax_impl.generation import GenerateOutput as GenerateOutput, filter_logits as filter_logits, generate as generate
from flax_impl.generation_config import GenerationConfig as GenerationConfig
from flax_impl.hf.adapters import load_peft_adapter as load_peft_adapter, save_peft_adapter as save_peft_adapter
from flax_impl.interop import (
    load as load,
    load_model as load_model,
    load_torch_state_dict as load_torch_state_dict,
    save as save,
    to_numpy_state_dict as to_numpy_state_dict,
)
from flax_impl.lora import (
    LoraConfig as LoraConfig,
    LoraParam as LoraParam,
    apply_lora as apply_lora,
    lora_config as lora_config,
    make_lora_optimizer as make_lora_optimizer,
    merge_lora as merge_lora,
    merged_model as merged_model,
    unmerge_lora as unmerge_lora,
)
from flax_impl.norm import LayerNorm as LayerNorm, RMSNorm as RMSNorm
from flax_impl.pipeline import TransformerInput as TransformerInput, encode_text as encode_text
from flax_impl.positions import (
    LearnedPositions as LearnedPositions,
    alibi_bias as alibi_bias,
    alibi_slopes as alibi_slopes,
    apply_rope as apply_rope,
    sinusoidal_table as sinusoidal_table,
)
from flax_impl.tokenizer import (
    ByteTokenizer as ByteTokenizer,
    as_tokenizer as as_tokenizer,
    batch_encode as batch_encode,
)
from flax_impl.torch_keys import (
    from_torch_encoder_layer as from_torch_encoder_layer,
    to_torch_encoder_layer as to_torch_encoder_layer,
)
from flax_impl.train import (
    eval_step as eval_step,
    lr_schedule as lr_schedule,
    make_optimizer as make_optimizer,
    masked_token_batch as masked_token_batch,
    next_token_batch as next_token_batch,
    train_step as train_step,
)
from flax_impl.transformer import Transformer as Transformer
from flax_impl.utils import count_params as count_params

__version__: str
