"""Cached autoregressive generation for causal Transformers: greedy, temperature, top-k and top-p sampling, stop
tokens, left-padded batches, the whole decode loop inside one `jax.jit`.

The loop: the model's forward with a fresh `KVCache` (`Transformer.init_cache`) runs the left-padded prompts once
and fills the cache (prefill); each step then picks one token per row from the last logits (`choose`), feeds it to
the same forward with the cache, and stops when `max_new_tokens` are out or every row has produced a stop token.
A row that has stopped emits `pad_id` from then on (as transformers' `generate`).

Compiles: one per (batch size, prompt bucket, new-token bucket, do_sample, return_logits, streaming, number of
stop tokens). Prompts are left-padded to the next of 16, 20, 24, 28, 32, 40, 48, ... (`prompt_bucket`: less than a
quarter of their length); the cache holds that plus `bucket(max_new_tokens)` slots (a power of two), and
`max_new_tokens` itself is a traced loop bound. Extra left padding changes no result: positions come from the mask
and padded slots are never attended to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from flax_impl.generation_config import GenerationConfig, left_pad, stop_lengths
from flax_impl.transformer import Transformer

MIN_BUCKET = 16
PROMPT_STEPS = 4  # prompt buckets per doubling: 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...


def bucket(n: int) -> int:
    """The padded size of a length n >= 1: the next power of two, at least MIN_BUCKET (the new tokens' slots)."""
    return max(MIN_BUCKET, 1 << (n - 1).bit_length())


def prompt_bucket(n: int) -> int:
    """The padded length of a prompt of n >= 1 tokens: the smallest m * 2**k >= n with m in PROMPT_STEPS ..
    2 * PROMPT_STEPS - 1 (16, 20, 24, 28, 32, 40, 48, ...), at least MIN_BUCKET.

    A prompt is padded by less than a quarter of its length (a power of two pads by up to all of it, and the
    prefill's work grows with the padded length), for four programs per doubling instead of one.
    """
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = 1 << max((n - 1).bit_length() - PROMPT_STEPS.bit_length(), 0)  # 2**k: n - 1 < 2 * PROMPT_STEPS * 2**k
    return -(-n // step) * step


@dataclass(frozen=True)
class GenerateOutput:
    """What `generate` returns.

    Attributes:
        tokens: (B, T) int32, T = steps run <= max_new_tokens; after its stop token a row holds `pad_id`.
        lengths: (B,) int32, tokens generated per row, its stop token included.
        logits: (B, T, V) float32 logits each step chose from (before temperature and filters), or None.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None


def filter_logits(logits: jax.Array, top_k: jax.Array | int = 0, top_p: jax.Array | float = 1.0) -> jax.Array:
    """Top-k then top-p (nucleus, Holtzman et al., 2020) filtering: removed entries become -inf.

    Top-k keeps the k largest logits (0 = off; ties with the k-th are kept). Top-p keeps, in order of
    decreasing probability, each token whose preceding tokens' probability sum is < top_p: the smallest set
    whose probability reaches top_p, at least one token (transformers' TopPLogitsWarper).

    Args:
        logits: (B, V) float.
        top_k: int >= 0, may be traced.
        top_p: float in (0, 1], may be traced (1 = off).
    Returns:
        (B, V) float32.
    """
    logits = jnp.asarray(logits, jnp.float32)
    V = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # (B, V), descending
    k = jnp.where(jnp.asarray(top_k) > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)).astype(jnp.int32), -1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)  # still descending
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # (B, V): probability of the tokens ranked above
    threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)  # smallest kept
    threshold = jnp.where(jnp.asarray(top_p) >= 1.0, -jnp.inf, threshold)  # top_p = 1: off, as transformers
    return jnp.where(logits < threshold, -jnp.inf, logits)


def choose(logits: jax.Array, key: jax.Array, do_sample: bool, temperature, top_k, top_p) -> jax.Array:
    """One token per row: argmax (greedy), or a draw from softmax(filter_logits(logits / temperature)).

    Args:
        logits: (B, V).
        key: a PRNG key (unused when greedy).
        do_sample: static.
        temperature, top_k, top_p: as `generate`'s (may be traced).
    Returns:
        (B,) int32.
    """
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = jnp.asarray(logits, jnp.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)  # max 0: a tiny temperature gives -inf, not inf - inf
    filtered = filter_logits(shifted / temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "n_slots", "do_sample", "return_logits", "stream"))
def _generate(
    graphdef, state, ids, mask, max_new, temperature, top_k, top_p, key, stop, pad_id, *,
    n_slots, do_sample, return_logits, stream,
):  # fmt: skip
    """The compiled loop: prefill, then decode steps in a `lax.while_loop`. Returns (tokens, steps, logits)."""
    model = nnx.merge(graphdef, state).unstacked()  # one array per layer: no step copies weights out of a stack
    model.eval()  # a copy: the caller's model keeps its mode
    step_graph, step_state = nnx.split(model)  # carried unchanged through the loop: merged in the body, not copied
    B, P = ids.shape
    h, cache = model(ids, mask, cache=model.init_cache(B, P + n_slots))  # prefill: the forward, cache filled
    logits = model.logits(h[:, -1:])[:, 0].astype(jnp.float32)  # (B, V): left padding puts every row's last here
    V = logits.shape[-1]
    tokens = jnp.full((B, n_slots), pad_id, jnp.int32)
    all_logits = jnp.zeros((B, n_slots, V) if return_logits else (B, 0, V), jnp.float32)

    def emit(t, logits, tokens, all_logits, done):
        token = choose(logits, jax.random.fold_in(key, t), do_sample, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)  # (B,)
        if stream:
            io_callback(_stream, None, token, ordered=True)
        tokens = tokens.at[:, t].set(token)
        if return_logits:
            all_logits = all_logits.at[:, t].set(logits)
        return token, tokens, all_logits, done | jnp.isin(token, stop)

    token, tokens, all_logits, done = emit(0, logits, tokens, all_logits, jnp.zeros((B,), bool))

    def cond(carry):
        t, *_, done, _ = carry
        return (t < max_new) & ~jnp.all(done)

    def body(carry):
        t, token, cache, tokens, all_logits, done, weights = carry
        m = nnx.merge(step_graph, weights)  # modules of the body's trace (nnx transforms inside may write them)
        h, cache = m(token[:, None], cache=cache)  # (B, 1, D): the same forward on one token
        logits = m.logits(h)[:, 0].astype(jnp.float32)  # (B, V)
        token, tokens, all_logits, done = emit(t, logits, tokens, all_logits, done)
        return t + 1, token, cache, tokens, all_logits, done, weights

    carry = (1, token, cache, tokens, all_logits, done, step_state)
    t, _, _, tokens, all_logits, *_ = jax.lax.while_loop(cond, body, carry)
    return tokens, t, all_logits


_STREAM: list[Callable[[np.ndarray], None]] = []  # the on_token of the generate call in progress


def _stream(token: np.ndarray) -> None:
    _STREAM[-1](np.asarray(token))


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    mask: np.ndarray | jax.Array | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    return_logits: bool = False,
    on_token: Callable[[np.ndarray], None] | None = None,
) -> GenerateOutput:
    """Continue each prompt with up to `max_new_tokens` tokens, with a KV cache, in one compiled loop.

    Args:
        model: a causal Transformer (config.causal); run as in eval mode (the model is not changed).
        prompts: a list of B non-empty lists of token ids (left-padded here), or a (B, P) int array, left-padded,
            with `mask`.
        max_new_tokens: int >= 1; the real prompt length plus it must fit in config.max_len.
        mask: (B, P), 1 = real token, for an array of prompts (None: every token real); each row is
            zeros then ones, at least one one.
        do_sample: False = greedy (argmax); True = sample with temperature, top_k, top_p.
        temperature: > 0, finite (sampling only).
        top_k: int >= 0 (0 = off).
        top_p: in (0, 1] (1 = off).
        seed: int >= 0, the sampling key: `jax.random.key(seed)`, folded with the step number.
        stop_tokens: ids that end a row (kept in its output).
        pad_id: the id a stopped row emits, in [0, V).
        return_logits: also return every step's logits (B, T, V).
        on_token: called with each step's (B,) tokens as the loop chooses them (streaming), or None.
    Returns:
        GenerateOutput(tokens, lengths, logits).
    Raises:
        TypeError: a model that is not a Transformer; non-integer ids or options of the wrong type.
        ValueError: a non-causal model, an empty prompt, a mask that is not left padding, max_new_tokens < 1, a
            prompt (plus max_new_tokens) longer than max_len, a temperature <= 0 or top_p outside (0, 1] or
            top_k < 0 with sampling, a negative seed.
        IndexError: a prompt id, stop token or pad_id outside [0, V).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a flax_impl.Transformer, got {type(model).__name__}")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be callable or None, got {type(on_token).__name__}")
    options = GenerationConfig(
        max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop_tokens, pad_id, return_logits
    )
    options.check_vocabulary(model.config.vocab_size)
    ids, real = left_pad(prompts, mask, model.config, max_new_tokens)  # (B, P)
    P = ids.shape[1]
    width = prompt_bucket(P)
    ids = np.pad(ids, ((0, 0), (width - P, 0)), constant_values=pad_id).astype(np.int32)
    real = np.pad(real, ((0, 0), (width - P, 0))).astype(np.int32)
    graphdef, state = nnx.split(model)
    _STREAM.append(on_token)
    try:
        tokens, steps, logits = _generate(
            graphdef, state, ids, real, np.int32(max_new_tokens), np.float32(temperature), np.int32(top_k),
            np.float32(top_p), jax.random.key(seed), np.asarray(options.stop_tokens, np.int32).reshape(-1),
            np.int32(pad_id), n_slots=bucket(max_new_tokens), do_sample=do_sample, return_logits=return_logits,
            stream=on_token is not None,
        )  # fmt: skip
        steps = int(steps)
        tokens = np.asarray(tokens)[:, :steps]
    finally:
        _STREAM.pop()
    logits = np.asarray(logits)[:, :steps] if return_logits else None
    return GenerateOutput(tokens, stop_lengths(tokens, options.stop_tokens), logits)
