"""What `flax-impl bench-decode` reports: the terminal table, a markdown table for benchmarks/, the JSON and the
PNG. The JSON holds everything the tables show and more (every timed call, the machine as detected, configs).

    python -m flax_impl.apps.bench_decode_report RESULT.json     # the markdown tables of a recorded run
"""

from __future__ import annotations

import json
from typing import Any

from flax_impl.apps.machine import describe

RATIO_NAMES = {
    "decode_vs_hf": "decode vs transformers",
    "decode_vs_torch_ref": "decode vs torch_ref",
    "prefill_vs_hf": "prefill vs transformers",
    "prefill_vs_torch_ref": "prefill vs torch_ref",
}


def _ms(spread: dict[str, float]) -> str:
    return f"{1e3 * spread['median']:.1f} ({1e3 * spread['min']:.1f}-{1e3 * spread['max']:.1f})"


def _rate(side: dict[str, Any]) -> str:
    t = side["decode_tokens_per_s"]
    if t is None:
        return "-"
    return f"{t['median']:.0f} ({t['min']:.0f}-{'?' if t['max'] is None else format(t['max'], '.0f')})"


def _agree(side: dict[str, Any]) -> str:
    a = side["tokens_vs_flax"]
    return "yes" if a["equal"] else f"{a['rows_equal']}/{a['rows']} rows, from step {a['first_difference']}"


def _ratios(row: dict[str, Any]) -> str:
    items = []
    for key, text in RATIO_NAMES.items():
        value = row["ratios"][key]
        if value is not None:
            items.append(f"{text} {value:.2f}x" + ("" if row["targets_met"][key] else " (below target)"))
    return "; ".join(items)


def _model_line(name: str, model: dict[str, Any]) -> str:
    c = model["config"]
    kv = c["n_kv_heads"] or c["n_heads"]
    return (f"{name}: {c['n_layers']} x {c['d_model']} (N={c['n_heads']}, K={kv}, F={c['d_ff']}, V={c['vocab_size']}, "
            f"{c['position']} positions, {c['norm']}, {c['mlp']} MLP), {model['params'] / 1e6:.1f} M parameters")


def format_table(result: dict[str, Any]) -> str:
    """The terminal report: machine, models, one row per (model, B, P, side), the ratios of each case."""
    lines = [f"machine: {describe(result['machine'])}"]
    lines += [_model_line(name, m) for name, m in result["models"].items()]
    lines += [
        f"greedy, {result['new_tokens']} new tokens, {result['precision']}, medians of {result['repeats']} rounds "
        "(min-max)",
        "",
        f"{'model':<7}{'B':>3}{'P':>5}  {'side':<10}{'prefill ms':>24}{'decode ms/token':>22}{'decode tok/s':>18}"
        f"{'compile s (1, N)':>18}{'RSS MB':>8}  tokens = flax",
    ]
    for row in result["results"]:
        for name, s in row["sides"].items():
            comp = ", ".join(f"{v:.2f}" for v in s["compile_s"].values())
            rss = "-" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:.0f}"
            lines.append(
                f"{row['model']:<7}{row['batch']:>3}{row['prompt']:>5}  {name:<10}{_ms(s['prefill_s']):>24}"
                f"{_ms(s['decode_s_per_token']):>22}{_rate(s):>18}{comp:>18}{rss:>8}  {_agree(s)}"
            )
        ratios = _ratios(row)
        if ratios:
            lines.append(f"{'':<17}Flax: {ratios}")
    lines.append(f"wall {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown table for benchmarks/README.md: per case, each side's medians and Flax's ratios."""
    lines = [
        "| model | B | P | side | prefill ms | decode ms/token | decode tok/s | compile s (1 / N tokens) "
        "| peak RSS MB | tokens = Flax's |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["results"]:
        for name, s in row["sides"].items():
            t = s["decode_tokens_per_s"]
            comp = " / ".join(f"{v:.2f}" for v in s["compile_s"].values())
            rss = "-" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:.0f}"
            lines.append(
                f"| {row['model']} | {row['batch']} | {row['prompt']} | {name} | {1e3 * s['prefill_s']['median']:.1f} "
                f"| {1e3 * s['decode_s_per_token']['median']:.2f} | {'-' if t is None else format(t['median'], '.0f')} "
                f"| {comp} | {rss} | {_agree(s)} |"
            )
    lines += ["", "| model | B | P | " + " | ".join(f"Flax {t}" for t in RATIO_NAMES.values()) + " |",
              "|---|---|---|" + "---|" * len(RATIO_NAMES)]
    for row in result["results"]:
        cells = []
        for key in RATIO_NAMES:
            v = row["ratios"][key]
            cells.append("-" if v is None else f"{v:.2f}x" + (" ✓" if row["targets_met"][key] else " ✗"))
        lines.append(f"| {row['model']} | {row['batch']} | {row['prompt']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: str) -> None:
    """PNG: per model, prefill ms and decode tokens/s of every side (median bars, min-max error bars) per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(result["models"])
    sides = list(dict.fromkeys(s for row in result["results"] for s in row["sides"]))
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    width = 0.8 / max(len(sides), 1)
    for col, model in enumerate(models):
        rows = [r for r in result["results"] if r["model"] == model]
        x = np.arange(len(rows))
        for ax, metric, label in ((axes[0][col], "prefill_s", "prefill ms (lower is better)"),
                                  (axes[1][col], "decode_tokens_per_s", "decode tokens/s (higher is better)")):
            for k, side in enumerate(sides):
                vals = [r["sides"].get(side, {}).get(metric) for r in rows]
                scale = 1e3 if metric == "prefill_s" else 1.0
                med = [scale * v["median"] if v else 0.0 for v in vals]
                err = [[scale * (v["median"] - v["min"]) if v else 0.0 for v in vals],
                       [scale * (v["max"] - v["median"]) if v and v["max"] is not None else 0.0 for v in vals]]
                ax.bar(x + (k - (len(sides) - 1) / 2) * width, med, width, yerr=err, capsize=2, label=side)
            ax.set_xticks(x, [f"B={r['batch']}\nP={r['prompt']}" for r in rows], fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{model}, {result['new_tokens']} new tokens", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # python -m flax_impl.apps.bench_decode_report RESULT.json: the markdown tables
    import sys

    with open(sys.argv[1]) as f:
        print(markdown_table(json.load(f)))
