"""Which way of running Flax and PyTorch side by side gives each its solo speed? (docs/benchmarks.md#isolation)

    PYTHONPATH=. python benchmarks/isolation.py --rounds 2 --json benchmarks/cpu-isolation-DATE.json

Every arrangement runs in fresh worker processes (so that OMP_WAIT_POLICY is set before torch loads):
- solo: one framework alone in its process (torch not even imported for Flax);
- same process: both in one process, calls interleaved (A B A B), as `flax-impl bench` runs them;
- two processes: each framework in its own process, the calls alternated by this script over pipes;
under torch's OpenMP wait policy as installed (unset: libgomp spins after each parallel region) and PASSIVE
(its workers sleep at once). The 6 x 512 encoder, forward and train step at one (B, L); median step time per
framework, then each arrangement's time over the solo time of the same policy and round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

POLICIES = ("unset", "PASSIVE")


def worker(frameworks: list[str], shape: tuple[int, int], calls: int, serve: bool) -> None:
    """Build the sides, warm them up, then time `calls` interleaved calls per mode (or serve calls on stdin)."""
    import jax

    from flax_impl.apps.bench_sides import FlaxSide, TorchSide
    from flax_impl.config import FlaxConfig, TransformerConfig

    config = TransformerConfig(vocab_size=1000)
    B, L = shape
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (B, L)).astype(np.int32)
    target = rng.standard_normal((B, L, config.d_model)).astype(np.float32)
    runners = {}
    for mode in ("forward", "train"):
        if "flax" in frameworks:
            side = FlaxSide(config, FlaxConfig(), device=jax.devices("cpu")[0], seed=0, rng_impl="philox4x32")
            runners[("flax", mode)] = side.runner(mode, ids, target)
        if "torch" in frameworks:
            twin = TorchSide(config, None, device="cpu", seed=0)
            runners[("torch", mode)] = twin.runner("torch_ref", mode, ids, target)
    for fn in runners.values():
        fn()
        fn()
    if serve:  # one line in ("forward" / "train"), one step time out
        print("ready", flush=True)
        for line in sys.stdin:
            fn = runners[(frameworks[0], line.strip())]
            start = time.perf_counter()
            fn()
            print(time.perf_counter() - start, flush=True)
        return
    times: dict[str, list[float]] = {f"{fw} {mode}": [] for fw, mode in runners}
    for mode in ("forward", "train"):
        for _ in range(calls):
            for (fw, m), fn in runners.items():
                if m == mode:
                    start = time.perf_counter()
                    fn()
                    times[f"{fw} {mode}"].append(time.perf_counter() - start)
    print(json.dumps({k: float(np.median(v)) for k, v in times.items()}))


def _env(policy: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    return env


def _run(policy: str, frameworks: str, shape: str, calls: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", frameworks, "--shape", shape, "--calls", str(calls)]
    out = subprocess.run(cmd, env=_env(policy), check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _two_processes(policy: str, shape: str, calls: int) -> dict[str, float]:
    procs = {
        fw: subprocess.Popen(
            [sys.executable, __file__, "--worker", fw, "--shape", shape, "--serve"],
            env=_env(policy), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for fw in ("flax", "torch")
    }
    for p in procs.values():
        assert p.stdout.readline().strip() == "ready"
    times: dict[str, list[float]] = {}
    for mode in ("forward", "train"):
        for _ in range(calls):
            for fw, p in procs.items():
                p.stdin.write(mode + "\n")
                p.stdin.flush()
                times.setdefault(f"{fw} {mode}", []).append(float(p.stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--shape", default="8x128")
    parser.add_argument("--calls", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.worker:
        B, L = (int(x) for x in args.shape.split("x"))
        worker(args.worker.split(","), (B, L), args.calls, args.serve)
        return
    rounds = []
    for r in range(args.rounds):
        for policy in POLICIES:
            row = {"round": r, "policy": policy, "load_start": os.getloadavg()[0]}
            solo = {**_run(policy, "flax", args.shape, args.calls), **_run(policy, "torch", args.shape, args.calls)}
            row["solo"] = solo
            row["same process"] = _run(policy, "flax,torch", args.shape, args.calls)
            row["two processes"] = _two_processes(policy, args.shape, args.calls)
            row["load_end"] = os.getloadavg()[0]
            rounds.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for policy in POLICIES:
        for arrangement in ("same process", "two processes"):
            for key in rounds[0]["solo"]:
                ratios = [x[arrangement][key] / x["solo"][key] for x in rounds if x["policy"] == policy]
                summary[f"{policy} / {arrangement} / {key}"] = ratios
    for k, v in summary.items():
        print(f"{k}: time / solo time = {' '.join(f'{x:.3f}' for x in v)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "calls": args.calls, "rounds": rounds, "time_over_solo": summary}, f,
                      indent=1)


if __name__ == "__main__":
    main()
