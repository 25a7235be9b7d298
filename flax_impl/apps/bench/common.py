"""What `flax-impl bench` and `bench-decode` share besides the machine (`machine`): option checks, timing in
rounds with per-pair ratios, the two ceilings (matmul peak, memory bandwidth), the tables and the plot, and the
command loop (every check before any work, Ctrl-C, JSON). Method and columns: docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np

from flax_impl.apps import args as shared
from flax_impl.apps.bench import machine
from flax_impl.apps.progress import Progress, check_interrupted


# ------------------------------------------------------------------------------------------------------ options
def add_common_options(parser: argparse.ArgumentParser, plot_what: str) -> None:
    """--omp-wait-policy, --seed, --json, --plot and --markdown, the same in both benches."""
    parser.add_argument("--omp-wait-policy", choices=machine.OMP_POLICIES, default="passive",
                        help="torch's OpenMP wait policy, set before torch loads; an exported OMP_WAIT_POLICY wins "
                        "(docs/benchmarks.md#isolation) [passive]")
    shared.add_seed_option(parser, "the weights and the inputs")
    shared.add_json_option(parser, "every measurement, the machine and the command (the part measured if stopped)")
    shared.add_plot_option(parser, plot_what)
    parser.add_argument("--markdown", nargs="+", metavar="JSON",
                        help="measure nothing: print the markdown tables of these recorded runs (benchmarks/)")


def names(option: str, text: str, allowed: tuple[str, ...], note: str = "") -> list[str]:
    """Comma-separated names from `allowed`, in order, without repeats; ValueError naming the option otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or set(items) - set(allowed):
        raise ValueError(f"{option} {text!r}: choose from {', '.join(allowed)}{note}")
    return list(dict.fromkeys(items))


def ints(option: str, text: str) -> list[int]:
    """Comma-separated positive integers; ValueError naming the option otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) > 0 for x in items):
        raise ValueError(f"{option} {text!r} must be comma-separated positive integers, e.g. 1,8")
    return [int(x) for x in items]


def require(*modules: str, why: str) -> None:
    """ValueError naming what to install when any of `modules` is missing (checked before any work)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{why} needs {', '.join(missing)}: pip install {' '.join(missing)}")


# ------------------------------------------------------------------------------------------------------- timing
def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None


def spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def rounds(names: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(round, name): every name once per round, in the given order on even rounds and reversed on odd ones, so
    that no runner always follows the same one and the calls of a round see the same machine load."""
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            yield r, name


def time_calls(runners: dict[str, Callable[[], Any]], repeats: int, progress: Progress, label: str, *,
               warmup: int = 0) -> dict[str, dict[str, Any]]:
    """Time `runners` (argument-less calls that return once the device is done) side by side: each one's first
    call (compile), one more call each that records the process's resident-set high-water mark (VmHWM, MB),
    reset just before it, and how far the call pushed it above the resident size before (None off Linux),
    `warmup` untimed rounds, then `repeats` rounds of one timed call each in `rounds` order.

    Returns:
        {name: {"first": s, "output": the first call's return, "times": [s per round], "peak_rss_mb",
        "rss_step_mb"}}; times[r] of every runner belong to round r.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, fn in runners.items():
        progress.step(f"{label}: {name} first call (compile)", 0)
        start = time.perf_counter()
        output = fn()
        out[name] = {"first": time.perf_counter() - start, "output": output, "times": []}
        progress.step(f"{label}: {name} first call (compile)")
    for name, fn in runners.items():
        try:  # reset the high-water mark (Linux)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _rss_mb("VmRSS")
        except OSError:
            before = None
        fn()
        peak = None if before is None else _rss_mb("VmHWM")
        out[name].update(peak_rss_mb=peak, rss_step_mb=None if peak is None else peak - before)
    for _ in range(warmup):
        for fn in runners.values():
            fn()
    for r, name in rounds(list(runners), repeats):
        start = time.perf_counter()
        runners[name]()
        out[name]["times"].append(time.perf_counter() - start)
        progress.step(f"{label}: round {r + 1}/{repeats}")
    return out


def pair_ratios(reference: list[float], other: list[float]) -> dict[str, Any]:
    """Round by round other[r] / reference[r] (> 1: the reference is faster): median, min, max, q1, q3, pairs."""
    if len(reference) != len(other) or not reference:
        raise ValueError(f"pair_ratios needs equal, non-empty round lists, got {len(reference)} and {len(other)}")
    r = np.asarray(other) / np.asarray(reference)
    q1, median, q3 = np.percentile(r, [25, 50, 75])
    return {"median": float(median), "min": float(r.min()), "max": float(r.max()), "q1": float(q1), "q3": float(q3),
            "pairs": [float(x) for x in r]}


# ------------------------------------------------------------------------------------------------- the ceilings
def _best(fns: list[tuple[str, float, Callable[[], Any]]], repeats: int) -> dict[str, float]:
    """Best work / second of each (name, work, fn), one fn's calls back to back (not interleaved with another
    framework's, whose spinning workers would slow it)."""
    best: dict[str, float] = {}
    for name, work, fn in fns:
        fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best[name] = max(best.get(name, 0.0), work / (time.perf_counter() - start))
    return best


def matmul_peak(shapes: list[tuple[int, int, int]], dtype: str, jax_device: Any, torch_device: str | None,
                repeats: int = 8) -> dict[str, float]:
    """Best FLOP/s (2 m k n per call) of (m, k) @ (k, n) matmuls in `dtype` over `shapes`: {"jax", "torch"} for
    the frameworks given (a None device skips one)."""
    rng, fns = np.random.default_rng(0), []
    for m, k, n in shapes:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        if jax_device is not None:
            import jax
            import jax.numpy as jnp

            ja, jb = (jax.device_put(jnp.asarray(x, dtype), jax_device) for x in (a, b))
            mm = jax.jit(jnp.matmul)
            fns.append(("jax", 2.0 * m * k * n, lambda mm=mm, ja=ja, jb=jb: mm(ja, jb).block_until_ready()))
        if torch_device is not None:
            import torch

            ta, tb = (torch.from_numpy(x).to(torch_device, getattr(torch, dtype)) for x in (a, b))
            sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)
            fns.append(("torch", 2.0 * m * k * n, lambda ta=ta, tb=tb, s=sync: (torch.mm(ta, tb), s())))
    return _best(fns, repeats)


def bandwidth(nbytes: int, with_torch: bool, repeats: int = 5) -> dict[str, float]:
    """Best bytes/s of summing a float32 buffer of `nbytes` (every byte read once) with JAX and with torch (both
    use every core): the memory-bandwidth floor's rate. A buffer that fits in the CPU's caches measures them."""
    import jax
    import jax.numpy as jnp

    n = max(nbytes // 4, 1)
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    fns = [("jax", 4.0 * n, lambda: total(x).block_until_ready())]
    if with_torch:
        import torch

        t = torch.ones(n)
        fns.append(("torch", 4.0 * n, lambda: t.sum().item()))
    return _best(fns, repeats)


# ------------------------------------------------------------------------------------------------------ reports
def text_table(header: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    """Aligned columns (the first left-aligned, the others right), or a markdown table."""
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    cell = lambda i, c: c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])  # noqa: E731
    return "\n".join("  ".join(cell(i, c) for i, c in enumerate(r)) for r in [header, *rows])


def bar_plot(path: str, panels: list[tuple[str, str, list[str], dict[str, list[dict[str, float] | None]]]]) -> None:
    """PNG of side-by-side panels (title, y label, x labels, {series: [{"median", "min", "max"} or None per x]}):
    bars at the medians, min-max error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, ylabel, xlabels, series) in zip(axes[0], panels, strict=True):
        x, width = np.arange(len(xlabels)), 0.8 / max(len(series), 1)
        for k, (name, values) in enumerate(series.items()):
            med = [v["median"] if v else 0.0 for v in values]
            err = [[v["median"] - v["min"] if v else 0 for v in values], [v["max"] - v["median"] if v else 0
                                                                          for v in values]]
            ax.bar(x + (k - (len(series) - 1) / 2) * width, med, width, yerr=err, capsize=2, label=name)
        ax.set_xticks(x, xlabels, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_command(name: str, args: argparse.Namespace, *, plan: Callable, measure: Callable, report: Callable,
                markdown: Callable, plot: Callable) -> int:
    """The loop of both benches. Every option is checked by `plan(args)` before any work (ValueError/OSError: a
    one-line message, exit 2); `measure(args, plan, result, progress)` fills `result` as it goes (and sets
    `progress.total` and `result["planned"]`, the rows it will measure), so Ctrl-C stops
    with a one-line summary and the part measured written to --json (exit 130); then the table, JSON and plot.

    Returns:
        The exit status: 0, 2 (bad input) or 130 (interrupted).
    """
    if getattr(args, "markdown", None):
        try:
            runs = []
            for path in args.markdown:
                with open(path) as f:
                    runs.append(json.load(f))
        except (OSError, ValueError) as err:
            return shared.fail(name, f"--markdown: {err}")
        try:
            print(markdown(runs))
        except KeyError as err:
            return shared.fail(name, f"--markdown: not a result of this command (no field {err})")
        return 0
    omp = machine.set_omp_wait_policy(args.omp_wait_policy)  # before anything imports torch
    try:
        shared.check_seed(args)
        shared.check_output_paths(args)
        checked = plan(args)
    except (ValueError, OSError) as err:
        return shared.fail(name, err)
    argv = getattr(args, "argv", None)  # set by flax_impl.apps.cli.main
    result: dict[str, Any] = {"command": shlex.join(["flax-impl", *argv]) if argv is not None else None,
                              "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "omp_wait_policy": omp, "interrupted": False, "results": []}
    wall, progress = time.perf_counter(), Progress(1)
    try:
        measure(args, checked, result, progress)
        check_interrupted()
    except KeyboardInterrupt:
        result["interrupted"] = True
    finally:
        progress.close()
        if "machine" in result:
            result["machine"]["load_average_end"] = machine.load_average()
        result["wall_s"] = time.perf_counter() - wall
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if result["interrupted"]:
        print(f"flax-impl {name}: interrupted after {result['wall_s']:.0f} s, {len(result['results'])} of "
              f"{result.get('planned', '?')} rows measured" + (f"; written to {args.json}" if args.json else ""),
              file=sys.stderr)
        return 130
    print(report(result))
    if args.plot:
        plot(result, args.plot)
    for path in (args.json, args.plot):
        if path:
            print(f"wrote {path}")
    return 0
