"""The shared TransformerConfig and TrainConfig (one definition, pure Python, in flax_impl/config.py); torch_ref
reads them only."""

from flax_impl.config import ROPE_STYLES, TrainConfig, TransformerConfig, as_config, rope_width

__all__ = ["ROPE_STYLES", "TransformerConfig", "TrainConfig", "as_config", "rope_width"]
