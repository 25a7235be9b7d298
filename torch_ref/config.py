"""The shared EncoderConfig (one definition, pure Python, in flax_impl/config.py); torch_ref reads it only."""

from flax_impl.config import EncoderConfig, rope_width

__all__ = ["EncoderConfig", "rope_width"]
