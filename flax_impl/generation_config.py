"""The options of cached generation and the left-padding of prompts: pure Python + numpy, one definition that
both twins' `generate` read (flax_impl.generation, torch_ref.generation), so both refuse the same input the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flax_impl.config import TransformerConfig
from flax_impl.validation import ArgumentTypeError, check_bool, check_float, check_int

# Seeds are jax.random.key's: it holds 32 bits (2**32 gives the key of 0), so larger seeds would alias others.
SEED_LIMIT = 2**32
# Sampling computes in float32: a temperature below float32's smallest normal number is 0 or subnormal there
# (flushed to 0 by XLA on CPU), and logits / 0 is NaN. Down to it, sampling tends to greedy (see `choose`).
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue prompts; checked when built.

    Attributes:
        max_new_tokens: int >= 1.
        do_sample: False = greedy (argmax); True = sample with temperature, top_k, top_p.
        temperature: finite, >= MIN_TEMPERATURE (float32's smallest normal number, ~1.2e-38; read only when
            sampling). As it goes to 0, sampling tends to greedy.
        top_k: int >= 0, 0 = off (sampling).
        top_p: in (0, 1], 1 = off (sampling).
        seed: int in [0, 2**32), the sampling seed (what jax.random.key holds: larger seeds would alias).
        stop_tokens: ids that end a row (kept in its output); a row then emits `pad_id`.
        pad_id: the id a stopped row emits.
        return_logits: also return every step's logits.
    Raises:
        TypeError: a field of the wrong type (bool where an int is expected included): the
            `flax_impl.validation.ArgumentTypeError` of every config.
        ValueError: a field out of range (NaN and inf included).
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()
    pad_id: int = 0
    return_logits: bool = False

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        if check_int("seed", self.seed, low=0) >= SEED_LIMIT:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32): jax.random.key({self.seed}) is "
                             f"the key of seed {self.seed % SEED_LIMIT}")  # fmt: skip
        check_int("top_k", self.top_k, low=0)
        check_int("pad_id", self.pad_id, low=0)
        check_bool("do_sample", self.do_sample)
        check_bool("return_logits", self.return_logits)
        if self.do_sample:
            check_float("temperature", self.temperature, low=0.0, low_open=True)
            if self.temperature < MIN_TEMPERATURE:
                raise ValueError(
                    f"temperature={self.temperature!r} must be >= {MIN_TEMPERATURE:g} (float32's smallest normal "
                    "number: below it the float32 division of sampling breaks); use do_sample=False for greedy"
                )
        else:  # not read when greedy, but still a number
            check_float("temperature", self.temperature)
        check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        if isinstance(self.stop_tokens, (str, bytes)) or not isinstance(self.stop_tokens, Sequence):
            raise ArgumentTypeError(f"stop_tokens={self.stop_tokens!r} must be a sequence of token ids")
        tokens = tuple(check_int(f"stop_tokens[{i}]", t, low=0) for i, t in enumerate(self.stop_tokens))
        object.__setattr__(self, "stop_tokens", tokens)

    def check_vocabulary(self, vocab_size: int) -> None:
        """IndexError if a stop token or pad_id is not below vocab_size."""
        for name, value in [("pad_id", self.pad_id)] + [("stop token", t) for t in self.stop_tokens]:
            if value >= vocab_size:
                raise IndexError(f"{name} {value} is outside the vocabulary [0, {vocab_size})")


def left_pad(
    prompts: Sequence[Sequence[int]] | np.ndarray,
    mask: np.ndarray | None,
    config: TransformerConfig,
    max_new_tokens: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as a left-padded (B, P) int64 array (pads 0) and its (B, P) bool mask (True = real), checked.

    Args:
        prompts: B non-empty lists of ids, or a (B, P) integer array (anything with __array__) with `mask`.
        mask: (B, P) 0/1 for an array (None: every token real); each row zeros, then ones to the end.
        config: the model's architecture (causal, vocab_size, max_len).
        max_new_tokens: the tokens to add: the longest prompt plus these must fit in config.max_len.
    Returns:
        (ids, real).
    Raises:
        TypeError: prompts not a non-empty list of id lists or an integer array; a non-integer id.
        ValueError: a non-causal model; an empty prompt; a mask of another shape, not 0/1 or not left padding;
            a prompt plus max_new_tokens longer than config.max_len.
        IndexError: an id outside [0, vocab_size).
    """
    if not config.causal:
        raise ValueError("generate needs a causal model (config.causal=True): an encoder sees every token")
    if hasattr(prompts, "__array__") and not isinstance(prompts, (list, tuple)):
        ids, real = _from_array(np.asarray(prompts), mask)
    else:
        if mask is not None:
            raise ValueError("mask= goes with a (B, P) array of prompts; lists of ids are padded here")
        ids, real = _from_lists(prompts)
    bad = [v for v in ids[real].tolist() if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise TypeError(f"prompt ids must be ints, got {bad[0]!r}")
    ids = np.where(real, ids, 0).astype(np.int64)
    out = ids[real][(ids[real] < 0) | (ids[real] >= config.vocab_size)]
    if out.size:
        raise IndexError(f"prompt id {out[0]} is outside the vocabulary [0, {config.vocab_size})")
    longest = int(real.sum(axis=1).max())
    if longest + max_new_tokens > config.max_len:
        raise ValueError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_len={config.max_len}"
        )
    return ids, real


def _from_array(ids: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if ids.ndim != 2 or 0 in ids.shape:
        raise ValueError(f"prompts must be a non-empty (B, P) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompts must hold integer ids, got dtype {ids.dtype}")
    real = np.ones(ids.shape, bool) if mask is None else np.asarray(mask)
    if real.shape != ids.shape:
        raise ValueError(f"mask shape {real.shape} != prompts shape {ids.shape}")
    if not (real.dtype == bool or np.issubdtype(real.dtype, np.integer)) or not np.isin(real, (0, 1)).all():
        raise ValueError("mask must hold 0/1 (1 = real token)")
    real = real.astype(bool)
    if not real[:, -1].all() or (np.diff(real.astype(np.int8), axis=1) < 0).any():
        raise ValueError("mask must be left padding: each row zeros, then ones up to the last position")
    return ids.astype(object), real


def _from_lists(prompts: object) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise TypeError("prompts must be a non-empty list of lists of token ids, or a (B, P) array")
    rows = []
    for b, row in enumerate(prompts):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, np.ndarray)):
            raise TypeError(f"prompt {b} must be a list of token ids, got {type(row).__name__}")
        if len(row) == 0:
            raise ValueError(f"prompt {b} is empty: generation needs at least one token to continue")
        rows.append([v.item() if isinstance(v, np.generic) else v for v in row])
    P = max(len(r) for r in rows)
    ids = np.zeros((len(rows), P), dtype=object)
    real = np.zeros((len(rows), P), bool)
    for b, row in enumerate(rows):
        ids[b, P - len(row) :], real[b, P - len(row) :] = row, True
    return ids, real


def stop_lengths(tokens: np.ndarray, stop_tokens: Sequence[int]) -> np.ndarray:
    """(B,) tokens up to and including each row's first stop token (T when none), for tokens (B, T)."""
    stopped = np.isin(tokens, np.asarray(stop_tokens, np.int64).reshape(-1))
    return np.where(stopped.any(axis=1), stopped.argmax(axis=1) + 1, tokens.shape[1]).astype(np.int32)
