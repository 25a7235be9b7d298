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
  (B*L x D) @ (D x F) matmuls (the encoder's widest, at the sweep's largest B*L) in the compute dtype, each
  framework's calls back to back (interleaved, each was slowed by the other's still-spinning worker threads);
- peak memory: on CPU the process's resident-set high-water mark (VmHWM) during one steady-state step, reset
  just before it via /proc/self/clear_refs. It is process-wide: it includes both frameworks' weights and
  allocator caches; `rss_step_mb` is how far the step pushed it above the resident size just before.

Flax side: `jax.jit` over the `nnx.split` state by default (`--flax-jit nnx` measures graph-mode `nnx.jit`, which
also returns the model state on every call); the train step donates its weights. Its dropout keys come from
`jax.random.key(seed, impl=--rng-impl)`, philox4x32 by default: on CPU its random bits measured ~4x cheaper than
threefry2x32 and rbg (whose XLA CPU lowerings are loop-based). The bench chooses the key; no global JAX config changes.
The mean-squared loss and plain SGD step are identical on both sides (torch: torch.optim.SGD).

FLOP count (matmuls only; embeddings, LayerNorm, softmax, GELU and dropout are not counted):
    forward = n_layers * B * L * (2 * (4 * D^2 + 2 * D * F) + 4 * L * D)
    (q/k/v/out projections 4 D^2 and feed-forward 2 D F multiply-adds per token; q.k^T and probs.v L * D each)
    train   = 3 * forward   (the backward pass costs two matmuls per forward matmul)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flax_impl.config import FlaxConfig, TransformerConfig

QUICK_SHAPES = ((8, 128), (4, 512))
DEFAULT_SHAPES = ((8, 64), (8, 128), (8, 256), (4, 512))
FLOP_FORMULA = "forward = n_layers*B*L*(2*(4*D^2 + 2*D*F) + 4*L*D); train = 3*forward"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl bench` options."""
    parser.add_argument("--quick", action="store_true", help="shapes 8x128,4x512, 3 repeats (< 2 min on 2 cores)")
    parser.add_argument("--shapes", help="comma-separated BxL list (default: 8x64,8x128,8x256,4x512)")
    parser.add_argument("--modes", default="forward,train", help="forward, train or both (default: both)")
    parser.add_argument("--repeats", type=int, help="timed calls per framework and shape (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (default 1)")
    parser.add_argument(
        "--config", help="JSON file of TransformerConfig fields (default: the lesson's 6 x 512 encoder)"
    )
    parser.add_argument("--layers", type=int, help="override n_layers")
    parser.add_argument("--d-model", type=int, help="override d_model (d_ff follows as 4 * d_model)")
    parser.add_argument("--heads", type=int, help="override n_heads")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size (default 1000)")
    parser.add_argument(
        "--unrolled",
        action="store_true",
        help="scan_layers=False: a Python loop of blocks (slower compile; its CPU train step "
        "measured -3 to +10 %% against the scanned one side by side)",
    )
    parser.add_argument(
        "--scan-unroll",
        type=int,
        default=None,
        metavar="N",
        help="scan_unroll=N: layers per iteration of the scanned loop (n_layers: fully unrolled)",
    )
    parser.add_argument("--position", choices=["sinusoidal", "learned", "rope", "alibi", "none"])
    parser.add_argument("--dropout", type=float, help="dropout of the train step (default: the config's, 0.1)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = bfloat16 compute with float32 parameters"
    )
    parser.add_argument("--device", choices=["auto", "cpu", "gpu", "tpu"], default="auto")
    parser.add_argument("--frameworks", help="flax, torch or both (default: both; flax alone on TPU)")
    parser.add_argument("--torch-compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument(
        "--flax-jit",
        choices=["split", "nnx"],
        default="split",
        help="split: jax.jit over nnx.split state (default); nnx: nnx.jit in graph mode",
    )
    parser.add_argument(
        "--rng-impl",
        default=None,
        choices=["philox4x32", "threefry4x32", "philox2x32", "rbg", "unsafe_rbg", "threefry2x32"],
        help="JAX PRNG of the Flax dropout stream (default philox4x32, the cheapest bits measured on "
        "CPU; threefry2x32 with --mesh, where jax 0.10.2 fails to compile a sharded init of "
        "philox keys)",
    )
    parser.add_argument(
        "--compile-layers", help="Flax compile time of scanned encoders of these depths (default 1,2,24; quick 1,24)"
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n matmul peak (default 2048)")
    parser.add_argument(
        "--mesh",
        metavar="data=D,model=M",
        help="run the Flax side sharded on a (data, model) device mesh (flax_impl.distributed); on "
        "CPU simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=8",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of tokens/s against length (needs matplotlib)")


@dataclass
class Record:
    """One (framework, mode, B, L) measurement; times in seconds."""

    framework: str
    mode: str
    batch: int
    length: int
    position: str
    precision: str
    tokens_per_s: dict[str, float]
    step_s: dict[str, float]
    compile_s: float
    first_call_s: float
    flops: float
    achieved_flops: float
    peak_fraction: float
    peak_rss_mb: float | None
    rss_step_mb: float | None
    repeats: int
    times_s: list[float] = field(default_factory=list)
    speedup_vs_torch_eager: float | None = None


# ----------------------------------------------------------------------------------------------- environment
class Progress:
    """A one-line progress bar on stderr (rewritten in place on a terminal, one line per phase otherwise)."""

    def __init__(self, total: int):
        self.total, self.done, self.start, self.tty = max(total, 1), 0, time.perf_counter(), sys.stderr.isatty()
        self.last = ""

    def step(self, label: str, n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        frac = self.done / self.total
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = f"[{bar}] {100 * frac:3.0f}% {time.perf_counter() - self.start:5.0f}s  {label}"
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110))
            sys.stderr.flush()
        elif label != self.last:
            sys.stderr.write(line + "\n")
        self.last = label

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_reset() -> bool:
    """Reset the process's RSS high-water mark (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _stats(times: list[float], tokens: int) -> tuple[dict[str, float], dict[str, float]]:
    t = np.asarray(times)
    step = {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max())}
    tps = {"median": tokens / step["median"], "min": tokens / step["max"], "max": tokens / step["min"]}
    return tps, step


# ----------------------------------------------------------------------------------------------- Flax side
LR = 1e-4  # SGD learning rate of the benchmark's train step (both sides)


def _flax_forward_fn(gdef: Any) -> Callable:
    from flax import nnx

    def forward(state: Any, ids: Any) -> Any:
        return nnx.merge(gdef, state)(ids)  # (B, L, D)

    return forward


def _flax_train_fn(gdef: Any) -> Callable:
    """(params, rest, ids, target) -> (params, rest, loss): MSE of the hidden states, plain SGD."""
    from flax import nnx

    def train_step(params: Any, rest: Any, ids: Any, target: Any) -> tuple[Any, Any, Any]:
        model = nnx.merge(gdef, params, rest)
        loss = _nnx_train_step(model, ids, target)
        _, params, rest = nnx.split(model, nnx.Param, ...)  # updated weights and dropout counters
        return params, rest, loss

    return train_step


class FlaxSide:
    """The Flax encoder and its jitted forward / train step (`--flax-jit split` or `nnx`)."""

    def __init__(
        self,
        config: TransformerConfig,
        flax_config: FlaxConfig,
        args: argparse.Namespace,
        device: Any,
        mesh: Any = None,
    ):
        import jax
        from flax import nnx

        from flax_impl.distributed import create_sharded_model
        from flax_impl.encoder import TransformerEncoder

        self.jax, self.nnx, self.device, self.flax_jit, self.mesh = jax, nnx, device, args.flax_jit, mesh
        rngs = nnx.Rngs(params=args.seed, dropout=jax.random.key(args.seed, impl=args.rng_impl))
        if mesh is None:
            self.model = TransformerEncoder(config, flax_config=flax_config, rngs=rngs)
        else:  # every parameter on its partition spec, initialised shard by shard
            self.model = create_sharded_model(config, mesh, flax_config=flax_config, rngs=rngs)
        self._fns: dict[str, Callable] = {}

    def runner(self, mode: str, ids: np.ndarray, target: np.ndarray) -> Callable[[], None]:
        step = self._runner(mode, ids, target)
        if self.mesh is None:
            return step
        mesh = self.mesh

        def on_mesh() -> None:  # the mesh is set while tracing, so activation constraints apply
            with self.jax.set_mesh(mesh):
                step()

        return on_mesh

    def _runner(self, mode: str, ids: np.ndarray, target: np.ndarray) -> Callable[[], None]:
        jax, nnx = self.jax, self.nnx
        if self.mesh is None:
            ids_j = jax.device_put(ids, self.device)
            target_j = jax.device_put(target, self.device)
        else:
            from flax_impl.distributed import shard_batch

            ids_j, target_j = shard_batch(ids, self.mesh), shard_batch(target, self.mesh)
        if mode == "forward":
            self.model.eval()
            if self.flax_jit == "nnx":
                fn = self._fns.setdefault("nnx_forward", nnx.jit(lambda m, x: m(x)))
                return lambda: fn(self.model, ids_j).block_until_ready()
            gdef, state = nnx.split(self.model)
            fn = self._fns.setdefault("forward", jax.jit(_flax_forward_fn(gdef)))
            return lambda: fn(state, ids_j).block_until_ready()
        self.model.train()
        if self.flax_jit == "nnx":
            fn = self._fns.setdefault("nnx_train", nnx.jit(_nnx_train_step))
            return lambda: fn(self.model, ids_j, target_j).block_until_ready()
        gdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        holder = [jax.tree.map(lambda a: a.copy(), params), jax.tree.map(lambda a: a.copy(), rest)]  # donated
        fn = self._fns.setdefault("train", jax.jit(_flax_train_fn(gdef), donate_argnums=(0, 1)))

        def step() -> None:
            holder[0], holder[1], loss = fn(holder[0], holder[1], ids_j, target_j)
            loss.block_until_ready()

        return step


def _nnx_train_step(model: Any, ids: Any, target: Any) -> Any:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(model: Any) -> Any:
        return jnp.mean(jnp.square(model(ids).astype(jnp.float32) - target))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - jnp.asarray(LR, p.dtype) * g.astype(p.dtype), params, grads))
    return loss


def flax_compile_seconds(
    config: TransformerConfig, flax_config: FlaxConfig, n_layers: int, mode: str, batch: int, length: int, rng_impl: str
) -> float:
    """Trace + lower + compile time of the Flax forward or train step for a scanned encoder of `n_layers`
    (abstract weights from nnx.eval_shape: nothing is allocated or run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl.encoder import TransformerEncoder

    cfg = config.replace(n_layers=n_layers)
    fcfg = flax_config.replace(scan_layers=True, scan_unroll=1)
    model = nnx.eval_shape(
        lambda: TransformerEncoder(
            cfg, flax_config=fcfg, rngs=nnx.Rngs(params=0, dropout=jax.random.key(0, impl=rng_impl))
        )
    )
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    start = time.perf_counter()
    if mode == "forward":
        model.eval()
        gdef, state = nnx.split(model)
        jax.jit(_flax_forward_fn(gdef)).lower(state, ids).compile()
    else:
        model.train()
        gdef, params, rest = nnx.split(model, nnx.Param, ...)
        target = jax.ShapeDtypeStruct((batch, length, cfg.d_model), jnp.float32)
        jax.jit(_flax_train_fn(gdef), donate_argnums=(0, 1)).lower(params, rest, ids, target).compile()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- torch side
class TorchSide:
    """torch_ref's encoder with the Flax weights copied in; eager and (optionally) torch.compile runners."""

    def __init__(self, config: TransformerConfig, flax_model: Any, args: argparse.Namespace, device: str):
        import contextlib

        import torch

        import torch_ref

        self.torch, self.device = torch, device
        torch.manual_seed(args.seed)
        self.model = torch_ref.TransformerEncoder(config)
        if flax_model is not None:  # same weights as the Flax side
            from flax_impl.interop import to_numpy_state_dict

            self.model.load_state_dict(torch_ref.from_numpy_state_dict(to_numpy_state_dict(flax_model)))
        self.model.to(device)
        self.compiled = torch.compile(self.model) if args.torch_compile else None
        bf16 = args.precision == "bf16"
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        self.autocast = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def runner(self, mode: str, ids: np.ndarray, target: np.ndarray, compiled: bool = False) -> Callable[[], None]:
        torch = self.torch
        model = self.compiled if compiled else self.model
        ids_t = torch.from_numpy(ids).to(self.device)
        target_t = torch.from_numpy(target).to(self.device)
        if mode == "forward":
            self.model.eval()

            def forward() -> None:
                with torch.inference_mode(), self.autocast():
                    model(ids_t)
                self.sync()

            return forward
        self.model.train()
        opt = torch.optim.SGD(self.model.parameters(), lr=LR)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                h = model(ids_t)  # (B, L, D)
            loss = (h.float() - target_t).square().mean()
            loss.backward()
            opt.step()
            self.sync()

        return train_step


# ----------------------------------------------------------------------------------------------- measuring
def measure_interleaved(
    runners: dict[str, Callable[[], None]], warmup: int, repeats: int, progress: Progress, label: str
) -> dict[str, dict[str, Any]]:
    """First call of each runner (compile), one memory-probed call each, `warmup - 1` more, then `repeats`
    rounds of one timed call per runner in turn (A B A B ...)."""
    out: dict[str, dict[str, Any]] = {name: {"times": []} for name in runners}
    for name, fn in runners.items():
        progress.step(f"{label}: {name} first call (compile)", 0)
        start = time.perf_counter()
        fn()
        out[name]["first"] = time.perf_counter() - start
        progress.step(f"{label}: {name} first call (compile)")
    for name, fn in runners.items():
        reset = _rss_reset()
        before = _rss_mb("VmRSS")
        fn()
        peak = _rss_mb("VmHWM")
        out[name]["peak_rss_mb"] = peak if reset else None
        out[name]["rss_step_mb"] = (peak - before) if reset and peak is not None and before is not None else None
    for _ in range(max(warmup - 1, 0)):
        for fn in runners.values():
            fn()
    for r in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            out[name]["times"].append(time.perf_counter() - start)
            progress.step(f"{label}: {name} {r + 1}/{repeats}")
    return out


def matmul_peak(
    shapes: list[tuple[int, int, int]], dtype: str, jax_device: Any, torch_device: str | None, repeats: int = 8
) -> dict[str, float]:
    """Best FLOP/s of (m, k) @ (k, n) matmuls over `shapes` and `repeats` consecutive calls of each, in the
    compute dtype, per framework (2 m k n FLOPs each)."""
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


# ----------------------------------------------------------------------------------------------- the command
def _build_config(args: argparse.Namespace, max_length: int) -> tuple[TransformerConfig, FlaxConfig]:
    fields: dict[str, Any] = {}
    flax_fields: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            fields = json.load(f)
        if not isinstance(fields, dict):
            raise ValueError(f"--config {args.config} must hold a JSON object of TransformerConfig fields")
    fields.setdefault("vocab_size", args.vocab)
    if args.layers is not None:
        fields["n_layers"] = args.layers
    if args.d_model is not None:
        fields["d_model"], fields["d_ff"] = args.d_model, 4 * args.d_model
    if args.heads is not None:
        fields["n_heads"] = args.heads
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


def _build_mesh(args: argparse.Namespace, config: TransformerConfig, shapes: list[tuple[int, int]]) -> Any:
    """The --mesh Mesh; sizes, shardable shapes and batch sizes are checked before any measurement."""
    from flax_impl.distributed import check_shardable, make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh))
    check_shardable(config, mesh)
    bad = [B for B, _ in shapes if B % mesh.shape["data"]]
    if bad:
        n = mesh.shape["data"]
        raise ValueError(f"--mesh {args.mesh}: batch sizes {bad} are not divisible by the data axis size {n}")
    return mesh


def _jax_backend() -> str:
    import jax

    return jax.default_backend()


def _choose_devices(args: argparse.Namespace, frameworks: list[str]) -> tuple[str, Any, str | None]:
    import jax

    platform_name = jax.default_backend() if args.device == "auto" else args.device
    try:
        jax_device = jax.devices(platform_name)[0]
    except RuntimeError as err:
        raise ValueError(f"--device {args.device}: JAX has no {platform_name} backend here ({err})") from err
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


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table; write --json / --plot. Returns the exit status."""
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or set(modes) - {"forward", "train"}:
            raise ValueError(f"--modes {args.modes!r}: choose from forward, train")
        on_tpu = args.device == "tpu" or (args.device == "auto" and _jax_backend() == "tpu")
        default_fw = "flax" if on_tpu else "flax,torch"
        frameworks = [f.strip() for f in (args.frameworks or default_fw).split(",") if f.strip()]
        if not frameworks or set(frameworks) - {"flax", "torch"}:
            raise ValueError(f"--frameworks {args.frameworks!r}: choose from flax, torch")
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
        config, flax_config = _build_config(args, max(L for _, L in shapes))
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ValueError("--plot needs matplotlib: pip install matplotlib") from err
        platform_name, jax_device, torch_device = _choose_devices(args, frameworks)
        mesh = _build_mesh(args, config, shapes) if args.mesh else None
        if args.rng_impl is None:
            args.rng_impl = "threefry2x32" if mesh is not None else "philox4x32"
    except (ValueError, OSError) as err:
        print(f"flax-impl bench: error: {err}", file=sys.stderr)
        return 2

    import jax

    wall = time.perf_counter()
    with jax.default_device(jax_device):
        result = _run_measurements(
            args,
            config,
            flax_config,
            shapes,
            modes,
            frameworks,
            repeats,
            compile_layers,
            platform_name,
            jax_device,
            torch_device,
            mesh,
        )
    result["wall_s"] = time.perf_counter() - wall
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_measurements(
    args: argparse.Namespace,
    config: TransformerConfig,
    flax_config: FlaxConfig,
    shapes: list[tuple[int, int]],
    modes: list[str],
    frameworks: list[str],
    repeats: int,
    compile_layers: list[int],
    platform_name: str,
    jax_device: Any,
    torch_device: str | None,
    mesh: Any = None,
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    names = [n for n in ("flax", "torch") if n in frameworks] + (["torch.compile"] if args.torch_compile else [])
    calls = len(shapes) * len(modes) * len(names) * (repeats + 1) + 4 + 3 * len(compile_layers) * len(modes)
    progress = Progress(calls)
    progress.step("matmul peak", 0)
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    n, tokens = args.matmul_size, max(B * L for B, L in shapes)
    mm_shapes = [(n, n, n), (tokens, config.d_model, config.d_ff)]  # square, and the encoder's widest matmul
    mm_jax = jax_device if "flax" in frameworks else None
    peaks = matmul_peak(mm_shapes, dtype, mm_jax, torch_device)
    progress.step("building models", 2)
    flax_side = FlaxSide(config, flax_config, args, jax_device, mesh) if "flax" in frameworks else None
    torch_side = TorchSide(config, flax_side.model if flax_side else None, args, torch_device) if torch_device else None
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
            raw = measure_interleaved(runners, args.warmup, repeats, progress, f"{mode} B={B} L={L}")
            flops = encoder_flops(config, B, L, mode)
            for name, m in raw.items():
                tps, step = _stats(m["times"], B * L)
                records.append(
                    Record(
                        framework=name,
                        mode=mode,
                        batch=B,
                        length=L,
                        position=config.position,
                        precision=args.precision,
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
            eager = next((r for r in records[-len(raw) :] if r.framework == "torch"), None)
            for r in records[-len(raw) :]:
                if eager is not None and r is not eager:
                    r.speedup_vs_torch_eager = r.tokens_per_s["median"] / eager.tokens_per_s["median"]
    scaling = []
    if flax_side and compile_layers:
        B, L = shapes[0]
        for mode in modes:
            best = {n: math.inf for n in compile_layers}
            for _ in range(2 if args.quick else 3):  # best of rounds: the first pays one-off tracing caches
                for n in compile_layers:
                    progress.step(f"compile time: {mode}, {n} scanned layers", 0)
                    best[n] = min(best[n], flax_compile_seconds(config, flax_config, n, mode, B, L, args.rng_impl))
                    progress.step(f"compile time: {mode}, {n} scanned layers")
            scaling.append(
                {"mode": mode, "batch": B, "length": L, "compile_s": {str(n): best[n] for n in compile_layers}}
            )
    progress.step("matmul peak (again)", 0)
    for name, flops_per_s in matmul_peak(mm_shapes, dtype, mm_jax, torch_device).items():  # best of start and end
        peaks[name] = max(peaks[name], flops_per_s)
    peak = max(peaks.values())
    for r in records:
        r.peak_fraction = r.achieved_flops / peak
    progress.step("done", 2)
    progress.close()
    import flax

    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
    }
    torch_threads = None
    if torch_side:
        versions["torch"] = torch_side.torch.__version__
        torch_threads = torch_side.torch.get_num_threads()
    device_name = jax_device.device_kind if platform_name != "cpu" else _cpu_name()
    return {
        "device": platform_name,
        "device_name": device_name,
        "torch_device": torch_device,
        "cores": os.cpu_count(),
        "torch_threads": torch_threads,
        "versions": versions,
        "matmul_peak_flops": peak,
        "matmul_peak": peaks,
        "matmul_shapes": mm_shapes,
        "matmul_dtype": dtype,
        "flop_formula": FLOP_FORMULA,
        "memory": "peak_rss_mb: process VmHWM during one steady step (reset before)",
        "config": config.to_dict(),
        "flax_config": flax_config.to_dict(),
        "precision": args.precision,
        "position": config.position,
        "flax_jit": args.flax_jit,
        "rng_impl": args.rng_impl,
        "warmup": args.warmup,
        "repeats": repeats,
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "jax_device_count": jax.device_count(),
        "jnp_default_int": str(jnp.asarray(0).dtype),
        "results": [asdict(r) for r in records],
        "compile_scaling": scaling,
    }


def _layers_text(cfg: dict[str, Any], flax_cfg: dict[str, Any]) -> str:
    if not flax_cfg["scan_layers"]:
        return "unrolled layers"
    unroll = min(flax_cfg.get("scan_unroll", 1), cfg["n_layers"])
    return "scanned layers" if unroll == 1 else f"scanned layers, {unroll} per loop iteration"


def format_table(result: dict[str, Any]) -> str:
    """The terminal report: one row per measurement, then the compile-time scaling."""
    cfg = result["config"]
    lines = [
        f"device: {result['device']} ({result['device_name']}, {result['cores']} cores)  "
        f"matmul peak {result['matmul_peak_flops'] / 1e9:.1f} GFLOP/s ({result['matmul_dtype']}, "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in result["matmul_peak"].items())
        + ")",
        f"encoder: {cfg['n_layers']} x {cfg['d_model']} (N={cfg['n_heads']}, F={cfg['d_ff']}, V={cfg['vocab_size']}, "
        f"{_layers_text(cfg, result['flax_config'])}), "
        f"position={result['position']}, precision={result['precision']}, dropout(train)={cfg['dropout']}, "
        f"repeats={result['repeats']}",
        "",
        f"{'framework':<14}{'mode':<8}{'B':>4}{'L':>6}{'tok/s med':>11}{'(min - max)':>18}{'ms/step':>9}"
        f"{'compile s':>10}{'GFLOP/s':>9}{'% peak':>8}{'RSS MB':>8}{'vs torch':>9}",
    ]
    if result.get("mesh"):
        lines.insert(2, f"flax sharded on mesh {result['mesh']} over {result['jax_device_count']} devices")
    for r in result["results"]:
        t = r["tokens_per_s"]
        vs = f"{r['speedup_vs_torch_eager']:.2f}x" if r["speedup_vs_torch_eager"] is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        lines.append(
            f"{r['framework']:<14}{r['mode']:<8}{r['batch']:>4}{r['length']:>6}{t['median']:>11.0f}"
            f"{'(' + format(t['min'], '.0f') + ' - ' + format(t['max'], '.0f') + ')':>18}"
            f"{1e3 * r['step_s']['median']:>9.1f}{r['compile_s']:>10.2f}{r['achieved_flops'] / 1e9:>9.1f}"
            f"{100 * r['peak_fraction']:>7.1f}%{rss:>8}{vs:>9}"
        )
    for s in result["compile_scaling"]:
        items = ", ".join(f"{n} layers {t:.2f} s" for n, t in s["compile_s"].items())
        lines.append(f"flax compile ({s['mode']}, B={s['batch']} L={s['length']}, scanned): {items}")
    lines.append(f"FLOPs: {result['flop_formula']}; wall {result.get('wall_s', 0):.0f} s")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: str) -> None:
    """PNG: tokens/s (median, min-max bars) against length, one line per framework and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, mode in zip(axes[0], ("forward", "train"), strict=True):
        for fw in dict.fromkeys(r["framework"] for r in result["results"]):
            rows = sorted(
                (r for r in result["results"] if r["framework"] == fw and r["mode"] == mode), key=lambda r: r["length"]
            )
            if not rows:
                continue
            x = [r["length"] for r in rows]
            y = [r["tokens_per_s"]["median"] for r in rows]
            err = [
                [a - r["tokens_per_s"]["min"] for a, r in zip(y, rows, strict=True)],
                [r["tokens_per_s"]["max"] - a for a, r in zip(y, rows, strict=True)],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{fw} {mode}")
            for r in rows:
                ax.annotate(
                    f"B={r['batch']}",
                    (r["length"], r["tokens_per_s"]["median"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(4, 4),
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{mode} ({result['precision']}, {result['device_name']})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
