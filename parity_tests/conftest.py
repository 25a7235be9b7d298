"""Shared fixtures: precision pinned, seeds, small configs, and the weight-copy helpers."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import flax_impl as fi  # noqa: E402
import torch_ref as tr  # noqa: E402

torch.set_num_threads(2)

POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "none")


def small_config(**changes) -> fi.EncoderConfig:
    """A small encoder (2 layers, D=32, 4 heads) with dropout off: fast to compile on 2 cores."""
    base = dict(vocab_size=97, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=64, dropout=0.0)
    base.update(changes)
    return fi.EncoderConfig(**base)


def twins(cls_name: str, config: fi.EncoderConfig, seed: int = 0):
    """Build flax_impl.<cls_name> and torch_ref.<cls_name>, copy the Flax weights into torch, both in eval."""
    flax_mod = getattr(fi, cls_name)(config, rngs=nnx.Rngs(seed))
    torch_mod = getattr(tr, cls_name)(config)
    torch_mod.load_state_dict(fi.to_torch_state_dict(flax_mod))
    flax_mod.eval()
    torch_mod.eval()
    return flax_mod, torch_mod


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Non-trivial unit-scale float32 input."""
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
