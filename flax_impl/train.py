"""Training with optax: one `nnx.jit` AdamW step for the masked-token and the next-token objectives.

Objective (chosen by `config.causal`), both through the tied head `Transformer.logits` (Embed.attend):
- masked-token (causal=False), BERT's recipe (Devlin et al., 2019): every non-pad position is selected with
  probability `mask_prob`; a selected token becomes `mask_id` (80%), a random regular token (10%) or stays (10%);
  only selected positions count in the loss. The default `mask_id` is 3, ByteTokenizer's `<mask>` (pad = 0,
  bos = 1, eos = 2, byte b = b + 4): any model with vocab_size >= 4 has that row.
- next-token (causal=True): inputs = tokens[:, :-1], targets = tokens[:, 1:]; every non-pad target counts.

A batch is a dict: `inputs` (B, L) int32, `targets` (B, L) int32, `weights` (B, L) float32 (1 = the position
counts, 0 = ignored: padding, unselected), optionally `attention_mask` (B, L) int32 (1 = real token). Loss =
sum(weights * CE) / max(sum(weights), 1), cross-entropy in nats, logits in float32.

Checked before any work, the same on both twins (`flax_impl.validation.check_train_batch`): shapes all (B, L),
integer targets in [0, V) or IGNORE_INDEX = -100 (torch's and Hugging Face's "ignore": such a position counts
for nothing whatever its weight), weights finite and >= 0. Under `jit` only shapes and dtypes can be checked:
`train_step` and `eval_step` check the values before they enter their compiled function, and a target out of
range that reaches the traced loss anyway makes it NaN. A position of weight 0 never changes the loss, even if
its logits are NaN. No position with weight > 0 (an empty batch, B = 0 or L = 0 included): the loss is 0 and
the gradient 0 on both twins; AdamW still decays and moves by its momentum. param_dtype="float16" is refused
by `make_optimizer`: AdamW's eps (1e-8) and second moments underflow to 0 in float16, and its first update is
NaN; train float16 compute with float32 parameters instead (FlaxConfig(dtype="float16", param_dtype="float32")).

Optimiser (`TrainConfig`, shared with torch_ref.train): clip_by_global_norm -> optax.adamw(schedule, b1, b2,
eps, weight_decay, mask) with linear warmup then cosine decay. Weight decay applies where `decay(path)` is True;
the default decays the Linear kernels only (no biases, LayerNorm scales, token or position embeddings).
Dropout: each Dropout owns an rng stream split from the model's `nnx.Rngs`; the step runs in train mode and
advances every stream, so each step draws fresh masks and the same seed replays the same masks.

Example:
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0)); model.train()
    >>> tcfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, total_steps=100)
    >>> optimizer = make_optimizer(model, tcfg)
    >>> batch = make_batch(tokens, cfg, tcfg, np.random.default_rng(0))   # tokens (B, L) int, or (B, L + 1)
    >>> metrics = train_step(model, optimizer, batch)                     # {"loss", "grad_norm"}
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from flax_impl.config import TrainConfig, TransformerConfig
from flax_impl.embedding import check_ids
from flax_impl.tokenizer import MASK_ID, N_SPECIAL, PAD_ID
from flax_impl.validation import (
    IGNORE_INDEX,
    ArgumentTypeError,
    check_float,
    check_int,
    check_param_dtype_trains,
    check_train_batch,
)

Batch = dict[str, Any]
DecayRule = Callable[[tuple[str, ...]], bool]


# ----------------------------------------------------------------------------------------------- batches (numpy)
def masked_token_batch(
    tokens: np.ndarray,
    *,
    vocab_size: int,
    rng: np.random.Generator,
    mask_prob: float = 0.15,
    mask_id: int = MASK_ID,
    pad_id: int | None = PAD_ID,
    first_regular_id: int = N_SPECIAL,
) -> Batch:
    """tokens (B, L) -> a masked-token batch (BERT's 80/10/10 recipe, module docstring).

    Random replacements are drawn from the regular ids [first_regular_id, vocab_size) (never pad/bos/eos/mask).
    Padding (`pad_id`) is never selected and is masked out of attention. Reproducible: the same `rng` state gives
    the same batch.

    Args:
        tokens: (B, L) integer ids, B >= 1, L >= 1.
        vocab_size: V; every token must be in [0, V).
        rng: draws the selection and the replacements.
        mask_prob: the probability that a non-pad position is selected, in (0, 1].
        mask_id: the id that replaces 80% of the selected tokens, in [0, V).
        pad_id: the padding id, or None if there is no padding.
        first_regular_id: the first id random replacements may take, in [0, V).

    Returns:
        {"inputs", "targets"} (B, L) int32, {"weights"} (B, L) float32 (1 = selected), and, if some token is
        padding, {"attention_mask"} (B, L) int32 (1 = real token).

    Raises:
        ValueError: `tokens` not (B, L) with B, L >= 1; `mask_id`, `first_regular_id` or `mask_prob` out of range.
        TypeError: non-integer tokens; an argument of the wrong type (`ArgumentTypeError`).
        IndexError: a token outside [0, V).
    """
    vocab_size = check_int("vocab_size", vocab_size, low=1)
    mask_id = check_int("mask_id", mask_id, low=0, high=vocab_size)
    first_regular_id = check_int("first_regular_id", first_regular_id, low=0, high=vocab_size)
    mask_prob = check_float("mask_prob", mask_prob, low=0.0, high=1.0, low_open=True)
    pad_id = check_int("pad_id", pad_id, none_ok=True)
    if not isinstance(rng, np.random.Generator):
        raise ArgumentTypeError(f"rng={rng!r:.60} must be a numpy.random.Generator, got {type(rng).__name__}")
    tokens = _check_tokens(tokens, vocab_size, min_len=1)
    real = np.ones(tokens.shape, bool) if pad_id is None else tokens != pad_id  # (B, L)
    selected = (rng.random(tokens.shape) < mask_prob) & real  # (B, L)
    action = rng.random(tokens.shape)  # < 0.8: mask, < 0.9: random, else keep
    random_ids = rng.integers(first_regular_id, vocab_size, size=tokens.shape)
    inputs = np.where(selected & (action < 0.8), mask_id, tokens)
    inputs = np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    batch = {"inputs": inputs.astype(np.int32), "targets": tokens, "weights": selected.astype(np.float32)}
    if pad_id is not None and not real.all():
        batch["attention_mask"] = real.astype(np.int32)
    return batch


def next_token_batch(tokens: np.ndarray, *, vocab_size: int, pad_id: int | None = PAD_ID) -> Batch:
    """tokens (B, L + 1) -> a next-token batch: inputs tokens[:, :-1], targets tokens[:, 1:].

    Args:
        tokens: (B, L + 1) integer ids, B >= 1, L + 1 >= 2.
        vocab_size: V; every token must be in [0, V).
        pad_id: the padding id, or None if there is no padding.

    Returns:
        {"inputs", "targets"} (B, L) int32, {"weights"} (B, L) float32 (0 on padding targets), and, if some
        input is padding, {"attention_mask"} (B, L) int32 (1 = real token).

    Raises:
        ValueError: `tokens` not (B, L + 1) with B >= 1 and L + 1 >= 2.
        TypeError: non-integer tokens, or vocab_size / pad_id not integers.
        IndexError: a token outside [0, V).
    """
    vocab_size, pad_id = check_int("vocab_size", vocab_size, low=1), check_int("pad_id", pad_id, none_ok=True)
    tokens = _check_tokens(tokens, vocab_size, min_len=2)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L) each
    real_t = np.ones(targets.shape, bool) if pad_id is None else targets != pad_id
    batch = {"inputs": inputs, "targets": targets, "weights": real_t.astype(np.float32)}
    if pad_id is not None and (inputs == pad_id).any():
        batch["attention_mask"] = (inputs != pad_id).astype(np.int32)
    return batch


def _check_tokens(tokens: np.ndarray, vocab_size: int, *, min_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < min_len or tokens.shape[0] < 1:
        raise ValueError(f"tokens must have shape (B, L) with B >= 1 and L >= {min_len}, got {tokens.shape}")
    check_ids(tokens, vocab_size)  # TypeError for non-integer ids, IndexError naming an id outside [0, V)
    return tokens.astype(np.int32)


# --------------------------------------------------------------------------------------------------- optimiser
def lr_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warmup then cosine decay, as torch_ref.train.lr_lambda.

    Step t (0-based, the t-th update) -> lr * t / warmup for t < warmup, then
    lr * (r + (1 - r) * (1 + cos(pi * min(t - warmup, T) / T)) / 2), T = total - warmup, r = end_lr_ratio.

    Args:
        tcfg: learning_rate, warmup_steps, total_steps, end_lr_ratio.

    Returns:
        An optax schedule, step -> learning rate.

    Raises:
        TypeError: `tcfg` is not a TrainConfig.
    """
    _check_tcfg(tcfg)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tcfg.learning_rate,
        warmup_steps=tcfg.warmup_steps,
        decay_steps=tcfg.total_steps,
        end_value=tcfg.learning_rate * tcfg.end_lr_ratio,
    )


def default_decay(path: tuple[str, ...]) -> bool:
    """Weight decay for Linear kernels only (attention in/out projections, feed-forward): the last path entry is
    "kernel". Biases, LayerNorm scales, token and learned-position embeddings are not decayed."""
    return path[-1] == "kernel"


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decay_mask(params: Any, decay: DecayRule = default_decay) -> Any:
    """The params pytree (an nnx.State, pure or of Variables) with a bool leaf per parameter: `decay(path)`,
    path a tuple of str like ("blocks", "attn", "in_proj", "kernel")."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: bool(decay(tuple(_key_name(k) for k in p))), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


@functools.lru_cache(maxsize=32)
def make_tx(tcfg: TrainConfig, *, decay: DecayRule = default_decay) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) (if set) -> adamw with the schedule, TrainConfig's betas/eps and an explicit
    weight_decay (optax's own default is 1e-4, torch's 0.01).

    torch clips by max_norm / (norm + 1e-6), optax by max_norm / norm: a relative difference of 1e-6 / norm, far
    below the parity tolerance. Cached per (tcfg, decay): the transformation is stateless, and the optimizer's jit
    cache keys on its identity, so equal settings reuse one compiled `train_step` instead of recompiling for
    every new optimizer.

    Args:
        tcfg: the optimiser settings.
        decay: path -> whether that parameter is weight-decayed.

    Returns:
        The optax transformation.
    """
    adamw = optax.adamw(
        lr_schedule(tcfg),
        b1=tcfg.b1,
        b2=tcfg.b2,
        eps=tcfg.eps,
        eps_root=0.0,
        weight_decay=tcfg.weight_decay,
        mask=lambda params: decay_mask(params, decay),
    )
    if tcfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), adamw)


def make_optimizer(model: nnx.Module, tcfg: TrainConfig, *, decay: DecayRule = default_decay) -> nnx.Optimizer:
    """nnx.Optimizer over the model's nnx.Param variables with `make_tx(tcfg, decay=decay)`.

    Args:
        model: the module to train.
        tcfg: the optimiser settings (shared with torch_ref.train.make_optimizer).
        decay: path (e.g. ("blocks", "attn", "in_proj", "kernel")) -> whether it is weight-decayed; default: the
            Linear kernels only.

    Returns:
        The optimizer, for `train_step`.

    Raises:
        TypeError: `model` not an nnx.Module, `tcfg` not a TrainConfig.
        ValueError: a float16 parameter (module docstring: AdamW's state underflows; keep float32 parameters).
    """
    if not isinstance(model, nnx.Module):
        raise ArgumentTypeError(f"model={model!r:.60} must be an nnx.Module, got {type(model).__name__}")
    _check_tcfg(tcfg)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    half = [".".join(map(str, path)) for path, var in flat if jnp.asarray(var[...]).dtype == jnp.float16]
    if half:
        check_param_dtype_trains("float16", where=f"param_dtype of {half[0]} (and {len(half) - 1} more)")
    return nnx.Optimizer(model, make_tx(tcfg, decay=decay), wrt=nnx.Param)


def _check_tcfg(tcfg: object) -> None:
    if not isinstance(tcfg, TrainConfig):
        raise ArgumentTypeError(f"tcfg={tcfg!r:.60} must be a TrainConfig, got {type(tcfg).__name__}")


# ------------------------------------------------------------------------------------------------ loss and step
def loss_sums(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """CE of the tied-head logits (float32) against `targets`, in nats, summed with the batch's weights.

    Args:
        model: a Transformer (or any module with `config.vocab_size`, `__call__(inputs, mask)` and
            `logits`).
        batch: {"inputs", "targets", "weights"} (B, L), optional {"attention_mask"} (B, L).

    Returns:
        (sum of weights * CE, sum of weights), two float32 scalars; IGNORE_INDEX targets count as weight 0.

    Raises:
        ValueError, TypeError, IndexError: as `check_train_batch` (values only when they are concrete).
    """
    vocab_size = model.config.vocab_size
    check_train_batch(batch, vocab_size, values=not _traced(batch))
    hidden = model(batch["inputs"], batch.get("attention_mask"))  # (B, L, D)
    logits = model.logits(hidden).astype(jnp.float32)  # (B, L, V)
    targets = jnp.asarray(batch["targets"])
    ignore = targets == IGNORE_INDEX
    bad = ~ignore & ((targets < 0) | (targets >= vocab_size))  # only reachable under jit: NaN, not a wrong loss
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ignore | bad, 0, targets))  # (B, L)
    w = jnp.where(ignore, 0.0, jnp.asarray(batch["weights"], jnp.float32))
    terms = jnp.where(bad, jnp.nan, jnp.where(w > 0, ce * w, 0.0))  # weight 0: nothing, even from a NaN logit
    return jnp.sum(terms), jnp.sum(w)


def _traced(batch: Batch) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(dict(batch)))


def check_batch(model: nnx.Module, batch: Batch) -> None:
    """Every check of `loss_sums` on concrete values, plus the input ids against the embedding, before `jit`.

    Raises:
        ValueError, TypeError, IndexError: as `check_train_batch` and `check_ids`.
    """
    check_train_batch(batch, model.config.vocab_size, values=not _traced(batch))
    check_ids(batch["inputs"], model.config.vocab_size)


def loss_fn(model: nnx.Module, batch: Batch) -> jax.Array:
    """Mean cross-entropy (nats) over the positions with weight 1; 0 if no position counts."""
    total, count = loss_sums(model, batch)
    return total / jnp.maximum(count, 1.0)


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, jax.Array]:
    """One AdamW update of `model` and `optimizer`, in place, under `nnx.jit` (the batch checked first).

    Put the model in train mode (`model.train()`) for dropout.

    Args:
        model: the module being trained.
        optimizer: from `make_optimizer(model, ...)`.
        batch: as `loss_sums` reads it, e.g. from `masked_token_batch` / `next_token_batch`.

    Returns:
        {"loss": the loss before the update, "grad_norm": the global norm of the gradient before clipping}.

    Raises:
        ValueError, TypeError, IndexError: a bad batch (`check_batch`), before any work.
    """
    check_batch(model, batch)
    return _train_step(model, optimizer, batch)


@nnx.jit
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> dict[str, jax.Array]:
    # Differentiate what the optimizer trains only (all nnx.Param, or the adapters: flax_impl.lora).
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, batch)
    optimizer.update(model, grads)
    return {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """`loss_sums` under jit, for held-out evaluation (call after `model.eval()`); the batch checked first.

    Args:
        model: the module being evaluated.
        batch: as `loss_sums` reads it.

    Returns:
        (sum of weights * CE, sum of weights): add them up over batches, then divide.

    Raises:
        ValueError, TypeError, IndexError: a bad batch (`check_batch`), before any work.
    """
    check_batch(model, batch)
    return _eval_step(model, batch)


@nnx.jit
def _eval_step(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return loss_sums(model, batch)


def make_batch(tokens: np.ndarray, config: TransformerConfig, tcfg: TrainConfig, rng: np.random.Generator) -> Batch:
    """The objective's batch for `config`: next-token from (B, L + 1) tokens if causal, else masked-token.

    Args:
        tokens: (B, L + 1) if `config.causal`, else (B, L) integer ids.
        config: `vocab_size` and `causal`.
        tcfg: `mask_prob`.
        rng: draws the masked-token selection (unused for next-token).

    Returns:
        The batch dict of `next_token_batch` or `masked_token_batch`.

    Raises:
        ValueError, TypeError, IndexError: as those functions.
    """
    if config.causal:
        return next_token_batch(tokens, vocab_size=config.vocab_size)
    return masked_token_batch(tokens, vocab_size=config.vocab_size, rng=rng, mask_prob=tcfg.mask_prob)
