"""What `flax-impl parity --hf` prints: the per-layer table, the referee's table, the bf16 comparison, the
one-line summary, and the JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flax_impl import tolerances as tol
from flax_impl.apps import parity_hf_checks as checks
from flax_impl.apps.parity_hf_checks import Report


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _status(ok: bool, budget: bool, here: str | None) -> str:
    if ok:
        return "ok" if budget else "ok: the referee finds roundoff"
    return f"PARTS WAYS HERE ({here})" if here else "past tolerance"


def format_rows(report: Report) -> str:
    """The per-layer table against transformers in float32, the layer where the two part ways marked (see
    `first_divergence`); with reference "float64" the referee's table instead."""
    judged = report.judged()
    first = checks.first_divergence(report.rows, judged)
    if report.reference == "float64":
        return format_referee(report.referee, judged, first)
    lines = [f"{'layer':<8}{'hidden rel':>12}{'tol':>9}{'grad rel':>12}{'tol':>9}  status"]
    for r, verdict in zip(report.rows, judged, strict=True):
        here = first[1] if first is not None and r.layer == first[0] else None
        status = _status(all(verdict), r.ok, here)
        lines.append(f"{r.layer:<8}{_e(r.hidden):>12}{r.hidden_tol:>9.0e}{_e(r.grad):>12}{r.grad_tol:>9.0e}  {status}")
    if report.referee is not None:  # it ran for the layers past the budget
        lines += ["", format_referee(report.referee, judged, first)]
    return "\n".join(lines)


def format_referee(rows: list[checks.RefereeRow], judged: list, first: tuple[str, str] | None) -> str:
    """The referee's table: per layer, each float32 run's error against transformers in float64 (hidden:
    `row_error`, grad: `group_error`) and their ratio."""

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"

    lines = [
        "against transformers in float64 (the referee): the error of each float32 run, and Flax / transformers",
        f"{'layer':<8}{'Flax hidden':>12}{'HF hidden':>11}{'ratio':>7}{'Flax grad':>11}{'HF grad':>10}{'ratio':>7}  "
        "verdict",
    ]
    for r, verdict in zip(rows, judged, strict=True):
        here = first[1] if first is not None and r.layer == first[0] else None
        status = "as close as transformers" if r.ok else f"FURTHER than {tol.REFEREE_FACTOR:g}x transformers"
        if not all(verdict) and here:
            status += f"  PARTS WAYS HERE ({here})"
        lines.append(
            f"{r.layer:<8}{_e(r.ours_hidden):>12}{_e(r.theirs_hidden):>11}{ratio(r.ours_hidden, r.theirs_hidden):>7}"
            f"{_e(r.ours_grad):>11}{_e(r.theirs_grad):>10}{ratio(r.ours_grad, r.theirs_grad):>7}  {status}"
        )
    return "\n".join(lines)


def format_bf16(ours: checks.Deviation, theirs: checks.Deviation) -> str:
    """Each side's bf16 output against its own float32 output."""
    lines = ["bfloat16 against the same side's float32 (real positions):",
             f"{'side':<14}{'max |d|':>10}{'mean |d|':>10}{'mean KL':>10}{'top-1':>8}"]  # fmt: skip
    for name, d in (("Flax", ours), ("transformers", theirs)):
        top1 = "-" if d.top1 is None else f"{100 * d.top1:.1f}%"
        lines.append(f"{name:<14}{d.max_abs:>10.3g}{d.mean_abs:>10.3g}{_e(d.kl_mean):>10}{top1:>8}")
    return "\n".join(lines)


def summary(report: Report, cfg: Any, model_type: str, seconds: float) -> str:
    """The one-line verdict: what was compared, under which tolerance, and where the two part ways."""
    shape, judged = report.shape, report.judged()
    n, total = sum(f and b for f, b in judged), len(judged)
    what = f"{model_type}, {cfg.n_layers} layers, B={shape['batch']} L={shape['length']}, float32"
    budget = (f"each position's |diff| <= {tol.HF_FORWARD_REL:.0e} x its largest |value|, gradients <= "
              f"{tol.GRAD_REL:.0e} x the layer's largest")  # fmt: skip
    referee = (f"as close to transformers in float64 as transformers' own float32 (within {tol.REFEREE_FACTOR:g}x "
               f"or {tol.REFEREE_FLOOR:.0e})")  # fmt: skip
    if report.reference == "float64":
        verdict = f"{n} of {total} layers {referee}"
    else:
        within = sum(r.ok for r in report.rows)
        verdict = f"{within} of {total} layers within the float32 budget ({budget})"
        if report.referee is not None:
            verdict += f"; {n - within} of the {total - within} past it {referee}"
    first = checks.first_divergence(report.rows, judged)
    if first is not None:
        verdict += f"; parts ways at layer {first[0]} ({first[1]})"
    parts = [f"{'ok' if report.ok else 'FAIL'}: {what} against transformers (eager attention): {verdict}"]
    if report.logits is not None:
        parts.append(f"logits KL <= {report.logits.kl_max:.1e}, top-1 {100 * report.logits.top1:.1f}%")
    if report.decode is not None:
        d = report.decode
        parts.append(f"decode {d.steps} steps {'within' if d.ok else 'PAST'} the budget ({d.error:.1e}), greedy "
                     f"tokens {100 * d.top1:.1f}% transformers' argmax")  # fmt: skip
    if report.bf16 is not None:
        ok = checks.bf16_ok(*report.bf16)
        parts.append(f"bf16 {'as close to float32 as' if ok else 'FURTHER from float32 than'} transformers' bf16 "
                     f"(mean |d| within {tol.BF16_VS_TRANSFORMERS:g}x)")  # fmt: skip
    return "; ".join(parts) + f"; {seconds:.0f} s"


def to_json(report: Report) -> dict:
    judged = report.judged()
    rows = [asdict(r) | {"ok": r.ok, "verdict": f and b} for r, (f, b) in zip(report.rows, judged, strict=True)]
    out = {"ok": report.ok, "reference": report.reference, "rows": rows}
    if report.logits is not None:
        out["logits"] = asdict(report.logits)
    if report.decode is not None:
        out["decode"] = asdict(report.decode) | {"ok": report.decode.ok}
    if report.referee is not None:
        out["referee"] = [asdict(r) | {"ok": r.ok} for r in report.referee]
    if report.bf16 is not None:
        out["bf16"] = {"flax": asdict(report.bf16[0]), "transformers": asdict(report.bf16[1])}
    return out
