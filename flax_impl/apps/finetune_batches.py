"""Examples into rows of L model inputs, and rows into the batch of each step: padded or packed, with the masks
and positions that keep every example to itself.

A row holds the model's inputs (L,) and what each position predicts. An example of n tokens fills n - 1 slots:
inputs ids[:-1], targets ids[1:], weight 1 where the target is trained (`Example.trained[1:]`); a target not
trained is IGNORE_INDEX with weight 0.

- padded (default): one example per row, right-padded; `attention_mask` (L,) 1 on the example's slots. The
  model's own positions (0 .. L - 1, or what its `positions_from` says) apply.
- packed (`pack=True`): several examples per row (best fit, longest first), each a *segment*: `segment_ids` (L,)
  1, 2, ... per example and 0 on padding, `positions` (L,) restarting at the model's `position_offset` for each
  example. The loss (`flax_impl.apps.finetune_step.loss_sums`) lets a token attend only to earlier tokens of its
  own segment: each example computes exactly what it computes alone in a padded row.

Rows are shuffled per epoch by (seed, epoch); step s takes the rows s * A * B ... (s + 1) * A * B - 1 of the
epochs laid end to end, as A micro-batches of B rows: the batches depend only on (seed, step), so a resumed run
replays the uninterrupted run's batches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from flax_impl.apps.finetune_data import Example
from flax_impl.validation import IGNORE_INDEX

Batch = dict[str, np.ndarray]


@dataclass
class Rows:
    """R rows: `arrays` maps inputs, targets (int32), weights (float32) and attention_mask or segment_ids +
    positions (int32) to (R, L) arrays."""

    arrays: Batch

    def __len__(self) -> int:
        return int(self.arrays["inputs"].shape[0])

    def take(self, index: np.ndarray) -> Batch:
        """The rows `index` (any shape S): arrays (*S, L)."""
        return {k: v[index] for k, v in self.arrays.items()}

    @property
    def trained_tokens(self) -> int:
        return int(self.arrays["weights"].sum())


def _empty(n_rows: int, seq_len: int, packed: bool, pad_id: int) -> Batch:
    out = {
        "inputs": np.full((n_rows, seq_len), pad_id, np.int32),
        "targets": np.full((n_rows, seq_len), IGNORE_INDEX, np.int32),
        "weights": np.zeros((n_rows, seq_len), np.float32),
    }
    if packed:
        out["segment_ids"] = np.zeros((n_rows, seq_len), np.int32)
        out["positions"] = np.zeros((n_rows, seq_len), np.int32)
    else:
        out["attention_mask"] = np.zeros((n_rows, seq_len), np.int32)
    return out


def _place(out: Batch, row: int, start: int, example: Example, segment: int, position_offset: int) -> None:
    n = example.ids.size - 1
    span = slice(start, start + n)
    out["inputs"][row, span] = example.ids[:-1]
    trained = example.trained[1:]
    out["targets"][row, span] = np.where(trained, example.ids[1:], IGNORE_INDEX)
    out["weights"][row, span] = trained.astype(np.float32)
    if "segment_ids" in out:
        out["segment_ids"][row, span] = segment
        out["positions"][row, span] = position_offset + np.arange(n)
    else:
        out["attention_mask"][row, span] = 1


def pad_rows(examples: list[Example], seq_len: int, *, pad_id: int = 0) -> Rows:
    """One example per row, right-padded to `seq_len` inputs.

    Raises:
        ValueError: an example longer than seq_len + 1 tokens (read_examples refuses those first).
    """
    out = _empty(len(examples), seq_len, False, pad_id)
    for r, example in enumerate(examples):
        _check_fits(example, seq_len)
        _place(out, r, 0, example, 1, 0)
    return Rows(out)


def pack_rows(examples: list[Example], seq_len: int, *, pad_id: int = 0, position_offset: int = 0) -> Rows:
    """Examples packed into as few rows as best fit finds (longest first, each into the fullest row it fits).

    Args:
        examples: the examples.
        seq_len: L, input slots per row.
        pad_id: the input id of empty slots (masked out; any valid id).
        position_offset: the model's first position (`TransformerConfig.position_offset`).

    Returns:
        The rows, with segment_ids and positions.

    Raises:
        ValueError: an example longer than seq_len + 1 tokens.
    """
    for example in examples:
        _check_fits(example, seq_len)
    order = sorted(range(len(examples)), key=lambda i: -examples[i].ids.size)  # stable: ties keep file order
    free: list[tuple[int, int]] = []  # (free slots, row) sorted
    fill: list[list[int]] = []
    for i in order:
        need = examples[i].ids.size - 1
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = seq_len, len(fill)
            fill.append([])
        fill[row].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, row))
    out = _empty(len(fill), seq_len, True, pad_id)
    for row, members in enumerate(fill):
        start = 0
        for segment, i in enumerate(members, 1):
            _place(out, row, start, examples[i], segment, position_offset)
            start += examples[i].ids.size - 1
    return Rows(out)


def _check_fits(example: Example, seq_len: int) -> None:
    if example.ids.size - 1 > seq_len:
        raise ValueError(f"{example.where}: {example.ids.size} tokens do not fit a row of {seq_len} inputs")


def split_heldout(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): round(fraction x n) examples (at least 1 when fraction > 0) drawn by `seed`.

    Raises:
        ValueError: the held-out part would take every example.
    """
    if fraction <= 0:
        return examples, []
    n = len(examples)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"--eval-fraction {fraction} of {n} example(s) leaves none to train on: give --eval-data, "
                         "a smaller --eval-fraction, or 0 (no held-out loss)")
    pick = set(np.random.default_rng([seed, 2**31]).permutation(n)[:k].tolist())
    return [e for i, e in enumerate(examples) if i not in pick], [e for i, e in enumerate(examples) if i in pick]


def step_batch(rows: Rows, step: int, *, batch_size: int, accumulate: int, seed: int) -> Batch:
    """The rows of optimizer step `step` (0-based) as (A, B, L) arrays: epochs of per-epoch permutations laid
    end to end (module docstring)."""
    per_step = batch_size * accumulate
    index = np.arange(step * per_step, (step + 1) * per_step)
    epochs, within = np.divmod(index, len(rows))
    perms = {int(e): np.random.default_rng([seed, int(e)]).permutation(len(rows)) for e in np.unique(epochs)}
    chosen = np.array([perms[int(e)][w] for e, w in zip(epochs, within, strict=True)])
    return rows.take(chosen.reshape(accumulate, batch_size))


def eval_batches(rows: Rows, batch_size: int) -> list[Batch]:
    """The held-out rows in batches of `batch_size` (1, B, L), the last one filled with empty rows (weight 0), so
    that every batch has one shape (one compile)."""
    out = []
    for start in range(0, len(rows), batch_size):
        index = np.arange(start, start + batch_size)
        batch = rows.take(np.minimum(index, len(rows) - 1))
        batch["weights"] = np.where((index < len(rows))[:, None], batch["weights"], 0.0).astype(np.float32)
        out.append({k: v[None] for k, v in batch.items()})
    return out
