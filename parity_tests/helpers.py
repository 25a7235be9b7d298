"""Helpers shared by the test folders (`from helpers import ...`; pyproject puts parity_tests on the path)."""

import json

import numpy as np

import flax_impl as fi
import torch_ref as tr
from flax_impl.apps.parity import build_twins
from flax_impl.config import POSITIONS

__all__ = [
    "ALIBI_SLOPES",
    "POSITIONS",
    "SENTENCES",
    "perturbed_twins",
    "randn",
    "eight_device_report",
    "eight_device_report",
    "small_config",
    "twins",
    "alibi_bias_formula",
]

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
    t.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(f)))
    return f, t


# ALiBi of Press et al.: slopes written out by hand for small head counts, and the bias formula in numpy.
def alibi_bias_formula(q_len: int, k_len: int, slopes, causal: bool) -> np.ndarray:
    """-m|i - j| (bidirectional) or -m(i - j) for j <= i, 0 above (causal); query row t is position k_len - q_len + t.

    The slopes are float32 (as alibi_slopes returns them); each product is exact in float64, then rounded once."""
    slopes = np.asarray(slopes, dtype=np.float32).astype(np.float64)
    i = np.arange(k_len - q_len, k_len)[:, None]
    j = np.arange(k_len)[None, :]
    dist = np.where(j <= i, i - j, 0) if causal else np.abs(i - j)
    return (-slopes[:, None, None] * dist[None]).astype(np.float32)


ALIBI_SLOPES = {
    1: [2.0**-8],
    2: [2.0**-4, 2.0**-8],
    3: [2.0**-4, 2.0**-8, 2.0**-2],
    6: [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3],
    8: [2.0**-k for k in range(1, 9)],
    12: [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5],
    16: [2.0 ** (-k / 2) for k in range(1, 17)],
}



def eight_device_report(worker, timeout: int = 900) -> dict:
    """Run `python worker` with 8 simulated CPU devices (the test process itself has one); the JSON report its
    last stdout line holds."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
