"""From raw timings to what `flax-impl bench` reports: one `Record` per (runner, B, L, mode) with the per-pair
ratios of Flax against each peer, and the targets of the project checked against them (reported, never asserted).

A ratio is always "how many times faster Flax ran than this peer": the peer's step time over Flax's step time in
the same round (`bench_timing.pair_ratios`); its median and spread over the rounds are reported, not a ratio of
medians.
"""

from __future__ import annotations

import math
from typing import Any

from flax_impl.apps.bench_report import Record
from flax_impl.apps.bench_timing import pair_ratios, stats
from flax_impl.config import TransformerConfig

# The PyTorch peers (built in `bench_peers`, which imports torch; this module does not, so that the bench can set
# torch's OpenMP wait policy before torch loads).
EAGER_PEERS = ("torch_ref", "torch.nn", "torch_ref+sdpa")
PEERS = (*EAGER_PEERS, "torch.compile")
TARGET_SHAPES = ((8, 128), (4, 512))
# (mode, what, threshold): "torch_ref" = the per-pair median against the twin; "fastest" = against the fastest
# eager peer of the same (B, L, mode); "peak" = the forward's fraction of the matmul peak measured in the run.
TARGETS = (
    ("forward", "torch_ref", 1.15),
    ("forward", "fastest", 1.05),
    ("forward", "peak", 0.85),
    ("train", "fastest", 1.0),
)


def encoder_flops(config: TransformerConfig, batch: int, length: int, mode: str) -> float:
    """Analytic matmul FLOPs of one forward ("forward") or forward + backward ("train") pass (bench's docstring)."""
    D, F = config.d_model, config.d_ff
    forward = config.n_layers * batch * length * (2 * (4 * D * D + 2 * D * F) + 4 * length * D)
    return float(forward if mode == "forward" else 3 * forward)


def make_records(
    raw: dict[str, dict[str, Any]],
    config: TransformerConfig,
    B: int,
    L: int,
    mode: str,
    precision: str,
    repeats: int,
    attention: dict[str, str],
) -> list[Record]:
    """One Record per runner of one (B, L, mode); each peer's `flax_speedup` holds the per-pair ratios of the
    "flax" runner against it, and the fastest eager peer (highest median tokens/s) is marked `fastest_peer`."""
    flops = encoder_flops(config, B, L, mode)
    records = []
    for name, m in raw.items():
        tps, step = stats(m["times"], B * L)
        records.append(
            Record(
                framework=name,
                mode=mode,
                batch=B,
                length=L,
                position=config.position,
                precision=precision,
                tokens_per_s=tps,
                step_s=step,
                compile_s=max(m["first"] - step["median"], 0.0),
                first_call_s=m["first"],
                flops=flops,
                achieved_flops=flops / step["median"],
                peak_fraction=math.nan,
                peak_rss_mb=m["peak_rss_mb"],
                rss_step_mb=m["rss_step_mb"],
                repeats=repeats,
                times_s=m["times"],
                attention=attention.get(name),
            )
        )
    flax = next((r for r in records if r.framework == "flax"), None)
    eager = [r for r in records if r.framework in EAGER_PEERS]
    if eager:
        max(eager, key=lambda r: r.tokens_per_s["median"]).fastest_peer = True
    for r in records:
        if flax is not None and r is not flax:
            r.flax_speedup = pair_ratios(flax.times_s, r.times_s)
    return records


def check_targets(records: list[Record]) -> list[dict[str, Any]]:
    """The project's targets at `TARGET_SHAPES` for the records measured (a target whose rows are missing is
    left out).

    Returns:
        [{"mode", "batch", "length", "what", "against", "threshold", "value", "spread": [min, max] or None,
        "met"}]; "value" is a per-pair median ratio, or the forward's fraction of the matmul peak.
    """
    out = []
    for B, L in TARGET_SHAPES:
        for mode, what, threshold in TARGETS:
            rows = [r for r in records if (r.batch, r.length, r.mode) == (B, L, mode)]
            flax = next((r for r in rows if r.framework == "flax"), None)
            if flax is None:
                continue
            if what == "peak":
                value, spread, against = flax.peak_fraction, None, "matmul peak"
            else:
                peer = next((r for r in rows if r.framework == "torch_ref"), None) if what == "torch_ref" else next(
                    (r for r in rows if r.fastest_peer), None
                )
                if peer is None or peer.flax_speedup is None:
                    continue
                s = peer.flax_speedup
                value, spread, against = s["median"], [s["min"], s["max"]], peer.framework
            out.append({"mode": mode, "batch": B, "length": L, "what": what, "against": against,
                        "threshold": threshold, "value": value, "spread": spread, "met": bool(value >= threshold)})
    return out
