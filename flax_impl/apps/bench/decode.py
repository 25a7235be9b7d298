"""`flax-impl bench-decode`: cached greedy generation side by side in one process, every side holding the same
random weights: Flax's `flax_impl.generate`, torch_ref's eager loop, transformers' `generate` (eager attention,
SDPA, and opt-in a static cache with its decode step under `torch.compile`). Per (model, dtype, B, P) and side:
prefill (time to the first token), decode latency and tokens/s, the same as a share of the memory-bandwidth floor,
compile time, peak memory, whether the tokens equal Flax's; Flax's ratios over the peers, the targets.
Method, columns and the floor's definition: docs/benchmarks.md#decoding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.apps import args as shared
from flax_impl.apps.bench import common, machine
from flax_impl.config import TransformerConfig

SIZES = {"small": ("gpt2", "llama"), "real": ("llama-135m",)}
SIDES = {"flax": "flax_impl.generate (the decode loop compiled as one program)",
         "torch_ref": "torch_ref.generate (the same loop, eager), torch.inference_mode",
         "hf-eager": "transformers generate, attn_implementation='eager'",
         "hf-sdpa": "transformers generate, attn_implementation='sdpa'",
         "hf-compile": "transformers generate, sdpa, cache_implementation='static', decode step under "
                       "torch.compile(fullgraph=True, mode='default'), prefill eager"}
# (batches, prompts, new tokens, repeats) per size, and with --quick
DEFAULTS = {"small": ("1,8", "128,512", 128, 3), "real": ("1,8", "128,1024", 64, 3)}
QUICK = {"small": ("1,8", "128", 32, 2), "real": ("1", "128", 16, 2)}
# Flax's ratio over the faster transformers side and over torch_ref (decode tokens/s, prefill time), and (real
# size) its decode tokens/s as a share of the floor at batch 1 and at batch 8 or more; reported, never asserted.
TARGETS = {"small": {"decode_vs_hf": 2.0, "decode_vs_torch_ref": 1.5, "prefill_vs_hf": 1.15,
                     "prefill_vs_torch_ref": 1.15},
           "real": {"decode_vs_hf": 1.3, "decode_vs_torch_ref": 1.3, "prefill_vs_hf": 1.15,
                    "prefill_vs_torch_ref": 1.15, "floor_share_b1": 0.9, "floor_share_b8": 0.7}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl bench-decode` options."""
    a = parser.add_argument
    a("--quick", action="store_true", help="small: batches 1,8, prompt 128, 32 new tokens, 2 rounds; real: "
      "batch 1, prompt 128, 16 new tokens, 2 rounds")
    a("--size", choices=list(SIZES), default="small", help="small: 6 x 512 gpt2 and llama models (V = 1,000); "
      "real: a Llama-architecture 30 x 576 model, 9 heads / 3 kv heads, F 1536, V 49,152 (135 M) [small]")
    a("--models", help="comma-separated, from the size's models (small: gpt2, llama) [all]")
    a("--dtype", default="float32", help="float32, bfloat16 or both, comma-separated: weights and compute of "
      "every side [float32]")
    a("--batches", help="batch sizes B [small 1,8; real 1,8]")
    a("--prompts", help="prompt lengths P [small 128,512; real 128,1024]")
    a("--new-tokens", type=int, help="tokens generated N >= 2 [small 128; real 64]")
    a("--repeats", type=int, help="timed rounds [3]")
    a("--sides", help=f"comma-separated, from {', '.join(SIDES)} [all but hf-compile]")
    a("--torch-compile", action="store_true", help="add hf-compile (compiles per case: minutes at real size)")
    shared.add_model_options(parser, d_model=None, n_heads=None, n_layers=None, d_ff=None,
                             unset="small models: D 512, N 8, 6 layers",
                             d_ff_unset="gpt2: 4 x D; llama: 8/3 x D rounded up to a multiple of 64")
    a("--kv-heads", type=int, help="kv heads K of the small llama, a divisor of N [2]")
    a("--vocab", type=int, help="vocabulary size V of the small models [1000]")
    common.add_common_options(parser, "prefill and decode speed per side")


def llama_d_ff(d_model: int) -> int:
    """The gated MLP's width: 8/3 x D rounded up to a multiple of 64 (as many weights as a 4 x D plain MLP)."""
    return -(-8 * d_model // 3 // 64) * 64


def model_config(name: str, args: argparse.Namespace, max_len: int) -> TransformerConfig:
    """The TransformerConfig of a benchmark model: "gpt2" (learned positions, LayerNorm, tanh-GELU MLP, tied
    head), "llama" (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head), both with the small sizes of
    the options, or "llama-135m" (30 x 576, N 9, K 3, F 1536, V 49,152, tied head: SmolLM-135M's shapes)."""
    if name == "llama-135m":
        sizes = dict(d_model=576, n_heads=9, n_kv_heads=3, n_layers=30, d_ff=1536, vocab_size=49152)
    else:
        D = args.d_model or 512
        sizes = dict(d_model=D, n_heads=args.n_heads or 8, n_layers=args.n_layers or 6, vocab_size=args.vocab or 1000,
                     d_ff=args.d_ff or (4 * D if name == "gpt2" else llama_d_ff(D)))
    if name == "gpt2":
        return TransformerConfig(**sizes, dropout=0.0, max_len=max_len, position="learned", activation="gelu_tanh",
                                 causal=True)
    if name == "llama":
        sizes.update(n_kv_heads=args.kv_heads or 2, lm_head="untied")
    return TransformerConfig(**sizes, dropout=0.0, max_len=max_len, position="rope", activation="silu", causal=True,
                             norm="rmsnorm", mlp="gated", bias=False, norm_eps=1e-5)


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Check every option before any work; ValueError naming the option. Returns the resolved settings."""
    size = args.size
    batches, prompts, new_tokens, repeats = (QUICK if args.quick else DEFAULTS)[size]
    sides = (args.sides or "flax,torch_ref,hf-eager,hf-sdpa") + ",hf-compile" * args.torch_compile
    plan = {"size": size, "models": common.names("--models", args.models or ",".join(SIZES[size]), SIZES[size],
                                                 f" (--size {size})"),
            "dtypes": common.names("--dtype", args.dtype, ("float32", "bfloat16")),
            "sides": common.names("--sides", sides, tuple(SIDES)),
            "batches": common.ints("--batches", args.batches or batches),
            "prompts": common.ints("--prompts", args.prompts or prompts),
            "new_tokens": new_tokens if args.new_tokens is None else args.new_tokens,
            "repeats": repeats if args.repeats is None else args.repeats}
    if plan["new_tokens"] < 2:
        raise ValueError(f"--new-tokens={plan['new_tokens']} must be >= 2 (decode latency is time(N) - time(1))")
    if plan["repeats"] < 1:
        raise ValueError(f"--repeats={plan['repeats']} must be >= 1")
    small = ("d_model", "n_heads", "n_layers", "d_ff", "kv_heads", "vocab")
    given = [n for n in small if getattr(args, n) is not None]
    if size == "real" and given:
        raise ValueError(f"--{given[0].replace('_', '-')}: --size real is the fixed 30 x 576 model")
    shared.check_at_least(args, small)
    D, N, K = args.d_model or 512, args.n_heads or 8, args.kv_heads or 2
    if size == "small" and D % N:
        raise ValueError(f"--n-heads={N} must divide --d-model={D}")
    if "llama" in plan["models"] and (N % K or (D // N) % 2):
        raise ValueError(f"--kv-heads={K} must divide --n-heads={N}, and llama's RoPE needs an even head dim "
                         f"(--d-model / --n-heads = {D // N})")
    max_len = max(2048 if size == "real" else 1024, max(plan["prompts"]) + plan["new_tokens"])
    plan["configs"] = {name: model_config(name, args, max_len) for name in plan["models"]}
    if set(plan["sides"]) - {"flax"}:
        hf = [m for s in plan["sides"] if s.startswith("hf-") for m in ("transformers", "safetensors")]
        common.require("torch", *dict.fromkeys(hf), why="bench-decode --sides " + ",".join(plan["sides"]))
    return plan


def run(args: argparse.Namespace) -> int:
    """`flax-impl bench-decode`: measure, print the table, write --json / --plot. Returns the exit status."""
    return common.run_command("bench-decode", args, plan=make_plan, measure=_measure, report=format_table,
                              markdown=lambda runs: "\n\n".join(format_table(r, markdown=True) for r in runs),
                              plot=write_plot)


def _measure(args: argparse.Namespace, plan: dict[str, Any], result: dict[str, Any], progress: Any) -> None:
    """Fill `result`: the floor's bandwidth, then per model and dtype every side built, then every (B, P) case."""
    from flax_impl.apps.bench.decode_sides import Sides

    with_torch = set(plan["sides"]) != {"flax"}
    hf = any(s.startswith("hf-") for s in plan["sides"])
    result["machine"] = machine.detect_machine(with_torch=with_torch, packages=("transformers",) * hf)
    configs = plan.pop("configs")
    cases = [(B, P) for B in plan["batches"] for P in plan["prompts"]]
    builds = [(name, dtype) for name in plan["models"] for dtype in plan["dtypes"]]
    result.update(plan, method=__doc__, targets=TARGETS[plan["size"]], models={}, planned=len(builds) * len(cases),
                  side_notes={s: SIDES[s] for s in plan["sides"]})
    progress.total = len(builds) * (1 + len(cases) * 2 * len(plan["sides"]) * (1 + plan["repeats"]))
    N, R = plan["new_tokens"], plan["repeats"]
    progress.step("memory bandwidth (the floor)", 0)
    weight_bytes = {(n, d): _weight_bytes(configs[n], d) for n, d in builds}
    nbytes = max(weight_bytes.values())
    result["floor"] = {"buffer_bytes": nbytes, "bandwidth": common.bandwidth(nbytes, with_torch)}
    rng = np.random.default_rng(args.seed)
    for name, dtype in builds:
        progress.step(f"{name} {dtype}: building the model on every side", 0)
        cfg = configs[name]
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as folder:
            sides = Sides(cfg, "gpt2" if name == "gpt2" else "llama", dtype, plan["sides"], args.seed, folder)
            hf_config = json.loads(Path(folder, "config.json").read_text()) if hf else None
        info = result["models"].setdefault(name, {"config": cfg.to_dict(), "hf_config": hf_config,
                                                  "params": sides.params, "weight_bytes": {}})
        info["weight_bytes"][dtype] = weight_bytes[name, dtype]
        progress.step(f"{name} {dtype}: built")
        for B, P in cases:
            ids = rng.integers(3, cfg.vocab_size, (B, P)).astype(np.int32)  # (B, P), no padding
            runners = {f"{s}/{n}": (lambda s=s, n=n, ids=ids, g=sides.generate: g(s, ids, n))
                       for s in plan["sides"] for n in (1, N)}
            raw = common.time_calls(runners, R, progress, f"{name} {dtype} B={B} P={P}")
            row = {"model": name, "dtype": dtype, "batch": B, "prompt": P, "new_tokens": N}
            result["results"].append({**row, **summarize(raw, plan["sides"], B, N, plan["size"])})
        sides = runners = None  # free this model on every side before the next is built
    progress.step("memory bandwidth again", 0)
    for k, v in common.bandwidth(nbytes, with_torch).items():
        result["floor"]["bandwidth"][k] = max(result["floor"]["bandwidth"][k], v)
    _floor_shares(result)


def _weight_bytes(cfg: TransformerConfig, dtype: str) -> int:
    """Bytes of every parameter in `dtype` (counted on an abstract model: nothing allocated)."""
    import jax
    from flax import nnx

    import flax_impl as fi

    model = nnx.eval_shape(lambda: fi.Transformer(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return count * (2 if dtype == "bfloat16" else 4)


def summarize(raw: dict[str, dict[str, Any]], sides: list[str], B: int, N: int, size: str) -> dict[str, Any]:
    """Per side, from the 1-token and N-token calls of each round: prefill, decode latency (time(N) - time(1)) /
    (N - 1) and tokens/s B / latency (median, min, max), compile, memory, token agreement; then the peer (the
    faster transformers side per metric), Flax's ratios and the targets met.

    Returns:
        {"sides": {side: {...}}, "peer": {"decode", "prefill"}, "ratios": {...}, "targets_met": {...}}.
    """
    ref = raw[f"{'flax' if 'flax' in sides else sides[0]}/{N}"]["output"]  # tokens_vs_flax: against Flax's
    out = {}
    for s in sides:
        one, many = raw[f"{s}/1"], raw[f"{s}/{N}"]
        pairs = zip(one["times"], many["times"], strict=True)
        per_token = common.spread([(tn - t1) / (N - 1) for t1, tn in pairs])
        prefill, total = common.spread(one["times"]), common.spread(many["times"])
        out[s] = {"prefill_s": prefill, "decode_s_per_token": per_token,
                  "decode_tokens_per_s": _per_second(B, per_token), "total_s": total,
                  "end_to_end_tokens_per_s": B * N / total["median"],
                  "compile_s": {"1_token": max(one["first"] - prefill["median"], 0.0),
                                f"{N}_tokens": max(many["first"] - total["median"], 0.0)},
                  "first_call_s": {"1_token": one["first"], f"{N}_tokens": many["first"]},
                  "peak_rss_mb": many["peak_rss_mb"], "rss_step_mb": many["rss_step_mb"],
                  "tokens_vs_flax": agreement(ref, many["output"]), "times_1_token_s": one["times"],
                  "times_n_tokens_s": many["times"]}
    hf = [s for s in out if s.startswith("hf-")]
    peer = {"decode": max(hf, key=lambda s: _rate(out[s])) if hf else None,
            "prefill": min(hf, key=lambda s: out[s]["prefill_s"]["median"]) if hf else None}
    targets = TARGETS[size]
    ratios: dict[str, float | None] = dict.fromkeys(t for t in targets if not t.startswith("floor"))
    if "flax" in out:
        flax = out["flax"]
        for other, kind in ((peer["decode"], "hf"), ("torch_ref", "torch_ref")):
            if other in out and _rate(out[other]) > 0 and _rate(flax) > 0:
                ratios[f"decode_vs_{kind}"] = _rate(flax) / _rate(out[other])
        for other, kind in ((peer["prefill"], "hf"), ("torch_ref", "torch_ref")):
            if other in out:
                ratios[f"prefill_vs_{kind}"] = out[other]["prefill_s"]["median"] / flax["prefill_s"]["median"]
    met = {k: None if v is None else bool(v >= targets[k]) for k, v in ratios.items()}
    return {"sides": out, "peer": peer, "ratios": ratios, "targets_met": met}


def _per_second(B: int, latency: dict[str, float]) -> dict[str, float | None] | None:
    """B / latency (median, min, max); None where the median latency is not positive (noise larger than the
    decode time), "max" None where the smallest is not."""
    if latency["median"] <= 0:
        return None
    return {"median": B / latency["median"], "min": B / latency["max"],
            "max": B / latency["min"] if latency["min"] > 0 else None}


def _rate(side: dict[str, Any]) -> float:
    return side["decode_tokens_per_s"]["median"] if side["decode_tokens_per_s"] else 0.0


def _floor_shares(result: dict[str, Any]) -> None:
    """The floor (docs/benchmarks.md#the-memory-bandwidth-floor): a step reads every weight byte once, so at the
    measured bandwidth it takes weight_bytes / bandwidth and yields B tokens. Per row the floor's step time and
    tokens/s, per side decode tokens/s as a share of it; Flax's share against the real size's targets."""
    floor = result["floor"]
    floor["bandwidth_bytes_per_s"] = bw = max(floor["bandwidth"].values())
    for row in result["results"]:
        step = result["models"][row["model"]]["weight_bytes"][row["dtype"]] / bw
        row["floor_step_s"], row["floor_tokens_per_s"] = step, row["batch"] / step
        for side in row["sides"].values():
            t = side["decode_tokens_per_s"]
            side["decode_floor_share"] = None if t is None else {
                k: None if v is None else v / row["floor_tokens_per_s"] for k, v in t.items()}
        flax = row["sides"].get("flax", {}).get("decode_floor_share")
        key = "floor_share_b1" if row["batch"] == 1 else "floor_share_b8" if row["batch"] >= 8 else None
        if key in result["targets"] and flax:
            row["ratios"]["floor_share"] = flax["median"]
            row["targets_met"]["floor_share"] = flax["median"] >= result["targets"][key]


def agreement(reference: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    """How far `tokens` (B, T) follow `reference` (B, T'): {"equal", "rows_equal", "rows", "first_difference"}."""
    T = min(reference.shape[1], tokens.shape[1])
    same = reference[:, :T] == tokens[:, :T]
    rows = same.all(axis=1) & (reference.shape[1] == tokens.shape[1])
    diff = np.nonzero(~same.all(axis=0))[0]
    first = int(diff[0]) if diff.size else (None if reference.shape == tokens.shape else T)
    return {"equal": bool(rows.all()), "rows_equal": int(rows.sum()), "rows": int(rows.size), "first_difference": first}


def _cell(s: dict[str, float] | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    if s is None:
        return "-"
    top = "?" if s["max"] is None else format(scale * s["max"], fmt)
    return f"{format(scale * s['median'], fmt)} ({format(scale * s['min'], fmt)}-{top})"


def format_table(result: dict[str, Any], *, markdown: bool = False) -> str:
    """The report: machine, models, the floor, one row per (model, dtype, B, P, side), Flax's ratios per case.
    Runs recorded before the floor and the dtypes (2026-12-01) print without them."""
    floor = result.get("floor", {"bandwidth": {}})
    bw = floor.get("bandwidth_bytes_per_s") or max(floor["bandwidth"].values(), default=None)
    lines = [f"machine: {machine.describe(result['machine'])}"]
    lines += [machine.omp_text(result["omp_wait_policy"])] if "omp_wait_policy" in result else []
    lines += [f"floor: every weight byte read once per step at {bw / 1e9:.1f} GB/s (best of summing a "
              f"{floor['buffer_bytes'] / 1e6:.0f} MB buffer: " + ", ".join(
                  f"{k} {v / 1e9:.1f}" for k, v in floor["bandwidth"].items()) + ")"] if bw else []
    for name, m in result["models"].items():
        c = m["config"]
        lines.append(f"{name}: {c['n_layers']} x {c['d_model']} (N={c['n_heads']}, K={c['n_kv_heads'] or c['n_heads']}"
                     f", F={c['d_ff']}, V={c['vocab_size']}, {c['position']}, {c['norm']}, {c['mlp']} MLP, "
                     f"{c['lm_head']} head), {m['params'] / 1e6:.1f} M parameters" + "; floor step " * bool(bw)
                     + ", ".join(f"{d} {b / 1e6:.0f} MB = {1e3 * b / bw:.1f} ms"
                                 for d, b in m.get("weight_bytes", {}).items() if bw))
    lines += [f"greedy, {result['new_tokens']} new tokens, medians of {result['repeats']} rounds (min-max)", ""]
    rows = [[r["model"], r.get("dtype", "float32"), str(r["batch"]), str(r["prompt"]), name, _cell(s["prefill_s"], 1e3),
             _cell(s["decode_s_per_token"], 1e3, ".2f"), _cell(s["decode_tokens_per_s"], fmt=".0f"),
             _cell(s.get("decode_floor_share"), 100, ".0f"), " / ".join(f"{v:.2f}" for v in s["compile_s"].values()),
             "-" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:.0f}",
             "yes" if s["tokens_vs_flax"]["equal"] else "{rows_equal}/{rows} rows, from step {first_difference}"
             .format(**s["tokens_vs_flax"])] for r in result["results"] for name, s in r["sides"].items()]
    lines.append(common.text_table(["model", "dtype", "B", "P", "side", "prefill ms", "decode ms/step", "decode tok/s",
                                    "% floor", "compile s (1 / N)", "RSS MB", "tokens = flax"], rows,
                                   markdown=markdown))
    targets = result["targets"]
    for r in result["results"]:
        cells = [f"{k.replace('_', ' ')} {v:.2f}" + ("" if r["targets_met"][k] else " (below target)")
                 for k, v in r["ratios"].items() if v is not None]
        if cells:
            lines.append(f"{r['model']} {r.get('dtype', 'float32')} B={r['batch']} P={r['prompt']}: Flax "
                         + "; ".join(cells))
    lines.append("targets: " + ", ".join(f"{k} {v}" for k, v in targets.items()))
    return "\n".join(lines + [f"wall {result.get('wall_s', 0):.0f} s"])


def write_plot(result: dict[str, Any], path: str) -> None:
    """PNG: per model, prefill ms and decode tokens/s of every side per case."""
    panels = []
    for model in result["models"]:
        rows = [r for r in result["results"] if r["model"] == model]
        labels = [f"B={r['batch']} P={r['prompt']}\n{r['dtype']}" for r in rows]
        for metric, scale, unit in (("prefill_s", 1e3, "prefill ms (lower is better)"),
                                    ("decode_tokens_per_s", 1.0, "decode tokens/s (higher is better)")):
            series = {s: [None if r["sides"][s][metric] is None else
                          {k: scale * (v if v is not None else r["sides"][s][metric]["median"])
                           for k, v in r["sides"][s][metric].items()} for r in rows] for s in result["sides"]}
            panels.append((f"{model}, {result['new_tokens']} new tokens", unit, labels, series))
    common.bar_plot(path, panels)
