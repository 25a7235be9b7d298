"""Print the Markdown summary of `flax-impl bench --json` results of one command, for benchmarks/README.md.

    PYTHONPATH=. python benchmarks/table.py benchmarks/cpu-quick-2026-12-01-*.json

One row per (B x L, mode); each cell lists the runs' values in the order given, separated by " / ". The machine
line is the bench's own detection (`flax_impl.apps.machine.describe`); runs on different machines are refused.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from flax_impl.apps.machine import describe

SAME_MACHINE = ("cpu_model", "isa", "cores", "arch")


def _row(result: dict[str, Any], framework: str, mode: str, batch: int, length: int) -> dict[str, Any]:
    key = (framework, mode, batch, length)
    return next(x for x in result["results"] if (x["framework"], x["mode"], x["batch"], x["length"]) == key)


def summary(results: list[dict[str, Any]]) -> str:
    """The Markdown block: date, machine, versions, command, load, the table, then the compile-time scaling."""
    first = results[0]
    if any(r["machine"][k] != first["machine"][k] for r in results for k in SAME_MACHINE):
        raise ValueError("the results come from different machines: give one machine's runs at a time")
    loads = [f"{r['machine']['load_average_start'][0]} -> {r['machine']['load_average_end'][0]}" for r in results]
    commands = " / ".join(f"`{r['command']}`" for r in results)
    lines = [
        f"- date (UTC): {' / '.join(r.get('date_utc') or '?' for r in results)}",
        f"- machine (as detected): {describe(first['machine'], load=False)}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in first['machine']['versions'].items())}",
        f"- command: {commands}",
        f"- load average (1 min) at start -> end: {' / '.join(loads)}",
        "",
        "| B x L | mode | Flax tokens/s | torch_ref tokens/s | Flax / torch_ref | Flax compile s |",
        "|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((x["batch"], x["length"], x["mode"]) for x in first["results"] if x["framework"] == "flax")
    for B, L, mode in keys:
        flax = [_row(r, "flax", mode, B, L)["tokens_per_s"]["median"] for r in results]
        torch = [_row(r, "torch", mode, B, L)["tokens_per_s"]["median"] for r in results]
        compile_s = [_row(r, "flax", mode, B, L)["compile_s"] for r in results]
        cells = [
            " / ".join(f"{x:,.0f}" for x in flax),
            " / ".join(f"{x:,.0f}" for x in torch),
            " / ".join(f"{f / t:.2f}" for f, t in zip(flax, torch, strict=True)),
            " / ".join(f"{x:.1f}" for x in compile_s),
        ]
        lines.append(f"| {B} x {L} | {mode} | " + " | ".join(cells) + " |")
    lines.append("")
    for scaling in first["compile_scaling"]:
        mode, B, L = scaling["mode"], scaling["batch"], scaling["length"]
        per_run = [next(s for s in r["compile_scaling"] if s["mode"] == mode)["compile_s"] for r in results]
        depths = list(per_run[0])
        values = " / ".join(", ".join(f"{run[n]:.2f}" for n in depths) for run in per_run)
        what = f"{mode}, B={B} L={L}, {' and '.join(depths)} layers"
        lines.append(f"- Flax compile s of a scanned encoder ({what}): {values}")
    return "\n".join(lines)


if __name__ == "__main__":
    runs = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            runs.append(json.load(fh))
    if not runs:
        sys.exit("usage: python benchmarks/table.py RESULT.json [RESULT.json ...]")
    print(summary(runs))
