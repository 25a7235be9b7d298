"""Print the Markdown summary of `flax-impl bench --json` results of one command, for benchmarks/README.md.

    PYTHONPATH=. python benchmarks/table.py benchmarks/cpu-quick-2026-12-01-p*.json

One row per (B x L, mode, peer): Flax's tokens/s, the peer's, and Flax's per-pair speedup over the peer (the
median of the per-round ratios, with its min-max spread) run by run, separated by " / "; then the median over
the runs of those per-run medians, with the range of all pairs of all runs. The fastest eager peer of each run is
marked *. Then the targets, met or missed per run, and the compile times. The machine line is the bench's own
detection (`flax_impl.apps.machine.describe`); runs on different machines are refused. Results written before the
bench paired its calls (framework "torch", no per-pair ratios) get the ratio of medians, marked "(medians)".
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

from flax_impl.apps.machine import describe

SAME_MACHINE = ("cpu_model", "isa", "cores", "arch")


def _rows(result: dict[str, Any], mode: str, batch: int, length: int) -> dict[str, dict[str, Any]]:
    return {
        ("torch_ref" if x["framework"] == "torch" else x["framework"]): x
        for x in result["results"]
        if (x["mode"], x["batch"], x["length"]) == (mode, batch, length)
    }


def _speedup(flax: dict[str, Any], peer: dict[str, Any]) -> tuple[float, list[float], str]:
    """(median per-pair ratio, all pairs, cell text) of Flax over `peer` in one run."""
    s = peer.get("flax_speedup")
    if s is None:  # an old result: the ratio of the medians only
        ratio = flax["tokens_per_s"]["median"] / peer["tokens_per_s"]["median"]
        return ratio, [ratio], f"{ratio:.2f} (medians)"
    return s["median"], s["pairs"], f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def summary(results: list[dict[str, Any]]) -> str:
    """The Markdown block: date, machine, versions, command, load, the table, targets, compile-time scaling."""
    first = results[0]
    if any(r["machine"][k] != first["machine"][k] for r in results for k in SAME_MACHINE):
        raise ValueError("the results come from different machines: give one machine's runs at a time")
    loads = [f"{r['machine']['load_average_start'][0]} -> {r['machine']['load_average_end'][0]}" for r in results]
    commands = sorted({f"`{r['command']}`" for r in results})
    lines = [
        f"- date (UTC): {' / '.join(r.get('date_utc') or '?' for r in results)}",
        f"- machine (as detected): {describe(first['machine'], load=False)}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in first['machine']['versions'].items())}",
        f"- command: {' / '.join(commands)}",
        f"- load average (1 min) at start -> end: {' / '.join(loads)}",
        "",
        "| B x L | mode | peer | Flax tokens/s | peer tokens/s | Flax / peer, per-pair median (min-max) "
        "| median of runs [all pairs] |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((x["batch"], x["length"], x["mode"]) for x in first["results"] if x["framework"] == "flax")
    for B, L, mode in keys:
        per_run = [_rows(r, mode, B, L) for r in results]
        peers = [name for name in per_run[0] if name != "flax"]
        for peer in peers:
            flax = [rows["flax"]["tokens_per_s"]["median"] for rows in per_run]
            theirs = [rows[peer]["tokens_per_s"]["median"] for rows in per_run]
            ratios = [_speedup(rows["flax"], rows[peer]) for rows in per_run]
            pairs = [p for _, run_pairs, _ in ratios for p in run_pairs]
            marks = ["*" if rows[peer].get("fastest_peer") else "" for rows in per_run]
            cells = [
                " / ".join(f"{x:,.0f}" for x in flax),
                " / ".join(f"{x:,.0f}{m}" for x, m in zip(theirs, marks, strict=True)),
                " / ".join(text for _, _, text in ratios),
                f"{statistics.median(m for m, _, _ in ratios):.2f} [{min(pairs):.2f}-{max(pairs):.2f}]",
            ]
            lines.append(f"| {B} x {L} | {mode} | {peer} | " + " | ".join(cells) + " |")
    targets = [(t["mode"], t["batch"], t["length"], t["what"]) for t in first.get("targets", [])]
    if targets:
        lines += ["", "| target | threshold | per run (value, met) |", "|---|---|---|"]
    for key in targets:
        per_run = [next(t for t in r["targets"] if (t["mode"], t["batch"], t["length"], t["what"]) == key)
                   for r in results]
        peak = key[3] == "peak"
        cells = " / ".join(
            (f"{100 * t['value']:.0f}%" if peak else f"{t['value']:.2f} vs {t['against']}")
            + (" met" if t["met"] else " missed")
            for t in per_run
        )
        limit = f"{100 * per_run[0]['threshold']:.0f}% of matmul peak" if peak else f"{per_run[0]['threshold']:.2f}x"
        what = {"torch_ref": "vs torch_ref", "fastest": "vs fastest eager peer", "peak": "achieved FLOP/s"}[key[3]]
        lines.append(f"| {key[0]} {key[1]} x {key[2]}, {what} | {limit} | {cells} |")
    lines.append("")
    for scaling in first["compile_scaling"]:
        mode, B, L = scaling["mode"], scaling["batch"], scaling["length"]
        per_run = [next(s for s in r["compile_scaling"] if s["mode"] == mode)["compile_s"] for r in results]
        depths = list(per_run[0])
        values = " / ".join(", ".join(f"{run[n]:.2f}" for n in depths) for run in per_run)
        layers = scaling.get("layers", "scanned layers")
        what = f"{mode}, B={B} L={L}, {' and '.join(depths)} layers"
        lines.append(f"- Flax compile s ({layers}; {what}): {values}")
    return "\n".join(lines)


if __name__ == "__main__":
    runs = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            runs.append(json.load(fh))
    if not runs:
        sys.exit("usage: python benchmarks/table.py RESULT.json [RESULT.json ...]")
    print(summary(runs))
