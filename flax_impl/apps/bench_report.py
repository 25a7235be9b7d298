"""What `flax-impl bench` reports: one `Record` per measurement, the terminal table, the PNG and the JSON.

The JSON holds everything the table shows and more: the machine as detected (`flax_impl.apps.machine`), the
command line, versions, configs, every timed call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flax_impl.apps.machine import describe


@dataclass
class Record:
    """One (framework, mode, B, L) measurement; times in seconds."""

    framework: str
    mode: str
    batch: int
    length: int
    position: str
    precision: str
    tokens_per_s: dict[str, float]
    step_s: dict[str, float]
    compile_s: float
    first_call_s: float
    flops: float
    achieved_flops: float
    peak_fraction: float
    peak_rss_mb: float | None
    rss_step_mb: float | None
    repeats: int
    times_s: list[float] = field(default_factory=list)
    speedup_vs_torch_eager: float | None = None


def layers_text(cfg: dict[str, Any], flax_cfg: dict[str, Any]) -> str:
    """How the Flax side runs its layers: "unrolled layers", "scanned layers" or "scanned layers, k per loop
    iteration" (`scan_unroll` capped at n_layers)."""
    if not flax_cfg["scan_layers"]:
        return "unrolled layers"
    unroll = min(flax_cfg.get("scan_unroll", 1), cfg["n_layers"])
    return "scanned layers" if unroll == 1 else f"scanned layers, {unroll} per loop iteration"


def format_table(result: dict[str, Any]) -> str:
    """The terminal report: the machine, the encoder, one row per measurement, then the compile-time scaling."""
    cfg = result["config"]
    lines = [
        f"device: {result['device']} ({result['device_name']}, {result['cores']} cores)  "
        f"matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({result['matmul_dtype']}, "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in result["matmul_peak"].items())
        + ")",
        f"machine: {describe(result['machine'])}",
        f"encoder: {cfg['n_layers']} x {cfg['d_model']} (N={cfg['n_heads']}, F={cfg['d_ff']}, V={cfg['vocab_size']}, "
        f"{layers_text(cfg, result['flax_config'])}), "
        f"position={result['position']}, precision={result['precision']}, dropout(train)={cfg['dropout']}, "
        f"repeats={result['repeats']}",
        "",
        f"{'framework':<14}{'mode':<8}{'B':>4}{'L':>6}{'tok/s med':>11}{'(min - max)':>18}{'ms/step':>9}"
        f"{'compile s':>10}{'GFLOP/s':>9}{'% peak':>8}{'RSS MB':>8}{'vs torch':>9}",
    ]
    if result.get("mesh"):
        lines.insert(3, f"flax sharded on mesh {result['mesh']} over {result['jax_device_count']} devices")
    for r in result["results"]:
        t = r["tokens_per_s"]
        vs = f"{r['speedup_vs_torch_eager']:.2f}x" if r["speedup_vs_torch_eager"] is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        lines.append(
            f"{r['framework']:<14}{r['mode']:<8}{r['batch']:>4}{r['length']:>6}{t['median']:>11.0f}"
            f"{'(' + format(t['min'], '.0f') + ' - ' + format(t['max'], '.0f') + ')':>18}"
            f"{1e3 * r['step_s']['median']:>9.1f}{r['compile_s']:>10.2f}{r['achieved_flops'] / 1e9:>9.1f}"
            f"{100 * r['peak_fraction']:>7.1f}%{rss:>8}{vs:>9}"
        )
    for s in result["compile_scaling"]:
        items = ", ".join(f"{n} layers {t:.2f} s" for n, t in s["compile_s"].items())
        lines.append(f"flax compile ({s['mode']}, B={s['batch']} L={s['length']}, scanned): {items}")
    lines.append(f"FLOPs: {result['flop_formula']}; wall {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    """`result` as indented JSON at `path`."""
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def write_plot(result: dict[str, Any], path: str) -> None:
    """PNG: tokens/s (median, min-max bars) against length, one line per framework and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, mode in zip(axes[0], ("forward", "train"), strict=True):
        for fw in dict.fromkeys(r["framework"] for r in result["results"]):
            rows = sorted(
                (r for r in result["results"] if r["framework"] == fw and r["mode"] == mode), key=lambda r: r["length"]
            )
            if not rows:
                continue
            x = [r["length"] for r in rows]
            y = [r["tokens_per_s"]["median"] for r in rows]
            err = [
                [a - r["tokens_per_s"]["min"] for a, r in zip(y, rows, strict=True)],
                [r["tokens_per_s"]["max"] - a for a, r in zip(y, rows, strict=True)],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{fw} {mode}")
            for r in rows:
                ax.annotate(
                    f"B={r['batch']}",
                    (r["length"], r["tokens_per_s"]["median"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{mode} ({result['precision']}, {result['device_name']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
