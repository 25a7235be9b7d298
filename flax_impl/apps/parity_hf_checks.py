"""What `flax-impl parity --hf` judges, from two or three runs of one batch (`parity_hf_sides.Side`): per-layer
rows against the tolerances of `flax_impl.tolerances`, the logits as next-token distributions (KL divergence,
top-1 agreement), cached decoding, the float64 referee's rows and the bf16 comparison. numpy only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from flax_impl import tolerances as tol
from flax_impl.apps.parity_hf_sides import Decoded, Side


@dataclass
class LayerRow:
    """One layer of the per-layer table ("input", "0".."N-1", "output": the logits or last hidden state, with the
    gradients of the embeddings, final norm and head). `hidden`: `row_error` of its output (real positions);
    `grad`: `group_error` of its parameters' gradients (None where it has none); `hidden_abs`: the largest
    absolute difference of its output (what an absolute budget would have judged)."""

    layer: str
    hidden: float | None
    grad: float | None
    hidden_abs: float | None = None
    hidden_tol: float = tol.HF_FORWARD_REL
    grad_tol: float = tol.GRAD_REL

    @property
    def ok(self) -> bool:
        hidden = self.hidden is None or self.hidden <= self.hidden_tol
        return bool(hidden and (self.grad is None or self.grad <= self.grad_tol))


@dataclass
class Distributions:
    """The logits of every real position as next-token distributions, ours against a reference: the largest and
    mean KL(reference || ours) (nats, float64) and the fraction of positions with the same argmax."""

    kl_max: float
    kl_mean: float
    top1: float


@dataclass
class DecodeRow:
    """Cached decoding (`parity_hf_sides.decode`): `row_error` of every step's logits against transformers'
    uncached forward, and the fraction of our greedy tokens that are transformers' argmax too."""

    steps: int
    error: float
    top1: float
    tol: float = tol.HF_FORWARD_REL

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)


@dataclass
class RefereeRow:
    """One layer against transformers in float64: our float32 error and transformers' float32 error (hidden:
    `row_error`; grad: `group_error`), and the verdict "as close to the exact result as transformers itself"."""

    layer: str
    ours_hidden: float | None
    theirs_hidden: float | None
    ours_grad: float | None
    theirs_grad: float | None

    @staticmethod
    def as_close(ours: float | None, theirs: float | None) -> bool:
        return ours is None or ours <= max(tol.REFEREE_FACTOR * theirs, tol.REFEREE_FLOOR)

    @property
    def ok(self) -> bool:
        return self.as_close(self.ours_hidden, self.theirs_hidden) and self.as_close(self.ours_grad, self.theirs_grad)


@dataclass
class Deviation:
    """One side's bf16 output against its own float32 output, real positions: max and mean |difference|, and
    (logits) the next-token distributions' mean KL and top-1 agreement."""

    max_abs: float
    mean_abs: float
    kl_mean: float | None
    top1: float | None


def layer_of(key: str) -> str:
    """"3" for a checkpoint key of layer 3 (its first integer path component), "output" for embeddings, final norm
    and head."""
    match = re.search(r"\.(\d+)\.", key)
    return match.group(1) if match else "output"


def grad_groups(ours: dict, ref: dict) -> dict[str, list]:
    """Layer -> [(ours, ref) gradient pairs]. Every reference gradient must have its counterpart.

    Raises:
        ValueError: reference keys without a Flax gradient (a mapping gap: nothing compared is no comparison).
    """
    missing = sorted(set(ref) - set(ours))
    if missing:
        raise ValueError(f"{len(missing)} gradients of transformers have no Flax counterpart: {missing[:4]}")
    groups: dict[str, list] = {}
    for key, g in ref.items():
        groups.setdefault(layer_of(key), []).append((ours[key], g))
    return groups


def layer_rows(ours: Side, ref: Side, real: np.ndarray) -> list[LayerRow]:
    """The per-layer table of `ours` against `ref` (see LayerRow)."""
    groups = grad_groups(ours.grads, ref.grads) if ref.grads else {}
    grad = {layer: tol.group_error(pairs) for layer, pairs in groups.items()}
    rows = []
    outputs = [*zip(ours.hidden, ref.hidden, strict=True), (ours.out, ref.out)]
    for i, (a, b) in enumerate(outputs):
        name = "input" if i == 0 else ("output" if i == len(outputs) - 1 else str(i - 1))
        g = None if i == 0 else grad.get(name)
        rows.append(LayerRow(name, tol.row_error(a[real], b[real]), g, float(np.abs(a[real] - b[real]).max())))
    return rows


def judge(rows: list[LayerRow], referee: list[RefereeRow] | None, reference: str) -> list[tuple[bool, bool]]:
    """(forward ok, gradients ok) per layer. reference "float64": the referee's verdict; "transformers": within the
    float32 budget or, past it, the referee's verdict where it ran (rows past the budget with no referee fail)."""
    out = []
    for i, r in enumerate(rows):
        budget = (r.hidden is None or r.hidden <= r.hidden_tol, r.grad is None or r.grad <= r.grad_tol)
        ref = referee[i] if referee is not None else None
        close = (False, False) if ref is None else (
            RefereeRow.as_close(ref.ours_hidden, ref.theirs_hidden), RefereeRow.as_close(ref.ours_grad, ref.theirs_grad)
        )  # fmt: skip
        out.append(close if reference == "float64" else (budget[0] or close[0], budget[1] or close[1]))
    return out


def first_divergence(rows: list[LayerRow], judged: list[tuple[bool, bool]] | None = None) -> tuple[str, str] | None:
    """Where the two part ways: (layer, "forward") for the first layer whose output fails its verdict; else
    (layer, "backward") for the last layer whose gradients do (the backward pass runs from the top, and a layer's
    gradients also depend on every layer above it). None when every verdict holds. `judged`: `judge`'s output
    (default: the float32 budget alone)."""
    judged = judge(rows, None, "transformers") if judged is None else judged
    for r, (forward, _) in zip(rows, judged, strict=True):
        if not forward:
            return r.layer, "forward"
    for r, (_, backward) in zip(reversed(rows), reversed(judged), strict=True):
        if not backward:
            return r.layer, "backward"
    return None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_divergence(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(ours)) per row (last axis = vocabulary), in float64: (...)."""
    lp, lq = _log_softmax(np.asarray(ref, np.float64)), _log_softmax(np.asarray(ours, np.float64))
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def distributions(ours: np.ndarray, ref: np.ndarray) -> Distributions:
    """`Distributions` of rows of logits (n, V)."""
    kl = kl_divergence(ours, ref)
    top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    return Distributions(float(kl.max()), float(kl.mean()), top1)


def decode_row(d: Decoded) -> DecodeRow:
    """`DecodeRow` of a decoding run."""
    agree = float(np.mean(d.tokens == d.theirs.argmax(-1)))
    return DecodeRow(d.tokens.shape[1], tol.row_error(d.ours, d.theirs), agree)


def referee_rows(ours: Side, theirs: Side, exact: Side, real: np.ndarray) -> list[RefereeRow]:
    """Our float32 run and transformers' float32 run, each against transformers in float64, layer by layer."""
    o, t = layer_rows(ours, exact, real), layer_rows(theirs, exact, real)
    return [RefereeRow(a.layer, a.hidden, b.hidden, a.grad, b.grad) for a, b in zip(o, t, strict=True)]


def deviation(low: np.ndarray, high: np.ndarray, logits: bool) -> Deviation:
    """`Deviation` of a bf16 output (n, V or D) from the float32 one."""
    diff = np.abs(low - high)
    if not logits:
        return Deviation(float(diff.max()), float(diff.mean()), None, None)
    d = distributions(low, high)
    return Deviation(float(diff.max()), float(diff.mean()), d.kl_mean, d.top1)


def bf16_ok(ours: Deviation, theirs: Deviation) -> bool:
    """Ours' bf16 no further from its float32 than transformers' bf16 from its own, within BF16_VS_TRANSFORMERS
    (mean |difference|; mean KL within its square)."""
    f = tol.BF16_VS_TRANSFORMERS
    ok = ours.mean_abs <= f * theirs.mean_abs
    if ours.kl_mean is not None:
        ok = ok and ours.kl_mean <= f * f * theirs.kl_mean
    return bool(ok)


@dataclass
class Report:
    """Everything one `flax-impl parity --hf` run compared: the per-layer rows against transformers in float32;
    the logits as distributions (causal models); cached decoding; the referee's rows (when it ran); each side's
    bf16 deviation (ours, transformers'); the batch shape; which reference decides (see `judge`)."""

    rows: list[LayerRow]
    logits: Distributions | None = None
    decode: DecodeRow | None = None
    referee: list[RefereeRow] | None = None
    bf16: tuple[Deviation, Deviation] | None = None
    shape: dict = field(default_factory=dict)
    reference: str = "transformers"

    def judged(self) -> list[tuple[bool, bool]]:
        """(forward ok, gradients ok) per layer (`judge`)."""
        return judge(self.rows, self.referee, self.reference)

    @property
    def ok(self) -> bool:
        good = all(f and b for f, b in self.judged()) and (self.decode is None or self.decode.ok)
        return bool(good and (self.bf16 is None or bf16_ok(*self.bf16)))
