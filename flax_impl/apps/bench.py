"""`flax-impl bench`: the same encoder in Flax (jit) and torch_ref (eager; `--torch-compile` adds torch.compile),
measured in one process, interleaved call by call (A B A B ...) so that both see the same machine load.

Axes: B batch, L length, D model width, F feed-forward width, N heads.

For every (B, L) of the sweep and every mode ("forward": eval mode, no dropout, torch under
`torch.inference_mode()`; "train": one forward + backward + SGD step on a mean-squared loss against a fixed random
target, dropout on) it reports:
- compile_s: wall time of the first call minus the median steady-state step (Flax: trace + XLA compile;
  torch eager: first-call overheads; torch.compile: Dynamo/Inductor compile);
- step time median / min / max over `--repeats` calls after `--warmup` calls, each call timed alone and waited
  for (`block_until_ready` on JAX, `torch.cuda.synchronize` on GPU); tokens/s = B * L / step time;
- achieved FLOP/s from the analytic count below, and its fraction of this machine's matmul peak, measured in the
  same run (at its start and at its end): the best FLOP/s of JAX and torch over repeated (n x n) @ (n x n) and
  (B*L x D) @ (D x F) matmuls (the encoder's widest, at the sweep's largest B*L) in the compute dtype
  (`bench_timing.matmul_peak`);
- peak memory: on CPU the process's resident-set high-water mark (VmHWM) during one steady-state step, reset
  just before it via /proc/self/clear_refs. It is process-wide: it includes both frameworks' weights and
  allocator caches; `rss_step_mb` is how far the step pushed it above the resident size just before;
- the machine as it describes itself (`flax_impl.apps.machine`): CPU model and ISA flags from /proc/cpuinfo,
  cores, load average at the start and the end, XLA_FLAGS, torch threads, versions; the command line and the
  start time (UTC).

The two sides are in `bench_sides` (Flax: `jax.jit` over the `nnx.split` state by default, dropout keys from
`jax.random.key(seed, impl=--rng-impl)`; the bench chooses the key, no global JAX config changes).

FLOP count (matmuls only; embeddings, LayerNorm, softmax, GELU and dropout are not counted):
    forward = n_layers * B * L * (2 * (4 * D^2 + 2 * D * F) + 4 * L * D)
    (q/k/v/out projections 4 D^2 and feed-forward 2 D F multiply-adds per token; q.k^T and probs.v L * D each)
    train   = 3 * forward   (the backward pass costs two matmuls per forward matmul)
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from flax_impl.apps import args as shared
from flax_impl.apps.bench_report import Record, format_table, write_json, write_plot
from flax_impl.apps.bench_sides import FlaxSide, TorchSide, flax_compile_seconds
from flax_impl.apps.bench_timing import matmul_peak, measure_interleaved, stats
from flax_impl.apps.machine import detect_machine, finish_machine
from flax_impl.apps.progress import Progress
from flax_impl.config import FlaxConfig, TransformerConfig

QUICK_SHAPES = ((8, 128), (4, 512))
DEFAULT_SHAPES = ((8, 64), (8, 128), (8, 256), (4, 512))
FLOP_FORMULA = "forward = n_layers*B*L*(2*(4*D^2 + 2*D*F) + 4*L*D); train = 3*forward"
RNG_IMPLS = ("philox4x32", "threefry4x32", "philox2x32", "rbg", "unsafe_rbg", "threefry2x32")


def encoder_flops(config: TransformerConfig, batch: int, length: int, mode: str) -> float:
    """Analytic matmul FLOPs of one forward ("forward") or forward + backward ("train") pass (module docstring)."""
    D, F = config.d_model, config.d_ff
    forward = config.n_layers * batch * length * (2 * (4 * D * D + 2 * D * F) + 4 * length * D)
    return float(forward if mode == "forward" else 3 * forward)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "8x128,4x512" -> [(8, 128), (4, 512)]; anything else raises ValueError naming the bad item."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes item {item!r} must be BxL with positive integers, e.g. 8x128")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def _choices(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or set(items) - set(allowed):
        raise ValueError(f"{option} {text!r}: choose from {', '.join(allowed)}")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl bench` options."""
    a = parser.add_argument
    a("--quick", action="store_true", help="shapes 8x128,4x512, 3 repeats, compile times of 1 and 24 layers")
    a("--shapes", help="comma-separated BxL list [8x64,8x128,8x256,4x512]")
    a("--modes", default="forward,train", help="forward, train or both [both]")
    a("--repeats", type=int, help="timed calls per framework and shape [10; --quick 3]")
    a("--warmup", type=int, default=1, help="untimed calls after the first [1]")
    a("--config", help="JSON file of TransformerConfig fields [the lesson's 6 x 512 encoder]")
    shared.add_model_options(parser, d_model=None, n_heads=None, n_layers=None, d_ff=None,
                             unset="--config's", d_ff_unset="4 x --d-model when given, else --config's")
    a("--vocab", type=int, default=1000, help="vocabulary size V [1000]")
    a("--unrolled", action="store_true",
      help="scan_layers=False: a Python loop of blocks (compile time grows with depth), to compare with the scan")
    a("--scan-unroll", type=int, default=None, metavar="N",
      help="scan_unroll=N: layers per iteration of the scanned loop (n_layers: fully unrolled) [1]")
    shared.add_position_option(parser, None, unset="--config's")
    a("--dropout", type=float, help="dropout of the train step [--config's]")
    a("--precision", choices=["fp32", "bf16"], default="fp32",
      help="bf16 = bfloat16 compute with float32 parameters [fp32]")
    a("--device", choices=["auto", "cpu", "gpu", "tpu"], default="auto", help="[auto: JAX's default backend]")
    a("--frameworks", help="flax, torch or both [both; flax alone on TPU]")
    a("--torch-compile", action="store_true", help="also measure torch.compile (slow to compile)")
    a("--flax-jit", choices=["split", "nnx"], default="split",
      help="split: jax.jit over nnx.split state; nnx: nnx.jit in graph mode, which also returns the model state "
      "on every call [split]")
    a("--rng-impl", default=None, choices=RNG_IMPLS,
      help="JAX PRNG of the Flax dropout stream [philox4x32, whose bits are cheaper on CPU than threefry2x32's "
      "and rbg's loop-based lowerings; threefry2x32 with --mesh, where jax 0.10.2 fails to compile a sharded "
      "init of philox keys]")
    a("--compile-layers", help="Flax compile time of scanned encoders of these depths [1,2,24; --quick 1,24]")
    a("--matmul-size", type=int, default=2048, help="n of the n x n matmul peak [2048]")
    shared.add_mesh_option(parser, "run the Flax side sharded")
    shared.add_seed_option(parser, "the weights, dropout keys and inputs")
    shared.add_json_option(parser, "every measurement, the machine and the command")
    shared.add_plot_option(parser, "tokens/s against length")


def build_config(args: argparse.Namespace, max_length: int) -> tuple[TransformerConfig, FlaxConfig]:
    """The encoder: --config's fields (or the defaults), then the options that override them. Learned positions
    get max_len >= `max_length`."""
    fields: dict[str, Any] = {}
    flax_fields: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object of TransformerConfig fields")
    fields.setdefault("vocab_size", args.vocab)
    if args.n_layers is not None:
        fields["n_layers"] = args.n_layers
    if args.d_model is not None:
        fields["d_model"], fields["d_ff"] = args.d_model, 4 * args.d_model
    if args.d_ff is not None:
        fields["d_ff"] = args.d_ff
    if args.n_heads is not None:
        fields["n_heads"] = args.n_heads
    if args.position is not None:
        fields["position"] = args.position
    if args.unrolled:
        flax_fields["scan_layers"] = False
    if args.scan_unroll is not None:
        flax_fields["scan_unroll"] = args.scan_unroll
    if args.dropout is not None:
        fields["dropout"] = args.dropout
    if args.precision == "bf16":
        flax_fields["dtype"], flax_fields["param_dtype"] = "bfloat16", "float32"
    config = TransformerConfig.from_dict(fields)
    if config.position == "learned" and config.max_len < max_length:
        config = config.replace(max_len=max_length)
    return config, FlaxConfig(**flax_fields)


def _choose_devices(device: str, frameworks: list[str]) -> tuple[str, Any, str | None]:
    """(platform name, JAX device, torch device or None) for --device; ValueError where a side cannot run."""
    import jax

    platform_name = jax.default_backend() if device == "auto" else device
    try:
        jax_device = jax.devices(platform_name)[0]
    except RuntimeError as err:
        raise ValueError(f"--device {device}: JAX has no {platform_name} backend here ({err})") from err
    torch_device = None
    if "torch" in frameworks:
        import torch

        if platform_name == "gpu":
            if not torch.cuda.is_available():
                raise ValueError("--device gpu: this torch has no CUDA; install a CUDA torch or use --frameworks flax")
            torch_device = "cuda"
        elif platform_name == "tpu":
            raise ValueError("--device tpu: torch_ref has no TPU backend; use --frameworks flax")
        else:
            torch_device = "cpu"
    return platform_name, jax_device, torch_device


@dataclass
class Plan:
    """Everything `run` checked before measuring."""

    shapes: list[tuple[int, int]]
    modes: list[str]
    frameworks: list[str]
    repeats: int
    compile_layers: list[int]
    config: TransformerConfig
    flax_config: FlaxConfig
    platform_name: str
    jax_device: Any
    torch_device: str | None
    mesh: Any


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every option and build the configs, devices and mesh; ValueError naming the option. No model is
    built and nothing is compiled or measured here."""
    shapes = parse_shapes(args.shapes) if args.shapes else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    modes = _choices("--modes", args.modes, ("forward", "train"))
    on_tpu = args.device == "tpu" or (args.device == "auto" and _jax_backend() == "tpu")
    frameworks = _choices("--frameworks", args.frameworks or ("flax" if on_tpu else "flax,torch"), ("flax", "torch"))
    if args.torch_compile and "torch" not in frameworks:
        raise ValueError("--torch-compile needs torch in --frameworks")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    if repeats < 1 or args.warmup < 0 or args.matmul_size < 1:
        raise ValueError(f"--repeats={repeats} must be >= 1, --warmup={args.warmup} >= 0, --matmul-size >= 1")
    layers_text = args.compile_layers if args.compile_layers is not None else ("1,24" if args.quick else "1,2,24")
    items = [x.strip() for x in layers_text.split(",") if x.strip()]
    compile_layers = [int(x) for x in items if x.isdigit()]
    if len(compile_layers) != len(items) or any(n < 1 for n in compile_layers):
        raise ValueError(f"--compile-layers {layers_text!r} must be positive integers")
    shared.check_at_least(args, ("n_layers", "d_model", "n_heads", "d_ff", "vocab"))
    shared.check_output_paths(args)
    config, flax_config = build_config(args, max(L for _, L in shapes))
    platform_name, jax_device, torch_device = _choose_devices(args.device, frameworks)
    mesh = shared.build_mesh(args.mesh, config, [B for B, _ in shapes]) if args.mesh else None
    if args.rng_impl is None:
        args.rng_impl = "threefry2x32" if mesh is not None else "philox4x32"
    return Plan(shapes, modes, frameworks, repeats, compile_layers, config, flax_config, platform_name, jax_device,
                torch_device, mesh)


def _jax_backend() -> str:
    import jax

    return jax.default_backend()


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table; write --json / --plot. Returns the exit status (2: bad input)."""
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        return shared.fail("bench", err)

    import jax

    machine = detect_machine(with_torch=plan.torch_device is not None)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    wall = time.perf_counter()
    with jax.default_device(plan.jax_device):
        measured = _measure(args, plan)
    argv = getattr(args, "argv", None)  # set by flax_impl.apps.cli.main
    result = {
        "command": shlex.join(["flax-impl", *argv]) if argv is not None else None,
        "date_utc": started,
        "device": plan.platform_name,
        "device_name": plan.jax_device.device_kind if plan.platform_name != "cpu" else _cpu_name(machine),
        "torch_device": plan.torch_device,
        "cores": machine["cores"],
        "torch_threads": machine["torch_threads"],
        "versions": machine["versions"],
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


def _cpu_name(machine: dict[str, Any]) -> str:
    """The CPU model the machine reports, or "<arch> CPU, model not reported"."""
    return machine["cpu_model"] or f"{machine['arch'] or 'unknown'} CPU, model not reported"


def _measure(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Matmul peak, every (shape, mode) interleaved, compile scaling, matmul peak again: the result dict."""
    import jax
    import jax.numpy as jnp

    config, shapes, modes = plan.config, plan.shapes, plan.modes
    names = [n for n in ("flax", "torch") if n in plan.frameworks] + (["torch.compile"] if args.torch_compile else [])
    calls = len(shapes) * len(modes) * len(names) * (plan.repeats + 1) + 4 + 3 * len(plan.compile_layers) * len(modes)
    progress = Progress(calls)
    progress.step("matmul peak", 0)
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    n, tokens = args.matmul_size, max(B * L for B, L in shapes)
    mm_shapes = [(n, n, n), (tokens, config.d_model, config.d_ff)]  # square, and the encoder's widest matmul
    mm_jax = plan.jax_device if "flax" in plan.frameworks else None
    peaks = matmul_peak(mm_shapes, dtype, mm_jax, plan.torch_device)
    progress.step("building models", 2)
    flax_side = None
    if "flax" in plan.frameworks:
        flax_side = FlaxSide(config, plan.flax_config, device=plan.jax_device, seed=args.seed, rng_impl=args.rng_impl,
                             flax_jit=args.flax_jit, mesh=plan.mesh)
    torch_side = None
    if plan.torch_device:
        torch_side = TorchSide(config, flax_side.model if flax_side else None, device=plan.torch_device,
                               seed=args.seed, torch_compile=args.torch_compile, precision=args.precision)
    rng = np.random.default_rng(args.seed)
    records: list[Record] = []
    for B, L in shapes:
        ids = rng.integers(0, config.vocab_size, (B, L)).astype(np.int32)
        target = rng.standard_normal((B, L, config.d_model)).astype(np.float32)
        for mode in modes:
            runners: dict[str, Callable[[], None]] = {}
            if flax_side:
                runners["flax"] = flax_side.runner(mode, ids, target)
            if torch_side:
                runners["torch"] = torch_side.runner(mode, ids, target)
                if args.torch_compile:
                    runners["torch.compile"] = torch_side.runner(mode, ids, target, compiled=True)
            raw = measure_interleaved(runners, args.warmup, plan.repeats, progress, f"{mode} B={B} L={L}")
            records += _records(raw, config, B, L, mode, args.precision, plan.repeats)
    scaling = _compile_scaling(args, plan, progress) if flax_side and plan.compile_layers else []
    progress.step("matmul peak (again)", 0)
    for name, flops_per_s in matmul_peak(mm_shapes, dtype, mm_jax, plan.torch_device).items():  # best of both
        peaks[name] = max(peaks[name], flops_per_s)
    peak = max(peaks.values())
    for r in records:
        r.peak_fraction = r.achieved_flops / peak
    progress.step("done", 2)
    progress.close()
    return {
        "matmul_peak_flops": peak,
        "matmul_peak": peaks,
        "matmul_shapes": mm_shapes,
        "matmul_dtype": dtype,
        "flop_formula": FLOP_FORMULA,
        "memory": "peak_rss_mb: process VmHWM during one steady step (reset before)",
        "config": config.to_dict(),
        "flax_config": plan.flax_config.to_dict(),
        "precision": args.precision,
        "position": config.position,
        "flax_jit": args.flax_jit,
        "rng_impl": args.rng_impl,
        "warmup": args.warmup,
        "repeats": plan.repeats,
        "mesh": dict(plan.mesh.shape) if plan.mesh is not None else None,
        "jax_device_count": jax.device_count(),
        "jnp_default_int": str(jnp.asarray(0).dtype),
        "results": [asdict(r) for r in records],
        "compile_scaling": scaling,
    }


def _records(
    raw: dict[str, dict[str, Any]], config: TransformerConfig, B: int, L: int, mode: str, precision: str, repeats: int
) -> list[Record]:
    """One Record per framework of one (shape, mode); `speedup_vs_torch_eager` against the "torch" runner."""
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
            )
        )
    eager = next((r for r in records if r.framework == "torch"), None)
    for r in records:
        if eager is not None and r is not eager:
            r.speedup_vs_torch_eager = r.tokens_per_s["median"] / eager.tokens_per_s["median"]
    return records


def _compile_scaling(args: argparse.Namespace, plan: Plan, progress: Progress) -> list[dict[str, Any]]:
    """Flax compile time of scanned encoders of each --compile-layers depth at the first shape, best of rounds
    (the first round pays one-off tracing caches)."""
    B, L = plan.shapes[0]
    scaling = []
    for mode in plan.modes:
        best = {n: math.inf for n in plan.compile_layers}
        for _ in range(2 if args.quick else 3):
            for n in plan.compile_layers:
                progress.step(f"compile time: {mode}, {n} scanned layers", 0)
                seconds = flax_compile_seconds(plan.config, plan.flax_config, n, mode, B, L, args.rng_impl)
                best[n] = min(best[n], seconds)
                progress.step(f"compile time: {mode}, {n} scanned layers")
        scaling.append({"mode": mode, "batch": B, "length": L, "compile_s": {str(n): best[n] for n in best}})
    return scaling
