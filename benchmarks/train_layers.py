"""Which way of running the layers makes the Flax train step fastest on this machine? (docs/benchmarks.md)

    PYTHONPATH=. python benchmarks/train_layers.py --rounds 7 --json benchmarks/cpu-train-layers-DATE.json

The 6 x 512 encoder's train step (the bench's: MSE + SGD, dropout on) under three FlaxConfigs, in one process,
in rounds of one call each (order reversed every other round): scanned layers (`scan_unroll=1`), the scan fully
unrolled (`scan_unroll=n_layers`: stacked parameters, every layer visible to XLA) and a Python loop of blocks
(`scan_layers=False`). Per (B, L): the median step time of each, each one's per-round time over the scanned
one's (median and range), and the compile time (first call minus the median step).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

VARIANTS = {
    "scanned": {"scan_layers": True, "scan_unroll": 1},
    "scan_unroll=n_layers": {"scan_layers": True, "scan_unroll": 6},
    "unrolled": {"scan_layers": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x128,4x512")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--modes", default="train")
    parser.add_argument("--json")
    args = parser.parse_args()

    import jax

    from flax_impl.apps.bench_sides import FlaxSide
    from flax_impl.config import FlaxConfig, TransformerConfig

    config = TransformerConfig(vocab_size=1000)
    out = {"load_start": os.getloadavg(), "rounds": args.rounds, "results": []}
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        B, L = (int(x) for x in shape.split("x"))
        ids = rng.integers(0, 1000, (B, L)).astype(np.int32)
        target = rng.standard_normal((B, L, config.d_model)).astype(np.float32)
        for mode in args.modes.split(","):
            runners, first = {}, {}
            for name, fields in VARIANTS.items():
                side = FlaxSide(config, FlaxConfig(**fields), device=jax.devices("cpu")[0], seed=0,
                                rng_impl="philox4x32")
                runners[name] = side.runner(mode, ids, target)
                start = time.perf_counter()
                runners[name]()
                first[name] = time.perf_counter() - start
                runners[name]()
            times = {name: [] for name in runners}
            names = list(runners)
            for r in range(args.rounds):
                for name in names if r % 2 == 0 else names[::-1]:
                    start = time.perf_counter()
                    runners[name]()
                    times[name].append(time.perf_counter() - start)
            base = np.asarray(times["scanned"])
            for name, t in times.items():
                ratio = np.asarray(t) / base
                row = {"batch": B, "length": L, "mode": mode, "variant": name, "median_s": float(np.median(t)),
                       "compile_s": first[name] - float(np.median(t)), "time_over_scanned": {
                           "median": float(np.median(ratio)), "min": float(ratio.min()), "max": float(ratio.max())},
                       "times_s": t}
                out["results"].append(row)
                print(f"{mode} {B}x{L} {name:<22} {1e3 * row['median_s']:8.1f} ms  compile {row['compile_s']:6.2f} s"
                      f"  time/scanned {row['time_over_scanned']['median']:.3f} "
                      f"({row['time_over_scanned']['min']:.3f}-{row['time_over_scanned']['max']:.3f})", flush=True)
    out["load_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
