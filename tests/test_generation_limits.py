"""The edges of sampling's options, for both twins (issue 28): a seed beyond what `jax.random.key` holds is refused
rather than aliased; a temperature too small for float32 is refused; and down to the smallest one allowed,
sampling tends to greedy instead of overflowing (logits / T -> inf, inf - inf = NaN) into garbage."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import small_config

import flax_impl as fi
import torch_ref as tr
from flax_impl.generation import choose
from flax_impl.generation_config import MIN_TEMPERATURE, SEED_LIMIT, GenerationConfig
from torch_ref import generation as tg


def test_jax_keys_alias_past_the_seed_limit():
    """The premise of SEED_LIMIT: jax.random.key(2**32 + s) is the key of s."""
    for s in (0, 7):
        np.testing.assert_array_equal(
            jax.random.key_data(jax.random.key(SEED_LIMIT + s)), jax.random.key_data(jax.random.key(s))
        )
    assert (jax.random.key_data(jax.random.key(SEED_LIMIT - 1)) != jax.random.key_data(jax.random.key(0))).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=SEED_LIMIT), r"seed=4294967296 must be an integer in \[0, 2\*\*32\): .* the key of seed 0"),
        (dict(seed=2**64), "seed=18446744073709551616"),
        (dict(do_sample=True, temperature=float("inf")), "temperature=inf must be a finite number > 0"),
        (dict(do_sample=True, temperature=1e-39), "temperature=1e-39 must be >= 1.17549e-38"),
        (dict(do_sample=True, temperature=1e-300), "temperature=1e-300 must be >= 1.17549e-38"),
    ],
)
def test_generation_config_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(max_new_tokens=1, **kwargs)
    GenerationConfig(max_new_tokens=1, seed=SEED_LIMIT - 1, do_sample=True, temperature=MIN_TEMPERATURE)


def _logits() -> np.ndarray:
    """(B, V) logits of magnitude ~10, both signs, with one clear maximum per row: logits / 1e-37 overflow."""
    return (np.random.default_rng(0).standard_normal((8, 50)) * 10).astype(np.float32)


@pytest.mark.parametrize("temperature", [1e-37, MIN_TEMPERATURE])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 0.9)])
def test_a_tiny_temperature_samples_greedily(temperature, top_k, top_p):
    logits = _logits()
    keys = jax.random.split(jax.random.key(0), 16)
    draws = np.asarray(jax.vmap(lambda k: choose(logits, k, True, np.float32(temperature), top_k, top_p))(keys))
    np.testing.assert_array_equal(draws, np.broadcast_to(logits.argmax(axis=-1), draws.shape))


def test_the_torch_twin_samples_greedily_at_a_tiny_temperature():
    cfg = small_config(causal=True, position="rope")
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    twin = tr.Transformer(cfg).eval()
    twin.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(model)))
    prompts = [[5, 6, 7], [8, 9]]
    greedy = tg.generate(twin, prompts, max_new_tokens=6)
    for temperature in (1e-37, MIN_TEMPERATURE):
        sampled = tg.generate(twin, prompts, max_new_tokens=6, do_sample=True, temperature=temperature, seed=3)
        torch.testing.assert_close(sampled.tokens, greedy.tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed=4294967296"):
        tg.generate(twin, prompts, max_new_tokens=1, seed=SEED_LIMIT)
