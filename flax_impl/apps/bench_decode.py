"""`flax-impl bench-decode`: cached generation side by side: Flax's `generate` (one compiled decode loop),
torch_ref's eager loop and transformers' `generate` (eager attention and SDPA), in one process.

Models (`bench_decode_sides`): "gpt2" (learned positions, multi-head attention) and "llama" (RoPE, RMSNorm, SwiGLU,
grouped-query attention with --kv-heads kv heads), both 6 x 512 by default, random weights built by transformers
and loaded by every side. Each (model, B, P) case runs greedy decoding of prompts of P random tokens (no
padding), with no stop token, so every side generates exactly the tokens asked for. Per side:
- prefill: the wall time of generating 1 token (prompt forward + the first token: the time to the first token);
- decode: the per-token latency (time(N) - time(1)) / (N - 1) of generating N tokens, both calls timed in the same
  round; decode tokens/s = B / that latency;
- medians over --repeats rounds with the min - max spread; in each round every side runs its 1-token and its
  N-token call in turn, the order of the sides rotating from round to round, so all see the same machine load;
- compile: the first call of each program (1 token, N tokens) minus its median steady time (Flax: tracing and
  XLA compile; the torch sides: first-call overheads);
- peak memory: the process's resident-set high-water mark (VmHWM) during one N-token call, reset just before
  (process-wide: every side's weights are resident), and how far that call pushed it above the resident size;
- the tokens of each side's N-token call against Flax's (a sanity check, recorded, never asserted).
The peer of Flax is transformers' faster attention implementation, per metric. Targets (reported, never
asserted): Flax decode tokens/s >= 2x the peer and >= 1.5x torch_ref; prefill >= 1.15x both.
"""

from __future__ import annotations

import argparse
import shlex
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np

from flax_impl.apps import args as shared
from flax_impl.apps.bench_decode_report import format_table, write_plot
from flax_impl.apps.bench_decode_sides import MODELS, SIDES, DecodeModels, Side, agreement, hf_config
from flax_impl.apps.bench_report import write_json
from flax_impl.apps.bench_timing import rss_mb, rss_reset
from flax_impl.apps.machine import detect_machine, finish_machine
from flax_impl.apps.progress import Progress

TARGETS = {"decode_vs_hf": 2.0, "decode_vs_torch_ref": 1.5, "prefill_vs_hf": 1.15, "prefill_vs_torch_ref": 1.15}
DEFAULTS = dict(batches="1,8", prompts="128,512", new_tokens=128, repeats=3)
QUICK = dict(batches="1,8", prompts="128", new_tokens=32, repeats=2)


def _ints(option: str, text: str) -> list[int]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) > 0 for x in items):
        raise ValueError(f"{option} {text!r} must be comma-separated positive integers, e.g. 1,8")
    return [int(x) for x in items]


def _names(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or set(items) - set(allowed):
        raise ValueError(f"{option} {text!r}: choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl bench-decode` options."""
    a = parser.add_argument
    q = QUICK
    a("--quick", action="store_true",
      help=f"batches {q['batches']}, prompt {q['prompts']}, {q['new_tokens']} new tokens, {q['repeats']} repeats")
    a("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)} [both]")
    a("--batches", help=f"batch sizes B [{DEFAULTS['batches']}]")
    a("--prompts", help=f"prompt lengths P [{DEFAULTS['prompts']}]")
    a("--new-tokens", type=int, help=f"tokens generated N >= 2 [{DEFAULTS['new_tokens']}]")
    a("--repeats", type=int, help=f"timed rounds [{DEFAULTS['repeats']}]")
    a("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)} [all]")
    shared.add_model_options(parser, d_model=512, n_heads=8, n_layers=6, d_ff=None,
                             d_ff_unset="gpt2: 4 x D; llama: 8/3 x D rounded up to a multiple of 64")
    a("--kv-heads", type=int, default=2, help="kv heads K of the llama model, a divisor of N [2]")
    a("--vocab", type=int, default=1000, help="vocabulary size V [1000]")
    shared.add_seed_option(parser, "the weights and the prompts")
    shared.add_json_option(parser, "every measurement, the machine and the command")
    shared.add_plot_option(parser, "prefill and decode speed per side")


def llama_d_ff(d_model: int) -> int:
    """The gated MLP's width: 8/3 x D rounded up to a multiple of 64 (as many weights as a 4 x D plain MLP)."""
    return -(-8 * d_model // 3 // 64) * 64


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Check every option before any work; ValueError naming the option. Returns the resolved settings."""
    pick = QUICK if args.quick else DEFAULTS
    plan = {
        "models": _names("--models", args.models, MODELS),
        "sides": _names("--sides", args.sides, SIDES),
        "batches": _ints("--batches", args.batches or pick["batches"]),
        "prompts": _ints("--prompts", args.prompts or pick["prompts"]),
        "new_tokens": pick["new_tokens"] if args.new_tokens is None else args.new_tokens,
        "repeats": pick["repeats"] if args.repeats is None else args.repeats,
    }
    if plan["new_tokens"] < 2:
        raise ValueError(f"--new-tokens={plan['new_tokens']} must be >= 2 (decode latency is time(N) - time(1))")
    if plan["repeats"] < 1:
        raise ValueError(f"--repeats={plan['repeats']} must be >= 1")
    shared.check_at_least(args, ("d_model", "n_heads", "n_layers", "d_ff", "kv_heads", "vocab"))
    if args.d_model % args.n_heads:
        raise ValueError(f"--n-heads={args.n_heads} must divide --d-model={args.d_model}")
    if "llama" in plan["models"] and args.n_heads % args.kv_heads:
        raise ValueError(f"--kv-heads={args.kv_heads} must divide --n-heads={args.n_heads}")
    if "llama" in plan["models"] and (args.d_model // args.n_heads) % 2:
        raise ValueError(f"llama's RoPE needs an even head dim; --d-model / --n-heads = {args.d_model // args.n_heads}")
    shared.check_output_paths(args)
    return plan


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table; write --json / --plot. Returns the exit status (2: bad input)."""
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        return shared.fail("bench-decode", err)

    machine = detect_machine(with_torch=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    wall = time.perf_counter()
    measured = _measure(args, plan)
    argv = getattr(args, "argv", None)  # set by flax_impl.apps.cli.main
    result = {
        "command": shlex.join(["flax-impl", *argv]) if argv is not None else None,
        "date_utc": started,
        **plan,
        "precision": "fp32",
        "targets": TARGETS,
        "method": __doc__.split("\n\n", 1)[1].strip(),
        **measured,
        "machine": finish_machine(machine),
        "wall_s": time.perf_counter() - wall,
    }
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _measure(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """Build each model on every side, measure every (B, P) case: the `models` and `results` of the JSON."""
    cases = [(B, P) for B in plan["batches"] for P in plan["prompts"]]
    N, R = plan["new_tokens"], plan["repeats"]
    progress = Progress(len(plan["models"]) * (1 + len(cases) * len(plan["sides"]) * (2 + 2 * R)))
    max_len = max(1024, max(plan["prompts"]) + N)
    models, results = {}, []
    rng = np.random.default_rng(args.seed)
    for name in plan["models"]:
        progress.step(f"{name}: building the model on every side", 0)
        d_ff = args.d_ff or (4 * args.d_model if name == "gpt2" else llama_d_ff(args.d_model))
        cfg = hf_config(name, d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.kv_heads,
                        n_layers=args.n_layers, d_ff=d_ff, vocab=args.vocab, max_len=max_len)
        built = DecodeModels(cfg, seed=args.seed, sides=plan["sides"])
        progress.step(f"{name}: built")
        models[name] = {"hf_config": _plain(cfg.to_diff_dict()), "config": built.config.to_dict(),
                        "params": built.params}
        sides = {s: built.side(s) for s in plan["sides"]}
        for B, P in cases:
            ids = rng.integers(3, args.vocab, (B, P)).astype(np.int32)  # (B, P)
            mask = np.ones((B, P), np.int32)
            raw = measure_case(sides, ids, mask, N, R, progress, f"{name} B={B} P={P}")
            results.append({"model": name, "batch": B, "prompt": P, "new_tokens": N, **summarize(raw, B, N)})
    progress.step("done", 0)
    progress.close()
    return {"models": models, "results": results}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy of a config dict (drops what json cannot write)."""
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def measure_case(sides: dict[str, Side], ids: np.ndarray, mask: np.ndarray, N: int, repeats: int,
                 progress: Progress, label: str) -> dict[str, dict[str, Any]]:
    """Time every side on one (B, P) case (module docstring): first calls, then `repeats` rounds of a 1-token
    and an N-token call per side, the side order rotating; the first round's N-token calls also probe memory.

    Returns:
        {side: {"first_1", "first_n": s, "t1", "tn": [s, ...], "tokens": (B, N), "peak_rss_mb", "rss_step_mb"}}.
    """
    out: dict[str, dict[str, Any]] = {name: {"t1": [], "tn": []} for name in sides}
    for name, fn in sides.items():
        progress.step(f"{label}: {name} first calls (compile)", 0)
        start = time.perf_counter()
        fn(ids, mask, 1)
        out[name]["first_1"] = time.perf_counter() - start
        start = time.perf_counter()
        out[name]["tokens"] = fn(ids, mask, N)
        out[name]["first_n"] = time.perf_counter() - start
        progress.step(f"{label}: {name} first calls (compile)", 2)
    names = list(sides)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, rec = sides[name], out[name]
            start = time.perf_counter()
            fn(ids, mask, 1)
            rec["t1"].append(time.perf_counter() - start)
            probe = r == 0 and rss_reset()
            before = rss_mb("VmRSS") if probe else None
            start = time.perf_counter()
            fn(ids, mask, N)
            rec["tn"].append(time.perf_counter() - start)
            if r == 0:
                peak = rss_mb("VmHWM") if probe else None
                rec["peak_rss_mb"] = peak
                rec["rss_step_mb"] = peak - before if peak is not None and before is not None else None
            progress.step(f"{label}: round {r + 1}/{repeats}", 2)
    return out


def _spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def summarize(raw: dict[str, dict[str, Any]], B: int, N: int) -> dict[str, Any]:
    """Per side: prefill, decode latency and tokens/s (median, min, max), compile, memory, token agreement; then
    the peer, the ratios and the targets.

    Returns:
        {"sides": {side: {...}}, "peer": {"decode": side, "prefill": side}, "ratios": {...}, "targets_met": {...}}.
    """
    reference = raw["flax"]["tokens"] if "flax" in raw else next(iter(raw.values()))["tokens"]
    sides = {}
    for name, m in raw.items():
        per_token = [(tn - t1) / (N - 1) for t1, tn in zip(m["t1"], m["tn"], strict=True)]
        prefill, decode, total = _spread(m["t1"]), _spread(per_token), _spread(m["tn"])
        sides[name] = {
            "prefill_s": prefill,
            "decode_s_per_token": decode,
            "decode_tokens_per_s": _per_second(B, decode),
            "total_s": total,
            "end_to_end_tokens_per_s": B * N / total["median"],
            "compile_s": {"1_token": max(m["first_1"] - prefill["median"], 0.0),
                          f"{N}_tokens": max(m["first_n"] - total["median"], 0.0)},
            "first_call_s": {"1_token": m["first_1"], f"{N}_tokens": m["first_n"]},
            "peak_rss_mb": m.get("peak_rss_mb"),
            "rss_step_mb": m.get("rss_step_mb"),
            "tokens_vs_flax": agreement(reference, m["tokens"]),
            "times_1_token_s": m["t1"],
            "times_n_tokens_s": m["tn"],
        }
    hf = [s for s in sides if s.startswith("hf-")]
    peer = {
        "decode": max(hf, key=lambda s: _rate(sides[s])) if hf else None,
        "prefill": min(hf, key=lambda s: sides[s]["prefill_s"]["median"]) if hf else None,
    }
    ratios: dict[str, float | None] = dict.fromkeys(TARGETS)
    if "flax" in sides:
        flax = sides["flax"]
        for other, key in ((peer["decode"], "decode_vs_hf"), ("torch_ref", "decode_vs_torch_ref")):
            if other in sides and _rate(sides[other]) > 0 and _rate(flax) > 0:
                ratios[key] = _rate(flax) / _rate(sides[other])
        for other, key in ((peer["prefill"], "prefill_vs_hf"), ("torch_ref", "prefill_vs_torch_ref")):
            if other in sides:
                ratios[key] = sides[other]["prefill_s"]["median"] / flax["prefill_s"]["median"]
    met = {k: (None if v is None else bool(v >= TARGETS[k])) for k, v in ratios.items()}
    return {"sides": sides, "peer": peer, "ratios": ratios, "targets_met": met}


def _per_second(B: int, latency: dict[str, float]) -> dict[str, float | None] | None:
    """B / latency as {"median", "min", "max"}: None where the median latency is not positive (timing noise
    larger than the decode time), "max" None where the smallest latency is not."""
    if latency["median"] <= 0:
        return None
    return {"median": B / latency["median"], "min": B / latency["max"],
            "max": B / latency["min"] if latency["min"] > 0 else None}


def _rate(side: dict[str, Any]) -> float:
    """Median decode tokens/s (0 where the decode latency was not positive)."""
    return side["decode_tokens_per_s"]["median"] if side["decode_tokens_per_s"] else 0.0
