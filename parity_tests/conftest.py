"""Shared fixtures: precision pinned, seeds, small configs, and the weight-copy helpers."""

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import flax_impl as fi  # noqa: E402
from flax_impl.config import POSITIONS  # noqa: E402, F401  (re-exported to the tests)
from flax_impl.parity import build_twins  # noqa: E402

torch.set_num_threads(2)



def small_config(**changes) -> fi.EncoderConfig:
    """A small encoder (2 layers, D=32, 4 heads) with dropout off: fast to compile on 2 cores."""
    base = dict(vocab_size=97, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=64, dropout=0.0)
    base.update(changes)
    return fi.EncoderConfig(**base)


# twins("TransformerBlock", cfg) -> (flax module, torch module), Flax weights copied into torch, both in eval
twins = build_twins


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Non-trivial unit-scale float32 input."""
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
