"""`flax-impl parity`: max abs difference Flax vs torch_ref for every module and position scheme.

Each row builds both twins, copies the Flax weights into torch (`to_numpy_state_dict`, then
`torch_ref.from_numpy_state_dict`), runs the same unit-scale input through both in fp32 eval mode and reports
max |flax - torch| next to its tolerance from `flax_impl.tolerances`. Exit status 1 if any row exceeds its
tolerance (a row that compared nothing, empty or NaN, fails too); 2 for misuse, every option and path checked
before any work. `--hf FOLDER` compares with transformers instead, layer by layer (`flax_impl.apps.parity_hf`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flax_impl import tolerances
from flax_impl.apps import args as shared
from flax_impl.apps.progress import Progress
from flax_impl.config import POSITIONS, FlaxConfig, TransformerConfig


@dataclass
class Row:
    """One comparison: `module` under `case`, its max |flax - torch| and the tolerance it must stay within."""

    module: str
    case: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `flax-impl parity` options; the model sizes default to the lesson's 6 x 512 encoder."""
    shared.add_model_options(parser, d_model=512, n_heads=8, n_layers=6, d_ff=2048)
    parser.add_argument("--batch", type=int, default=2, help="batch size B of the inputs [2]")
    parser.add_argument("--length", type=int, default=64, help="sequence length L of the inputs [64]")
    parser.add_argument("--table-length", type=int, default=4096, help="length of position tables/rotations [4096]")
    shared.add_seed_option(parser, "the Flax weights and the inputs")
    shared.add_json_option(parser, "the rows")
    parser.add_argument(
        "--hf", metavar="FOLDER", help="compare our model with transformers' on this Hugging Face folder, per layer"
    )
    parser.add_argument(
        "--flax", metavar="PATH", help="with --hf: the Flax side's weights (an HF folder or a flax_impl.save file)"
    )
    from flax_impl.apps import parity_hf

    parity_hf.add_arguments(parser)


def _diff(a: object, b: object) -> float:
    """max |a - b|; NaN (a failed row) for a comparison of nothing (empty arrays) or of NaNs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else float("nan")


def build_twins(
    name: str, config: TransformerConfig, seed: int = 0, *, flax_config: FlaxConfig | None = None
) -> tuple[Any, Any]:
    """flax_impl.<name>(config) and torch_ref.<name>(config), the Flax weights copied into torch, both in eval.

    Args:
        name: a module both packages export: "MultiHeadAttention", "TransformerBlock", "TransformerInput",
            "Transformer".
        config: the architecture both twins read.
        seed: the Flax initialisation seed.
        flax_config: the Flax side's execution settings (default FlaxConfig()).
    Returns:
        (flax module, torch module), both in eval mode, with equal weights.
    """
    from flax import nnx

    import flax_impl as fi
    import torch_ref as tr

    flax_module = getattr(fi, name)(config, flax_config=flax_config, rngs=nnx.Rngs(seed))
    torch_module = getattr(tr, name)(config)
    torch_module.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(flax_module)))
    flax_module.eval()
    torch_module.eval()
    return flax_module, torch_module


def _rows(cfg: TransformerConfig, batch: int, length: int, table_len: int, seed: int) -> Iterator[Callable[[], Row]]:
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import flax_impl as fi
    import torch_ref as tr

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, length))
    x = rng.standard_normal((batch, length, cfg.d_model)).astype(np.float32)
    mask = np.ones((batch, length), np.int32)
    mask[-1, length // 2 :] = 0  # one padded sequence

    def twins(name: str, c: TransformerConfig) -> tuple[Any, Any]:
        return build_twins(name, c, seed)

    def dropout_row() -> Row:
        xs = rng.uniform(0.5, 2.0, 100_000).astype(np.float32)
        y = np.asarray(fi.Dropout(0.1, rngs=nnx.Rngs(dropout=seed))(jnp.asarray(xs)))
        kept = y != 0  # masks are random on each side; the kept values must follow torch's arithmetic
        expected = torch.from_numpy(xs[kept]) * (1.0 / (1.0 - 0.1))
        return Row("Dropout", "kept values x/(1-p), p=0.1", _diff(y[kept], expected.numpy()), tolerances.EXACT)

    def embed_row() -> Row:
        f = fi.Embed(cfg.vocab_size, cfg.d_model, padding_idx=0, rngs=nnx.Rngs(seed))
        t = tr.Embed(cfg.vocab_size, cfg.d_model, padding_idx=0)
        t.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(f)))
        return Row(
            "Embed", "padding_idx=0", _diff(f(jnp.asarray(ids)), t(torch.from_numpy(ids)).detach()), tolerances.EXACT
        )

    def table_row() -> Row:
        d = _diff(fi.sinusoidal_table(table_len, cfg.d_model), tr.sinusoidal_table(table_len, cfg.d_model))
        return Row("sinusoidal_table", f"L={table_len}", d, tolerances.ELEMENTWISE)

    def rope_row(style: str) -> Callable[[], Row]:
        def row() -> Row:
            q = rng.standard_normal((1, table_len, 2, cfg.head_dim)).astype(np.float32)
            pos = np.arange(table_len)
            a = fi.apply_rope(jnp.asarray(q), jnp.asarray(pos), style=style)
            b = tr.apply_rope(torch.from_numpy(q), torch.from_numpy(pos), style=style)
            return Row("apply_rope", f"{style}, L={table_len}", _diff(a, b), tolerances.ELEMENTWISE)

        return row

    def alibi_row() -> Row:
        n = 12  # not a power of two: the interesting case
        a = fi.alibi_bias(length, length, fi.alibi_slopes(n), causal=False)
        b = tr.alibi_bias(length, length, tr.alibi_slopes(n), causal=False)
        return Row("alibi_bias", f"12 heads, L={length}", _diff(a, b), tolerances.ELEMENTWISE)

    yield dropout_row
    yield embed_row
    yield table_row
    yield rope_row("half")
    yield rope_row("interleaved")
    yield alibi_row

    for position in POSITIONS:
        c = cfg.replace(position=position, input_norm=True)

        def input_row(c: TransformerConfig = c) -> Row:
            f, t = twins("TransformerInput", c)
            with torch.no_grad():
                d = _diff(f(jnp.asarray(ids)), t(torch.from_numpy(ids)))
            return Row("TransformerInput", f"{c.position}, input_norm", d, tolerances.BLOCK)

        yield input_row

    for name, tol in (("MultiHeadAttention", tolerances.BLOCK), ("TransformerBlock", tolerances.BLOCK)):
        for position in POSITIONS:
            c = cfg.replace(position=position)

            def module_row(name: str = name, c: TransformerConfig = c, tol: float = tol) -> Row:
                f, t = twins(name, c)
                with torch.no_grad():
                    d = _diff(f(jnp.asarray(x), jnp.asarray(mask)), t(torch.from_numpy(x), torch.from_numpy(mask)))
                return Row(name, f"{c.position}, padding mask", d, tol)

            yield module_row

    for position in POSITIONS:
        for causal in (False, True):
            c = cfg.replace(position=position, causal=causal)

            def encoder_row(c: TransformerConfig = c) -> Row:
                f, t = twins("Transformer", c)
                y = nnx.jit(lambda m, i, a: m(i, a))(f, jnp.asarray(ids), jnp.asarray(mask))
                with torch.no_grad():
                    d = _diff(y, t(torch.from_numpy(ids), torch.from_numpy(mask)))
                what = f"{c.n_layers} layers, {c.position}, {'causal' if c.causal else 'padding mask'}"
                return Row("Transformer", what, d, tolerances.ENCODER)

            yield encoder_row


def _config(args: argparse.Namespace) -> TransformerConfig:
    """The fp32, dropout-free architecture of the block and encoder rows; ValueError naming a bad option."""
    shared.check_at_least(args, ("d_model", "n_heads", "d_ff", "n_layers", "batch", "length", "table_length"))
    shared.check_seed(args)
    shared.check_output_paths(args)
    cfg = TransformerConfig(
        vocab_size=1000,
        d_model=args.d_model,
        n_heads=args.n_heads,
        d_ff=args.d_ff,
        n_layers=args.n_layers,
        max_len=args.length,
        dropout=0.0,
    )
    for position in POSITIONS:  # every row's config, so that none fails after the others ran
        for causal in (False, True):
            cfg.replace(position=position, causal=causal, input_norm=True)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run every row; print the table; write --json. Exit status: 0 all within tolerance, 1 some not, 2 bad
    input (or no PyTorch). With --hf: the per-layer comparison with transformers (flax_impl.apps.parity_hf)."""
    if args.hf is not None:
        from flax_impl.apps import parity_hf

        return parity_hf.run(args)
    if args.flax is not None:
        return shared.fail("parity", "--flax goes with --hf")
    from flax_impl.apps.parity_hf import HF_ONLY_OPTIONS

    hf_only = [a.split("=")[0] for a in getattr(args, "argv", []) if a.split("=")[0] in HF_ONLY_OPTIONS]
    if hf_only:
        return shared.fail("parity", f"{hf_only[0]} goes with --hf")
    try:
        import torch  # noqa: F401
    except ImportError:
        return shared.fail("parity", "it needs PyTorch: pip install 'flax-impl[torch]'")
    try:
        cfg = _config(args)
    except (ValueError, OSError) as err:
        return shared.fail("parity", err)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # the CLI's own process: compare fp32 with fp32
    start = time.perf_counter()
    rows = []
    checks = list(_rows(cfg, args.batch, args.length, args.table_length, args.seed))
    progress = Progress(len(checks))
    for i, check in enumerate(checks, 1):
        progress.step("comparing the twins", 0, detail=f"row {i}/{len(checks)}")
        rows.append(check())
        progress.step("comparing the twins", detail=f"row {i}/{len(checks)}")
    progress.close()
    if not rows:
        return shared.fail("parity", "no rows to compare: a comparison of nothing proves nothing")
    width = max(len(r.module) for r in rows), max(len(r.case) for r in rows)
    print(f"{'module':<{width[0]}}  {'case':<{width[1]}}  {'max abs diff':>12}  {'tolerance':>9}  ok")
    for r in rows:
        print(
            f"{r.module:<{width[0]}}  {r.case:<{width[1]}}  {r.max_abs_diff:12.3e}  {r.tolerance:9.1e}  "
            f"{'yes' if r.ok else 'NO'}"
        )
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} within tolerance "
        f"(fp32, D={cfg.d_model}, N={cfg.n_heads}, F={cfg.d_ff}, B={args.batch}, L={args.length}; "
        f"{time.perf_counter() - start:.0f} s)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) | {"ok": r.ok} for r in rows], fh, indent=1)
    return 1 if failed else 0
