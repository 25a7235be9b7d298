"""The options of `flax-impl bench` and their checks: `make_plan` validates every option, builds the configs and
picks the devices and the PyTorch peers, before any model is built or anything is measured (bad input: ValueError
naming the option; `flax-impl bench` exits 2)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from flax_impl.apps import args as shared, bench_device
from flax_impl.config import FlaxConfig, TransformerConfig

QUICK_SHAPES = ((8, 128), (4, 512))
DEFAULT_SHAPES = ((8, 64), (8, 128), (8, 256), (4, 512))
RNG_IMPLS = ("philox4x32", "threefry4x32", "philox2x32", "rbg", "unsafe_rbg", "threefry2x32")


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
    a("--quick", action="store_true", help="shapes 8x128,4x512, 5 pairs, compile times of 1 and 24 layers")
    a("--shapes", help="comma-separated BxL list [8x64,8x128,8x256,4x512]")
    a("--modes", default="forward,train", help="forward, train or both [both]")
    a("--repeats", type=int, help="timed rounds (A/B pairs) per shape and mode [10; --quick 5]")
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
    a("--peers", help="the PyTorch peers (same weights): torch_ref (our twin, eager), torch.nn "
      "(nn.TransformerEncoderLayer, its fused inference fast path), torch_ref+sdpa (the twin with "
      "F.scaled_dot_product_attention) [all three; torch.nn only where it can hold the architecture]")
    a("--torch-compile", action="store_true", help="also measure torch.compile of torch_ref (slow to compile)")
    a("--omp-wait-policy", choices=bench_device.OMP_POLICIES, default="passive",
      help="torch's OpenMP wait policy, set before torch loads; an exported OMP_WAIT_POLICY wins "
      "(docs/benchmarks.md#isolation) [passive]")
    a("--matmul-precision", choices=bench_device.MATMUL_PRECISIONS, default="float32",
      help="float32 matmul precision, pinned on both sides (tensorfloat32: tf32 on GPU) [float32]")
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
    peers: list[str]
    peer_notes: list[str]
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
    if args.peers and "torch" not in frameworks:
        raise ValueError("--peers needs torch in --frameworks")
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 10)
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
    peers, peer_notes = _choose_peers(args, frameworks, config)
    platform_name, jax_device, torch_device = _choose_devices(args.device, frameworks)
    mesh = shared.build_mesh(args.mesh, config, [B for B, _ in shapes]) if args.mesh else None
    if args.rng_impl is None:
        args.rng_impl = "threefry2x32" if mesh is not None else "philox4x32"
    return Plan(shapes, modes, frameworks, peers, peer_notes, repeats, compile_layers, config, flax_config,
                platform_name, jax_device, torch_device, mesh)


def _choose_peers(args: argparse.Namespace, frameworks: list[str], config: TransformerConfig) -> tuple[list, list]:
    """(peers to run, notes on default peers left out). An explicitly requested peer that cannot hold the
    architecture is a ValueError; a default one is left out with a note."""
    if "torch" not in frameworks:
        return [], []
    from flax_impl.apps.bench_peers import torch_nn_unsupported
    from flax_impl.apps.bench_results import EAGER_PEERS

    notes = []
    if args.peers:
        peers = _choices("--peers", args.peers, EAGER_PEERS)
        why = torch_nn_unsupported(config) if "torch.nn" in peers else None
        if why:
            raise ValueError(f"--peers torch.nn: nn.TransformerEncoderLayer cannot hold this encoder ({why})")
    else:
        peers = list(EAGER_PEERS)
        why = torch_nn_unsupported(config)
        if why:
            peers.remove("torch.nn")
            notes.append(f"torch.nn left out: nn.TransformerEncoderLayer cannot hold this encoder ({why})")
    if config.sliding_window is not None and "torch_ref+sdpa" in peers:
        if args.peers:
            raise ValueError("--peers torch_ref+sdpa: sliding_window is not supported")
        peers.remove("torch_ref+sdpa")
        notes.append("torch_ref+sdpa left out: sliding_window")
    return peers + (["torch.compile"] if args.torch_compile else []), notes


def _jax_backend() -> str:
    import jax

    return jax.default_backend()
