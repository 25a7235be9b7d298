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
    attention: str | None = None  # the attention kernel this runner ran
    flax_speedup: dict[str, Any] | None = None  # peers: per-pair ratios, this peer's step time / Flax's
    fastest_peer: bool = False  # the eager peer with the highest median tokens/s at this (B, L, mode)
    mfu: float | None = None  # achieved FLOP/s over the device's nominal peak (GPU/TPU only)


def layers_text(cfg: dict[str, Any], flax_cfg: dict[str, Any]) -> str:
    """How the Flax side runs its layers: "unrolled layers", "scanned layers" or "scanned layers, k per loop
    iteration" (`scan_unroll` capped at n_layers)."""
    if not flax_cfg["scan_layers"]:
        return "unrolled layers"
    unroll = min(flax_cfg.get("scan_unroll", 1), cfg["n_layers"])
    return "scanned layers" if unroll == 1 else f"scanned layers, {unroll} per loop iteration"


def _ratio_text(r: dict[str, Any]) -> str:
    s = r["flax_speedup"]
    return "-" if s is None else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def format_table(result: dict[str, Any]) -> str:
    """The terminal report: the machine, the encoder, one row per measurement (peers with Flax's per-pair speedup
    over them; * marks the fastest eager peer), the kernels that ran, the targets, the compile-time scaling."""
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
        f"pairs={result['repeats']}",
        "precision pinned: " + "; ".join(result["matmul_precision"].values())
        + f"; torch OpenMP wait policy {result['omp_wait_policy']['value'] or 'unset'}"
        + ("" if result["omp_wait_policy"]["effective"] else " (torch was loaded before the bench: not applied)"),
        "",
        f"{'runner':<16}{'mode':<8}{'B':>4}{'L':>6}{'tok/s med':>11}{'(min - max)':>18}{'ms/step':>9}"
        f"{'compile s':>10}{'GFLOP/s':>9}{'% peak':>8}{'RSS MB':>8}  flax x (pairs: med (min-max))",
    ]
    if result.get("mesh"):
        lines.insert(3, f"flax sharded on mesh {result['mesh']} over {result['jax_device_count']} devices")
    for r in result["results"]:
        t = r["tokens_per_s"]
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        name = r["framework"] + ("*" if r["fastest_peer"] else "")
        mfu = "" if r["mfu"] is None else f"  MFU {100 * r['mfu']:.1f}%"
        lines.append(
            f"{name:<16}{r['mode']:<8}{r['batch']:>4}{r['length']:>6}{t['median']:>11.0f}"
            f"{'(' + format(t['min'], '.0f') + ' - ' + format(t['max'], '.0f') + ')':>18}"
            f"{1e3 * r['step_s']['median']:>9.1f}{r['compile_s']:>10.2f}{r['achieved_flops'] / 1e9:>9.1f}"
            f"{100 * r['peak_fraction']:>7.1f}%{rss:>8}  {_ratio_text(r)}{mfu}"
        )
    lines.append("")
    for mode, kernels in result["attention"].items():
        lines.append(f"attention ({mode}): " + "; ".join(f"{k}: {v}" for k, v in kernels.items()))
    for t in result["targets"]:
        value = f"{100 * t['value']:.1f}%" if t["what"] == "peak" else f"{t['value']:.2f}x"
        limit = f"{100 * t['threshold']:.0f}%" if t["what"] == "peak" else f"{t['threshold']:.2f}x"
        spread = "" if t["spread"] is None else f" (pairs {t['spread'][0]:.2f}-{t['spread'][1]:.2f})"
        lines.append(
            f"target {t['mode']} {t['batch']}x{t['length']} flax vs {t['against']}: {value}{spread} "
            f">= {limit}: {'met' if t['met'] else 'MISSED'}"
        )
    for s in result["compile_scaling"]:
        items = ", ".join(f"{n} layers {t:.2f} s" for n, t in s["compile_s"].items())
        lines.append(f"flax compile ({s['mode']}, B={s['batch']} L={s['length']}, {s['layers']}): {items}")
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
