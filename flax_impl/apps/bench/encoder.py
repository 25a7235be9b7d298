"""`flax-impl bench`: one encoder in Flax (jit) and in the PyTorch peers a user would otherwise run (`peers`), all
holding the same weights, timed in one process in rounds of one call each; forward (eval mode) and train step
(MSE of the hidden states against a fixed random target, plain SGD, dropout on). Per (B, L, mode): step time and
tokens/s, compile time, FLOP/s against the matmul peak measured in the same run (and MFU on GPU/TPU), peak
memory, Flax's per-pair speedup over each peer, the targets; the kernels that ran; compile time against depth.
Method, columns and options: docs/benchmarks.md.

FLOP count (matmuls only): forward = n_layers * B * L * (2 * (4 * D^2 + 2 * D * F) + 4 * L * D); train = 3 *
forward (q/k/v/out projections 4 D^2 and the feed-forward 2 D F multiply-adds per token; q.k^T and probs.v L * D).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from types import SimpleNamespace
from typing import Any

import numpy as np

from flax_impl.apps import args as shared
from flax_impl.apps.bench import common, encoder_sides as sides, machine
from flax_impl.apps.bench.encoder_sides import EAGER_PEERS
from flax_impl.config import FlaxConfig, TransformerConfig

QUICK_SHAPES, DEFAULT_SHAPES = ((8, 128), (4, 512)), ((8, 64), (8, 128), (8, 256), (4, 512))
RNG_IMPLS = ("philox4x32", "threefry4x32", "philox2x32", "rbg", "unsafe_rbg", "threefry2x32")
FLOP_FORMULA = "forward = n_layers*B*L*(2*(4*D^2 + 2*D*F) + 4*L*D); train = 3*forward"
# Checked at these shapes, reported and never asserted: (mode, against, threshold); "fastest" = the fastest eager
# peer of the same (B, L, mode), "peak" = the forward's fraction of the matmul peak.
TARGET_SHAPES = ((8, 128), (4, 512))
TARGETS = (("forward", "torch_ref", 1.15), ("forward", "fastest", 1.05), ("forward", "peak", 0.85),
           ("train", "fastest", 1.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl bench` options."""
    a = parser.add_argument
    a("--quick", action="store_true", help="shapes 8x128,4x512, 5 pairs, compile times of 1 and 24 layers")
    a("--shapes", help="comma-separated BxL list [8x64,8x128,8x256,4x512]")
    a("--modes", default="forward,train", help="forward, train or both [both]")
    a("--repeats", type=int, help="timed rounds (A/B pairs) per shape and mode [10; --quick 5]")
    a("--warmup", type=int, default=1, help="untimed calls after the first [1]")
    a("--config", help="JSON file of TransformerConfig fields [the lesson's 6 x 512 encoder]")
    shared.add_model_options(parser, d_model=None, n_heads=None, n_layers=None, d_ff=None,
                             unset="--config's", d_ff_unset="4 x --d-model when given, else --config's")
    a("--vocab", type=int, default=1000, help="vocabulary size V [1000]")
    a("--unrolled", action="store_true", help="scan_layers=False: a Python loop of blocks, to compare with the scan")
    a("--scan-unroll", type=int, metavar="N", help="scan_unroll=N: layers per iteration of the scanned loop [1]")
    shared.add_position_option(parser, None, unset="--config's")
    a("--dropout", type=float, help="dropout of the train step, in [0, 1) [--config's]")
    a("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: bfloat16 compute, float32 weights [fp32]")
    a("--device", choices=["auto", "cpu", "gpu", "tpu"], default="auto", help="[auto: JAX's default backend]")
    a("--frameworks", help="flax, torch or both [both; flax alone on TPU]")
    a("--peers", help="the eager PyTorch peers, same weights: torch_ref (our twin), torch.nn "
      "(nn.TransformerEncoderLayer's fused path), torch_ref+sdpa [all that can hold the architecture]")
    a("--torch-compile", action="store_true", help="also measure torch.compile of torch_ref (slow to compile)")
    a("--matmul-precision", choices=["float32", "tensorfloat32"], default="float32",
      help="float32 matmul precision, pinned on both sides [float32]")
    a("--flax-jit", choices=["split", "nnx"], default="split",
      help="split: jax.jit over nnx.split state; nnx: graph-mode nnx.jit, which returns the state too [split]")
    a("--rng-impl", choices=RNG_IMPLS, help="JAX PRNG of the Flax dropout stream [philox4x32; threefry2x32 with "
      "--mesh] (docs/design.md#dropout-bits)")
    a("--compile-layers", help="Flax compile time of encoders of these depths [1,2,24; --quick 1,24]")
    a("--matmul-size", type=int, default=2048, help="n of the n x n matmul peak [2048]")
    shared.add_mesh_option(parser, "run the Flax side sharded")
    common.add_common_options(parser, "tokens/s per shape, runner and mode")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "8x128,4x512" -> [(8, 128), (4, 512)]; ValueError naming a bad item."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes item {item!r} must be BxL with positive integers, e.g. 8x128")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def build_config(args: argparse.Namespace, max_length: int) -> tuple[TransformerConfig, FlaxConfig]:
    """The encoder: --config's fields (or the defaults), then the options that override them; learned positions
    get max_len >= `max_length`. ValueError for a config the library refuses."""
    fields: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object of TransformerConfig fields")
    fields.setdefault("vocab_size", args.vocab)
    if args.d_model is not None:
        fields["d_model"], fields["d_ff"] = args.d_model, 4 * args.d_model
    for name in ("n_layers", "d_ff", "n_heads", "position", "dropout"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    flax_fields: dict[str, Any] = {"scan_layers": not args.unrolled}
    if args.scan_unroll is not None:
        flax_fields["scan_unroll"] = args.scan_unroll
    if args.precision == "bf16":
        flax_fields["dtype"], flax_fields["param_dtype"] = "bfloat16", "float32"
    config = TransformerConfig.from_dict(fields)
    if config.position == "learned" and config.max_len < max_length:
        config = config.replace(max_len=max_length)
    return config, FlaxConfig(**flax_fields)


def make_plan(args: argparse.Namespace) -> SimpleNamespace:
    """Check every option, build the configs, pick the devices, peers and mesh; ValueError naming the option.
    Nothing is built, compiled or measured here."""
    import jax

    shapes = parse_shapes(args.shapes) if args.shapes else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    modes = common.names("--modes", args.modes, ("forward", "train"))
    platform = jax.default_backend() if args.device == "auto" else args.device
    frameworks = common.names("--frameworks", args.frameworks or ("flax" if platform == "tpu" else "flax,torch"),
                         ("flax", "torch"))
    if (args.torch_compile or args.peers) and "torch" not in frameworks:
        raise ValueError("--torch-compile and --peers need torch in --frameworks")
    if "torch" in frameworks:
        common.require("torch", why="--frameworks torch (the PyTorch peers; --frameworks flax runs without)")
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)
    if repeats < 1 or args.warmup < 0 or args.matmul_size < 1:
        raise ValueError(f"--repeats={repeats} must be >= 1, --warmup={args.warmup} >= 0, --matmul-size >= 1")
    text = args.compile_layers if args.compile_layers is not None else ("1,24" if args.quick else "1,2,24")
    compile_layers = common.ints("--compile-layers", text)
    shared.check_at_least(args, ("n_layers", "d_model", "n_heads", "d_ff", "vocab", "scan_unroll"))
    if args.dropout is not None:
        shared.check_number("--dropout", args.dropout, low=0.0, high=1.0, high_open=True)
    config, flax_config = build_config(args, max(L for _, L in shapes))
    peers, notes = _choose_peers(args, frameworks, config)
    try:
        jax_device = jax.devices(platform)[0]
    except RuntimeError as err:
        raise ValueError(f"--device {args.device}: JAX has no {platform} backend here ({err})") from err
    torch_device = None
    if "torch" in frameworks:
        import torch

        if platform == "tpu":
            raise ValueError("--device tpu: torch_ref has no TPU backend; use --frameworks flax")
        if platform == "gpu" and not torch.cuda.is_available():
            raise ValueError("--device gpu: this torch has no CUDA; install a CUDA torch or use --frameworks flax")
        torch_device = "cuda" if platform == "gpu" else "cpu"
    mesh = shared.build_mesh(args.mesh, config, [B for B, _ in shapes]) if args.mesh else None
    args.rng_impl = args.rng_impl or ("threefry2x32" if mesh is not None else "philox4x32")
    return SimpleNamespace(shapes=shapes, modes=modes, frameworks=frameworks, peers=peers, peer_notes=notes,
                           repeats=repeats, compile_layers=compile_layers, config=config,
                           flax_config=flax_config, platform=platform, jax_device=jax_device,
                           torch_device=torch_device, mesh=mesh)


def _choose_peers(args: argparse.Namespace, frameworks: list[str], config: TransformerConfig) -> tuple[list, list]:
    """(peers, notes): a default peer that cannot hold the architecture is left out with a note; an explicitly
    requested one is a ValueError."""
    if "torch" not in frameworks:
        return [], []
    peers, notes = common.names("--peers", args.peers, EAGER_PEERS) if args.peers else list(EAGER_PEERS), []
    for name in list(peers):
        why = sides.unsupported(name, config)
        if why:
            if args.peers:
                raise ValueError(f"--peers {name}: cannot hold this encoder ({why})")
            peers.remove(name)
            notes.append(f"{name} left out: cannot hold this encoder ({why})")
    return peers + (["torch.compile"] if args.torch_compile else []), notes


def encoder_flops(config: TransformerConfig, batch: int, length: int, mode: str) -> float:
    """Analytic matmul FLOPs of one forward ("forward") or forward + backward ("train") pass (`FLOP_FORMULA`)."""
    D, F = config.d_model, config.d_ff
    forward = config.n_layers * batch * length * (2 * (4 * D * D + 2 * D * F) + 4 * length * D)
    return float(forward if mode == "forward" else 3 * forward)


def run(args: argparse.Namespace) -> int:
    """`flax-impl bench`: measure, print the table, write --json / --plot. Returns the exit status."""
    return common.run_command("bench", args, plan=make_plan, measure=_measure, report=format_table,
                              markdown=markdown, plot=write_plot)


def _measure(args: argparse.Namespace, plan: SimpleNamespace, result: dict[str, Any], progress: Any) -> None:
    """Fill `result` (module docstring): matmul peak, every (shape, mode) in rounds, compile scaling, peak again."""
    import jax
    import jax.numpy as jnp

    m = machine.detect_machine(with_torch=plan.torch_device is not None)
    m["gpu"] = machine.detect_gpu(plan.jax_device, plan.torch_device)
    config, dtype = plan.config, "bfloat16" if args.precision == "bf16" else "float32"
    names = (["flax"] if "flax" in plan.frameworks else []) + plan.peers
    cases = [(B, L, mode) for B, L in plan.shapes for mode in plan.modes]
    result["planned"] = len(cases) * len(names)
    progress.total = len(cases) * len(names) * (plan.repeats + 1) + 3 * len(plan.compile_layers) * len(plan.modes)
    result.update(device=plan.platform, torch_device=plan.torch_device, cores=m["cores"],
                  device_name=plan.jax_device.device_kind if plan.platform != "cpu" else
                  (m["cpu_model"] or f"{m['arch'] or 'unknown'} CPU, model not reported"),
                  torch_threads=m["torch_threads"], versions=m["versions"], machine=m,
                  peers=plan.peers, peer_notes=plan.peer_notes, config=config.to_dict(),
                  flax_config=plan.flax_config.to_dict(), precision=args.precision, position=config.position,
                  flax_jit=args.flax_jit, rng_impl=args.rng_impl, warmup=args.warmup, repeats=plan.repeats,
                  mesh=dict(plan.mesh.shape) if plan.mesh is not None else None, jax_device_count=jax.device_count(),
                  jnp_default_int=str(jnp.asarray(0).dtype), flop_formula=FLOP_FORMULA, attention={}, targets=[],
                  compile_scaling=[], memory="peak_rss_mb: process VmHWM during one steady step (reset before)")
    mm_shapes = [(args.matmul_size,) * 3, (max(B * L for B, L in plan.shapes), config.d_model, config.d_ff)]
    mm_jax = plan.jax_device if "flax" in plan.frameworks else None
    progress.step("matmul peak", 0)
    with jax.default_device(plan.jax_device), sides.pin_matmul_precision(
        args.matmul_precision, plan.torch_device is not None
    ) as pinned:
        result.update(matmul_precision=pinned, matmul_shapes=mm_shapes, matmul_dtype=dtype,
                      matmul_peak=common.matmul_peak(mm_shapes, dtype, mm_jax, plan.torch_device))
        progress.step("building models", 0)
        flax = torch = None
        if "flax" in plan.frameworks:
            flax = sides.FlaxSide(config, plan.flax_config, device=plan.jax_device, seed=args.seed,
                                  rng_impl=args.rng_impl, flax_jit=args.flax_jit, mesh=plan.mesh)
        if plan.torch_device:
            from flax_impl.apps.bench.peers import TorchSide

            torch = TorchSide(config, flax.model if flax else None, device=plan.torch_device, seed=args.seed,
                              peers=tuple(plan.peers), precision=args.precision)
        rng = np.random.default_rng(args.seed)
        for B, L, mode in cases:
            ids = rng.integers(0, config.vocab_size, (B, L)).astype(np.int32)
            target = rng.standard_normal((B, L, config.d_model)).astype(np.float32)
            runners = {"flax": flax.runner(mode, ids, target)} if flax else {}
            runners.update({name: torch.runner(name, mode, ids, target) for name in plan.peers})
            raw = common.time_calls(runners, plan.repeats, progress, f"{mode} B={B} L={L}",
                                    warmup=max(args.warmup - 1, 0))
            kernels = result["attention"].setdefault(mode, {})
            if not kernels:  # the attention each runner ran at the first shape (the choice does not depend on it)
                text = None
                if flax and plan.platform != "cpu" and plan.mesh is None:  # read from the compiled program
                    with contextlib.suppress(Exception):  # naming the kernel must not cost the run
                        text = flax.compiled_text(mode, ids, target)
                kernels.update({"flax": sides.flax_attention(flax.model, text)} if flax else {})
                kernels.update(torch.kernels(mode, B, L) if torch else {})
            result["results"] += make_records(raw, config, B, L, mode, args.precision, plan.repeats, kernels)
        if flax:
            result["compile_scaling"] = _compile_scaling(args, plan, progress)
        progress.step("matmul peak (again)", 0)
        for name, flops in common.matmul_peak(mm_shapes, dtype, mm_jax, plan.torch_device).items():
            result["matmul_peak"][name] = max(result["matmul_peak"][name], flops)
    peak = result["matmul_peak_flops"] = max(result["matmul_peak"].values())
    compute = "bfloat16" if args.precision == "bf16" else args.matmul_precision
    device_peak = None if plan.platform == "cpu" else sides.device_peak(plan.jax_device.device_kind, compute)
    result["device_peak_flops"] = device_peak
    for r in result["results"]:
        r["peak_fraction"] = r["achieved_flops"] / peak
        r["mfu"] = None if device_peak is None else r["achieved_flops"] / device_peak
    result["targets"] = check_targets(result["results"])


def make_records(raw: dict[str, dict[str, Any]], config: TransformerConfig, B: int, L: int, mode: str,
                 precision: str, repeats: int, attention: dict[str, str]) -> list[dict[str, Any]]:
    """One row per runner of one (B, L, mode); peers carry Flax's per-pair speedup over them (`flax_speedup`),
    the eager peer with the highest median tokens/s is marked `fastest_peer`."""
    flops, rows = encoder_flops(config, B, L, mode), []
    for name, m in raw.items():
        step = common.spread(m["times"])
        rows.append({"framework": name, "mode": mode, "batch": B, "length": L, "position": config.position,
                     "precision": precision, "step_s": step, "tokens_per_s": {
                         "median": B * L / step["median"], "min": B * L / step["max"], "max": B * L / step["min"]},
                     "compile_s": max(m["first"] - step["median"], 0.0), "first_call_s": m["first"], "flops": flops,
                     "achieved_flops": flops / step["median"], "peak_fraction": None,
                     "peak_rss_mb": m["peak_rss_mb"], "rss_step_mb": m["rss_step_mb"], "repeats": repeats,
                     "times_s": m["times"], "attention": attention.get(name), "flax_speedup": None,
                     "fastest_peer": False, "mfu": None})
    eager = [r for r in rows if r["framework"] in EAGER_PEERS]
    if eager:
        max(eager, key=lambda r: r["tokens_per_s"]["median"])["fastest_peer"] = True
    if "flax" in raw:
        for r in rows[1:]:
            r["flax_speedup"] = common.pair_ratios(raw["flax"]["times"], r["times_s"])
    return rows


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets at `TARGET_SHAPES` for the rows measured: [{"mode", "batch", "length", "what", "against",
    "threshold", "value" (a per-pair median, or a fraction of the matmul peak), "spread", "met"}]."""
    out = []
    for (B, L), (mode, what, threshold) in ((s, t) for s in TARGET_SHAPES for t in TARGETS):
        case = [r for r in rows if (r["batch"], r["length"], r["mode"]) == (B, L, mode)]
        flax = next((r for r in case if r["framework"] == "flax"), None)
        peer = next((r for r in case if (r["framework"] == "torch_ref" if what == "torch_ref" else r["fastest_peer"])
                     and r["flax_speedup"]), None)
        if flax is None or (what != "peak" and peer is None):
            continue
        s = peer["flax_speedup"] if what != "peak" else None
        value = flax["peak_fraction"] if s is None else s["median"]
        out.append({"mode": mode, "batch": B, "length": L, "what": what, "against": peer["framework"] if s else
                    "matmul peak", "threshold": threshold, "value": value,
                    "spread": None if s is None else [s["min"], s["max"]], "met": bool(value >= threshold)})
    return out


def _compile_scaling(args: argparse.Namespace, plan: SimpleNamespace, progress: Any) -> list[dict[str, Any]]:
    """Flax compile time (trace + lower + compile of abstract weights) of encoders of each --compile-layers depth
    at the first shape with the run's layer handling, best of 2 (--quick) or 3 rounds."""
    B, L = plan.shapes[0]
    out = []
    for mode in plan.modes:
        best = dict.fromkeys(plan.compile_layers, math.inf)
        for _ in range(2 if args.quick else 3):
            for n in plan.compile_layers:
                progress.step(f"compile time: {mode}, {n} layers")
                seconds = sides.compile_seconds(plan.config, plan.flax_config, n, mode, B, L, args.rng_impl)
                best[n] = min(best[n], seconds)
        out.append({"mode": mode, "batch": B, "length": L, "compile_s": {str(n): t for n, t in best.items()},
                    "layers": layers_text(plan.config.replace(n_layers=max(plan.compile_layers)), plan.flax_config)})
    return out


def layers_text(config: TransformerConfig, flax_config: FlaxConfig) -> str:
    """ "unrolled layers", "scanned layers" or "scanned layers, k per loop iteration" (scan_unroll, capped)."""
    unroll = min(flax_config.scan_unroll, config.n_layers)
    if not flax_config.scan_layers:
        return "unrolled layers"
    return "scanned layers" if unroll == 1 else f"scanned layers, {unroll} per loop iteration"


def _ratio(s: dict[str, Any] | None) -> str:
    return "-" if s is None else f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def format_table(result: dict[str, Any], *, markdown: bool = False) -> str:
    """The report: machine, encoder, one row per measurement (* = the fastest eager peer), kernels, targets,
    compile-time scaling."""
    c, p = result["config"], result["matmul_peak"]
    omp = result["omp_wait_policy"]
    lines = [f"device: {result['device']} ({result['device_name']}, {result['cores']} cores)  matmul peak "
             f"{result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({result['matmul_dtype']}, "
             + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in p.items()) + ")",
             f"machine: {machine.describe(result['machine'])}",
             f"encoder: {c['n_layers']} x {c['d_model']} (N={c['n_heads']}, F={c['d_ff']}, V={c['vocab_size']}, "
             f"{layers_text(TransformerConfig.from_dict(c), FlaxConfig(**result['flax_config']))}), position="
             f"{result['position']}, precision={result['precision']}, dropout(train)={c['dropout']}, "
             f"pairs={result['repeats']}",
             "precision pinned: " + "; ".join(result["matmul_precision"].values()) + "; " + machine.omp_text(omp)]
    lines += [f"flax sharded on mesh {result['mesh']} over {result['jax_device_count']} devices"] * bool(result["mesh"])
    lines += result["peer_notes"] + [""]
    rows = [[r["framework"] + "*" * r["fastest_peer"], r["mode"], str(r["batch"]), str(r["length"]),
             f"{r['tokens_per_s']['median']:.0f} ({r['tokens_per_s']['min']:.0f}-{r['tokens_per_s']['max']:.0f})",
             f"{1e3 * r['step_s']['median']:.1f}", f"{r['compile_s']:.2f}", f"{r['achieved_flops'] / 1e9:.1f}",
             f"{100 * r['peak_fraction']:.1f}%", "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
             _ratio(r["flax_speedup"])] + ([] if r["mfu"] is None else [f"MFU {100 * r['mfu']:.1f}%"])
            for r in result["results"]]
    header = ["runner", "mode", "B", "L", "tok/s med (min-max)", "ms/step", "compile s", "GFLOP/s", "% peak",
              "RSS MB", "flax x (pairs: med (min-max))"]
    lines.append(common.text_table(header + ["MFU"] * (len(rows[0]) > len(header) if rows else 0), rows,
                                   markdown=markdown))
    lines += [""] + [f"attention ({m}): " + "; ".join(f"{k}: {v}" for k, v in kernels.items())
                     for m, kernels in result["attention"].items()]
    for t in result["targets"]:
        pct = t["what"] == "peak"
        value, limit = (f"{100 * t['value']:.1f}%", f"{100 * t['threshold']:.0f}%") if pct else \
            (f"{t['value']:.2f}x", f"{t['threshold']:.2f}x")
        pairs = "" if t["spread"] is None else f" (pairs {t['spread'][0]:.2f}-{t['spread'][1]:.2f})"
        lines.append(f"target {t['mode']} {t['batch']}x{t['length']} flax vs {t['against']}: {value}{pairs} "
                     f">= {limit}: {'met' if t['met'] else 'MISSED'}")
    for s in result["compile_scaling"]:
        lines.append(f"flax compile ({s['mode']}, B={s['batch']} L={s['length']}, {s['layers']}): "
                     + ", ".join(f"{n} layers {t:.2f} s" for n, t in s["compile_s"].items()))
    return "\n".join(lines + [f"FLOPs: {result['flop_formula']}; wall {result.get('wall_s', 0):.0f} s"])


def markdown(runs: list[dict[str, Any]]) -> str:
    """Each recorded run's report with a markdown table, then per (B x L, mode, peer) across the runs: Flax's
    per-pair speedup, the median of the runs' medians and the range of all their pairs."""
    out = [f"### {r['command']} ({r['date_utc']})\n\n" + format_table(r, markdown=True) for r in runs]
    rows = []
    for B, L, mode, peer in dict.fromkeys((r["batch"], r["length"], r["mode"], r["framework"])
                                          for r in runs[0]["results"] if r["flax_speedup"]):
        s = [next((r["flax_speedup"] for r in run["results"] if (r["batch"], r["length"], r["mode"],
                   r["framework"]) == (B, L, mode, peer) and r["flax_speedup"]), None) for run in runs]
        if None not in s:  # a case of every run
            pairs = [p for x in s for p in x["pairs"]]
            rows.append([f"{B} x {L}", mode, peer, " / ".join(_ratio(x) for x in s),
                         f"{statistics.median(x['median'] for x in s):.2f} [{min(pairs):.2f}-{max(pairs):.2f}]"])
    header = ["B x L", "mode", "peer", "Flax / peer per run: median (min-max)", "median of runs [all pairs]"]
    return "\n\n".join(out + [common.text_table(header, rows, markdown=True)])


def write_plot(result: dict[str, Any], path: str) -> None:
    """PNG: tokens/s per (B, L) of every runner, one panel per mode."""
    panels = []
    for mode in dict.fromkeys(r["mode"] for r in result["results"]):
        rows = [r for r in result["results"] if r["mode"] == mode]
        shapes = list(dict.fromkeys((r["batch"], r["length"]) for r in rows))
        series = {name: [next((r["tokens_per_s"] for r in rows if r["framework"] == name and
                               (r["batch"], r["length"]) == s), None) for s in shapes]
                  for name in dict.fromkeys(r["framework"] for r in rows)}
        panels.append((f"{mode} ({result['precision']}, {result['device_name']})", "tokens / s",
                       [f"{B}x{L}" for B, L in shapes], series))
    common.bar_plot(path, panels)
