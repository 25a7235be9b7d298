"""Helpers shared by the test folders (`from helpers import ...`; pyproject puts parity_tests on the path)."""

import numpy as np

import flax_impl as fi
from flax_impl.apps.parity import build_twins
from flax_impl.config import POSITIONS

__all__ = ["POSITIONS", "SENTENCES", "perturbed_twins", "randn", "small_config", "twins"]

SENTENCES = [
    "Position is information, and the architecture chooses where it enters.",
    "Sinusoidal positions are added to the embeddings at the input.",
    "RoPE rotates the queries and keys inside attention.",
    "ALiBi adds a bias to the attention scores; the embeddings enter unchanged.",
    "Learned positions have a hard maximum length.",
]


def small_config(**changes) -> fi.TransformerConfig:
    """A small architecture (2 layers, D=32, 4 heads) with dropout off: fast to compile on 2 cores."""
    base = dict(vocab_size=97, d_model=32, n_heads=4, d_ff=64, n_layers=2, max_len=64, dropout=0.0)
    base.update(changes)
    return fi.TransformerConfig(**base)


# twins("TransformerBlock", cfg) -> (flax module, torch module), Flax weights copied into torch, both in eval
twins = build_twins


def randn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Non-trivial unit-scale float32 input."""
    return rng.standard_normal(shape).astype(np.float32)


def perturbed_twins(name: str, config: fi.TransformerConfig, rng: np.random.Generator, **kw):
    """`twins`, then every Flax parameter (norm scales and biases included, which initialise to 1 and 0) moved by
    random noise of its init's spread (0.5 for constant inits), and copied into torch again: a swapped bias or
    norm cannot hide, and activations stay near unit scale."""
    import jax.numpy as jnp
    from flax import nnx

    f, t = build_twins(name, config, **kw)
    state = nnx.state(f, nnx.Param)
    for _, var in nnx.to_flat_state(state):
        value = np.asarray(var[...])
        spread = float(value.std()) or 0.5  # a kernel keeps its init's scale; ones and zeros move by ~0.5
        var[...] = jnp.asarray(value + rng.standard_normal(value.shape).astype(np.float32) * spread)
    nnx.update(f, state)
    t.load_state_dict(fi.to_torch_state_dict(f))
    return f, t
