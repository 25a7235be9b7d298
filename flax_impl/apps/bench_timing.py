"""Timing and memory probes of `flax-impl bench`: rounds of interleaved calls of several runners and the
per-round (A/B pair) ratios, the matmul peak, the process's resident-set high-water mark. Every timed call is
waited for by the runner itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flax_impl.apps.progress import Progress


def rss_reset() -> bool:
    """Reset the process's RSS high-water mark (Linux /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(field_name: str) -> float | None:
    """A /proc/self/status memory field ("VmRSS", "VmHWM") in MB, or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def stats(times: list[float], tokens: int) -> tuple[dict[str, float], dict[str, float]]:
    """(tokens/s, step seconds), each {"median", "min", "max"}; the fastest step gives the highest tokens/s."""
    t = np.asarray(times)
    step = {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max())}
    tps = {"median": tokens / step["median"], "min": tokens / step["max"], "max": tokens / step["min"]}
    return tps, step


def measure_interleaved(
    runners: dict[str, Callable[[], None]], warmup: int, repeats: int, progress: Progress, label: str
) -> dict[str, dict[str, Any]]:
    """Time `runners` in rounds of one call each, so that each round's calls see the same machine load.

    First call of each runner (compile), one memory-probed call each, `warmup - 1` more, then `repeats` rounds of
    one timed call per runner, in the given order on even rounds and the reverse order on odd ones (A B C, C B A,
    ...), so that no runner always follows the same one. `times[r]` of every runner belong to round r: the
    pairs that `pair_ratios` compares.

    Returns:
        {name: {"first": s, "times": [s, ...], "peak_rss_mb": MB or None, "rss_step_mb": MB or None}}.
    """
    out: dict[str, dict[str, Any]] = {name: {"times": []} for name in runners}
    for name, fn in runners.items():
        progress.step(f"{label}: {name} first call (compile)", 0)
        start = time.perf_counter()
        fn()
        out[name]["first"] = time.perf_counter() - start
        progress.step(f"{label}: {name} first call (compile)")
    for name, fn in runners.items():
        reset = rss_reset()
        before = rss_mb("VmRSS")
        fn()
        peak = rss_mb("VmHWM")
        out[name]["peak_rss_mb"] = peak if reset else None
        out[name]["rss_step_mb"] = (peak - before) if reset and peak is not None and before is not None else None
    for _ in range(max(warmup - 1, 0)):
        for fn in runners.values():
            fn()
    names = list(runners)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runners[name]()
            out[name]["times"].append(time.perf_counter() - start)
            progress.step(f"{label}: {name} {r + 1}/{repeats}")
    return out


def pair_ratios(reference: list[float], other: list[float]) -> dict[str, Any]:
    """Per-round speed of the `reference` runner relative to `other`: other_time[r] / reference_time[r] (> 1: the
    reference is faster), with their median and spread.

    Returns:
        {"median", "min", "max", "q1", "q3", "pairs": [ratio per round]}; q1 / q3 are the 25th / 75th percentiles.
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(f"pair_ratios needs equal, non-empty round lists, got {len(reference)} and {len(other)}")
    r = np.asarray(other) / np.asarray(reference)
    q1, median, q3 = np.percentile(r, [25, 50, 75])
    return {"median": float(median), "min": float(r.min()), "max": float(r.max()), "q1": float(q1), "q3": float(q3),
            "pairs": [float(x) for x in r]}


def matmul_peak(
    shapes: list[tuple[int, int, int]], dtype: str, jax_device: Any, torch_device: str | None, repeats: int = 8
) -> dict[str, float]:
    """Best FLOP/s of (m, k) @ (k, n) matmuls over `shapes` and `repeats` consecutive calls of each, in the
    compute dtype, per framework (2 m k n FLOPs each). The calls of one shape and framework run back to back, not
    interleaved with the other framework's: a framework's worker threads keep spinning for a while after its call
    and would slow the other's.

    Args:
        shapes: (m, k, n) triples.
        dtype: "float32" or "bfloat16".
        jax_device: the JAX device, or None to skip JAX.
        torch_device: "cpu" / "cuda", or None to skip torch.
    Returns:
        {"jax": FLOP/s, "torch": FLOP/s} for the frameworks measured.
    """
    rng = np.random.default_rng(0)
    fns: list[tuple[str, float, Callable[[], None]]] = []
    for m, k, n in shapes:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        if jax_device is not None:
            import jax
            import jax.numpy as jnp

            ja, jb = (jax.device_put(jnp.asarray(x, dtype=jnp.dtype(dtype)), jax_device) for x in (a, b))
            mm = jax.jit(jnp.matmul)
            fns.append(("jax", 2.0 * m * k * n, lambda mm=mm, ja=ja, jb=jb: mm(ja, jb).block_until_ready()))
        if torch_device is not None:
            import torch

            ta, tb = (torch.from_numpy(x).to(device=torch_device, dtype=getattr(torch, dtype)) for x in (a, b))

            def torch_mm(ta: Any = ta, tb: Any = tb) -> None:
                with torch.inference_mode():
                    ta @ tb
                if torch_device.startswith("cuda"):
                    torch.cuda.synchronize()

            fns.append(("torch", 2.0 * m * k * n, torch_mm))
    best = {name: 0.0 for name, _, _ in fns}
    for name, flops, fn in fns:  # one shape of one framework at a time: not slowed by the other's threads
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best[name] = max(best[name], flops / (time.perf_counter() - start))
    return best
