"""The shared EncoderConfig and TrainConfig (one definition, pure Python, in flax_impl/config.py); torch_ref
reads them only."""

from flax_impl.config import EncoderConfig, TrainConfig, rope_width

__all__ = ["EncoderConfig", "TrainConfig", "rope_width"]
