"""The shared TransformerConfig and TrainConfig (one definition, pure Python, in flax_impl/config.py); torch_ref
reads them only."""

from flax_impl.config import TrainConfig, TransformerConfig, rope_width

__all__ = ["TransformerConfig", "TrainConfig", "rope_width"]
