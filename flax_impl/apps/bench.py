"""`flax-impl bench`: the same encoder in Flax (jit) and in the PyTorch peers a user would otherwise run, all
holding the same weights, measured in one process in rounds of one call each (`bench_peers`: torch_ref eager,
nn.TransformerEncoderLayer's fused path, torch_ref with SDPA; `--torch-compile` adds torch.compile).

Axes: B batch, L length, D model width, F feed-forward width, N heads.

For every (B, L) of the sweep and every mode ("forward": eval mode, no dropout, torch under
`torch.inference_mode()`; "train": one forward + backward + SGD step on a mean-squared loss against a fixed random
target, dropout on) it reports:
- compile_s: wall time of the first call minus the median steady-state step (Flax: trace + XLA compile;
  torch eager: first-call overheads; torch.compile: Dynamo/Inductor compile);
- step time median / min / max over `--repeats` rounds after `--warmup` calls, each call timed alone and waited
  for (`block_until_ready` on JAX, `torch.cuda.synchronize` on GPU); tokens/s = B * L / step time;
- Flax's speedup over each peer as the median (and spread) of the per-round ratios, peer time / Flax time
  (`bench_timing.pair_ratios`), the fastest eager peer marked, and the project's targets checked
  (`bench_results`; reported, never asserted);
- achieved FLOP/s from the analytic count below, and its fraction of this machine's matmul peak, measured in the
  same run (at its start and at its end): the best FLOP/s of JAX and torch over repeated (n x n) @ (n x n) and
  (B*L x D) @ (D x F) matmuls (the encoder's widest, at the sweep's largest B*L) in the compute dtype
  (`bench_timing.matmul_peak`); on GPU/TPU also the MFU against the device's nominal peak;
- peak memory: on CPU the process's resident-set high-water mark (VmHWM) during one steady-state step, reset
  just before it via /proc/self/clear_refs. It is process-wide: it includes both frameworks' weights and
  allocator caches; `rss_step_mb` is how far the step pushed it above the resident size just before;
- what was pinned and what ran (`bench_device`): the float32 matmul precision on both sides, torch's OpenMP
  wait policy (set before torch loads), the attention kernel of every runner;
- the machine as it describes itself (`flax_impl.apps.machine`): CPU model and ISA flags from /proc/cpuinfo,
  cores, load average at the start and the end, thread settings, torch threads, versions, the GPU; the command
  line and the start time (UTC).

The options and their checks are in `bench_plan` (every one checked before any work), the Flax side and the
torch runners in `bench_sides` (Flax: `jax.jit` over the `nnx.split` state by default, dropout keys from
`jax.random.key(seed, impl=--rng-impl)`; the bench chooses the key, no global JAX config changes).

FLOP count (matmuls only; embeddings, LayerNorm, softmax, GELU and dropout are not counted):
    forward = n_layers * B * L * (2 * (4 * D^2 + 2 * D * F) + 4 * L * D)
    (q/k/v/out projections 4 D^2 and feed-forward 2 D F multiply-adds per token; q.k^T and probs.v L * D each)
    train   = 3 * forward   (the backward pass costs two matmuls per forward matmul)
"""

from __future__ import annotations

import argparse
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np

from flax_impl.apps import args as shared, bench_device
from flax_impl.apps.bench_plan import Plan, add_arguments, build_config, make_plan, parse_shapes
from flax_impl.apps.bench_report import Record, format_table, layers_text, write_json, write_plot
from flax_impl.apps.bench_results import check_targets, encoder_flops, make_records
from flax_impl.apps.bench_sides import FlaxSide, TorchSide, flax_compile_seconds
from flax_impl.apps.bench_timing import matmul_peak, measure_interleaved
from flax_impl.apps.machine import detect_gpu, detect_machine, finish_machine
from flax_impl.apps.progress import Progress

FLOP_FORMULA = "forward = n_layers*B*L*(2*(4*D^2 + 2*D*F) + 4*L*D); train = 3*forward"
__all__ = ["add_arguments", "build_config", "encoder_flops", "make_plan", "parse_shapes", "run"]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table; write --json / --plot. Returns the exit status (2: bad input)."""
    omp = bench_device.set_omp_wait_policy(args.omp_wait_policy)  # before anything imports torch
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        return shared.fail("bench", err)

    import jax

    machine = detect_machine(with_torch=plan.torch_device is not None)
    machine["gpu"] = detect_gpu(plan.jax_device, plan.torch_device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    wall = time.perf_counter()
    with jax.default_device(plan.jax_device), bench_device.pin_matmul_precision(
        args.matmul_precision, plan.torch_device is not None
    ) as pinned:
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
        "matmul_precision": pinned,
        "omp_wait_policy": omp,
        "peers": plan.peers,
        "peer_notes": plan.peer_notes,
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
    """Matmul peak, every (shape, mode) in interleaved rounds, compile scaling, matmul peak again: the result."""
    import jax
    import jax.numpy as jnp

    config, shapes, modes = plan.config, plan.shapes, plan.modes
    names = (["flax"] if "flax" in plan.frameworks else []) + plan.peers
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
                               seed=args.seed, peers=tuple(plan.peers), precision=args.precision)
    rng = np.random.default_rng(args.seed)
    records: list[Record] = []
    attention: dict[str, dict[str, str]] = {}
    for B, L in shapes:
        ids = rng.integers(0, config.vocab_size, (B, L)).astype(np.int32)
        target = rng.standard_normal((B, L, config.d_model)).astype(np.float32)
        for mode in modes:
            runners: dict[str, Callable[[], None]] = {}
            if flax_side:
                runners["flax"] = flax_side.runner(mode, ids, target)
            for name in plan.peers:
                runners[name] = torch_side.runner(name, mode, ids, target)
            raw = measure_interleaved(runners, args.warmup, plan.repeats, progress, f"{mode} B={B} L={L}")
            kernels = attention.setdefault(mode, {})
            if not kernels:  # the kernels of the first shape (the choice does not depend on the shape)
                kernels.update(_kernels(plan, flax_side, torch_side, mode, B, L, ids, target, args.precision))
            records += make_records(raw, config, B, L, mode, args.precision, plan.repeats, kernels)
    scaling = _compile_scaling(args, plan, progress) if flax_side and plan.compile_layers else []
    progress.step("matmul peak (again)", 0)
    for name, flops_per_s in matmul_peak(mm_shapes, dtype, mm_jax, plan.torch_device).items():  # best of both
        peaks[name] = max(peaks[name], flops_per_s)
    peak = max(peaks.values())
    device_peak = None
    if plan.platform_name != "cpu":
        compute = bench_device.compute_kind(args.precision, args.matmul_precision)
        device_peak = bench_device.device_peak(plan.jax_device.device_kind, compute)
    for r in records:
        r.peak_fraction = r.achieved_flops / peak
        r.mfu = None if device_peak is None else r.achieved_flops / device_peak
    progress.step("done", 2)
    progress.close()
    return {
        "matmul_peak_flops": peak,
        "matmul_peak": peaks,
        "matmul_shapes": mm_shapes,
        "matmul_dtype": dtype,
        "device_peak_flops": device_peak,
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
        "attention": attention,
        "results": [asdict(r) for r in records],
        "targets": check_targets(records),
        "compile_scaling": scaling,
    }


def _kernels(
    plan: Plan, flax_side: Any, torch_side: Any, mode: str, B: int, L: int, ids: Any, target: Any, precision: str
) -> dict[str, str]:
    """The attention kernel each runner ran in `mode`: Flax's own choice (on GPU/TPU read from the compiled
    program), and the scaled-dot-product-attention backend torch dispatches to for the SDPA peers."""
    from flax_impl.apps.bench_peers import PEER_ATTENTION, sdpa_backend

    kernels = {}
    if flax_side is not None:
        text = None
        if plan.platform_name != "cpu" and plan.mesh is None:
            try:
                text = flax_side.compiled_text(mode, ids, target)
            except Exception:  # naming the kernel must not cost the run: "lowering not inspected"
                text = None
        kernels["flax"] = bench_device.flax_attention(flax_side.model, text)
    if torch_side is not None:
        import torch

        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        backend = sdpa_backend(plan.torch_device, B, L, plan.config, dtype, train=mode == "train")
        for name in plan.peers:
            kernels[name] = PEER_ATTENTION[name][mode].format(sdpa=backend)
    return kernels


def _compile_scaling(args: argparse.Namespace, plan: Plan, progress: Progress) -> list[dict[str, Any]]:
    """Flax compile time of encoders of each --compile-layers depth at the first shape, with the run's layer
    handling (scanned, unrolled, scan_unroll), best of rounds (the first round pays one-off tracing caches)."""
    B, L = plan.shapes[0]
    scaling = []
    for mode in plan.modes:
        best = {n: math.inf for n in plan.compile_layers}
        for _ in range(2 if args.quick else 3):
            for n in plan.compile_layers:
                progress.step(f"compile time: {mode}, {n} layers", 0)
                seconds = flax_compile_seconds(plan.config, plan.flax_config, n, mode, B, L, args.rng_impl)
                best[n] = min(best[n], seconds)
                progress.step(f"compile time: {mode}, {n} layers")
        layers = layers_text({"n_layers": max(plan.compile_layers)}, plan.flax_config.to_dict())
        scaling.append({"mode": mode, "batch": B, "length": L, "layers": layers,
                        "compile_s": {str(n): best[n] for n in best}})
    return scaling
