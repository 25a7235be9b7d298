"""`flax-impl parity --hf PATH`: where the Flax model and transformers' model part ways, layer by layer.

Both load the same local Hugging Face folder (or the Flax side another one, `--flax`, e.g. the user's own port),
run the same right-padded batch (rows starting with the config's bos_token_id) in eval mode with matmul precision
"highest", and the table gives, per layer, the worst real position's difference relative to that position's
largest |activation| (`row_error`, budget `HF_FORWARD_REL`) and the gradients of a scalar loss with respect to the
layer's parameters relative to the layer's largest gradient entry (`group_error`, budget `GRAD_REL`). The logits
are also compared as next-token distributions (KL divergence, top-1 agreement), and a causal model's cached
decoding (`flax_impl.generate`) against transformers' uncached forward. A layer past its budget goes to a float64
referee (transformers in float64): it passes if ours is as close to the exact result as transformers' own float32
(`REFEREE_FACTOR`); `--reference float64` lets the referee judge every layer. `--dtype bfloat16` compares each
side's bf16 run with its own float32 run. Exit status: 0 every verdict holds, 1 one does not, 2 misuse or an
unreadable folder (before any heavy work), 130 interrupted. Tolerances and their reasons: docs/parity.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from flax_impl.apps import parity_hf_checks as checks, parity_hf_report as report_, parity_hf_sides as sides_
from flax_impl.apps.progress import Progress

MODEL_OPTIONS = ("--d-model", "--n-heads", "--heads", "--n-layers", "--layers", "--d-ff", "--table-length")
HF_ONLY_OPTIONS = ("--reference", "--dtype", "--decode")
DECODE_STEPS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that go with --hf (added to `flax-impl parity`)."""
    parser.add_argument(
        "--reference", choices=("transformers", "float64"), default="transformers",
        help="with --hf: 'transformers': its float32 run and the per-layer budgets judge, a float64 referee the "
        "layers past them; 'float64': the referee judges every layer [transformers]",
    )  # fmt: skip
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32",
        help="with --hf: also compare each side's bfloat16 run with its own float32 run [float32]",
    )  # fmt: skip
    parser.add_argument(
        "--decode", type=int, default=DECODE_STEPS, metavar="N",
        help="with --hf, causal models: N cached greedy steps (flax_impl.generate) against transformers' full "
        f"forward, 0 = off [{DECODE_STEPS}]",
    )  # fmt: skip


def check_paths(hf_path: str, flax_path: str | None) -> None:
    """Misuse fails before any work: ValueError naming the path and what is missing."""
    for name, path in (("--hf", hf_path), ("--flax", flax_path)):
        if path is None:
            continue
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError(f"{name} {path}: no config.json (a Hugging Face model folder is expected)")
        elif not (name == "--flax" and path.endswith(".safetensors") and os.path.isfile(path)):
            raise ValueError(f"{name} {path}: not a Hugging Face model folder" + (
                " or a .safetensors file of flax_impl.save" if name == "--flax" else ""
            ))


def check_options(args: argparse.Namespace) -> None:
    """Every option of `flax-impl parity --hf`, before any work: the paths (`check_paths`), --batch >= 1,
    --length >= 2 (the padded row keeps a real token: nothing compared is no comparison), --decode >= 0, --seed,
    --json; the architecture options (the folder's config.json defines the model) refused when given.

    Raises:
        ValueError: naming the option, the bad value and what is allowed.
    """
    from flax_impl.apps import args as shared

    check_paths(args.hf, args.flax)
    given = [a.split("=")[0] for a in getattr(args, "argv", []) if a.split("=")[0] in MODEL_OPTIONS]
    if given:
        raise ValueError(f"{given[0]} does not apply with --hf: the folder's config.json defines the model")
    shared.check_at_least(args, ("batch",))
    shared.check_at_least(args, ("length",), minimum=2)
    shared.check_at_least(args, ("decode",), minimum=0)
    shared.check_seed(args)
    shared.check_output_paths(args)


@dataclass
class Loaded:
    """Both sides of one folder: our config and model, transformers' float32 model, model_type, bos_token_id, and
    transformers' runs by (dtype, batch, length, seed), kept for the next comparison (of another Flax model, say:
    `dataclasses.replace(loaded, model=...)` shares them)."""

    cfg: Any
    model: Any
    ref: Any
    model_type: str
    bos: int | None
    runs: dict = field(default_factory=dict)

    def theirs(self, hf_path: str, dtype: str, batch: sides_.Batch, key: tuple, grads: bool = True) -> sides_.Side:
        """transformers' run of `batch` in `dtype` (float32: the loaded model; else loaded now), memoised."""
        if (dtype, *key) not in self.runs:
            ref = self.ref if dtype == "float32" else sides_.load_theirs(hf_path, self.cfg.causal, dtype)
            self.runs[(dtype, *key)] = sides_.run_theirs(ref, batch, self.cfg.n_layers, grads=grads)
        return self.runs[(dtype, *key)]


def load_sides(
    hf_path: str, flax_path: str | None = None, progress: Progress | None = None, *, decode: int = 0
) -> Loaded:
    """Both models, every file read and checked (the config and the weight files' headers before any weight).

    Raises:
        ValueError, OSError: a folder or file that cannot be compared (a truncated or corrupt weight file, an
            unsupported model_type or option, a missing or misshaped key, a --flax of another architecture or
            config; `decode` steps that leave no room for a prompt in the model's max_len), before any comparison.
    """
    import flax_impl as fi
    from flax_impl import hf

    step = progress.step if progress is not None else (lambda *a, **k: None)
    step("checking the config and the weight files")
    hf_config = hf.io.read_config(hf_path)
    cfg = hf.convert.config_from_hf(hf_config)[1]  # an unsupported family or option, before any weight is opened
    if cfg.causal and decode >= cfg.max_len:
        raise ValueError(f"--decode={decode} leaves no room for a prompt: the model holds {cfg.max_len} positions")
    sides_.check_weight_files([p for p in (hf_path, flax_path) if p is not None])
    step("loading the Flax model")
    folder = flax_path if flax_path is not None and os.path.isdir(flax_path) else hf_path
    ours, model = hf.from_pretrained(folder)
    if ours != cfg:
        raise ValueError(f"--flax {flax_path} has another architecture than --hf {hf_path}")
    if flax_path is not None and not os.path.isdir(flax_path):
        fi.load(model, flax_path)
    step("loading transformers' model")
    ref = sides_.load_theirs(hf_path, cfg.causal)
    bos = hf_config.get("bos_token_id")
    return Loaded(cfg, model, ref, hf_config["model_type"], bos if isinstance(bos, int) else None)


def compare(
    hf_path: str,
    flax_path: str | None = None,
    *,
    batch: int = 2,
    length: int = 16,
    seed: int = 0,
    decode: int = 0,
    reference: str = "transformers",
    dtype: str = "float32",
    sides: Loaded | None = None,
    progress: Progress | None = None,
) -> checks.Report:
    """Compare the Flax model with transformers' on one folder (see the module docstring); the library form of
    `flax-impl parity --hf`.

    Args:
        hf_path: the reference Hugging Face folder, run by transformers.
        flax_path: what the Flax side loads: another Hugging Face folder, a `flax_impl.save` .safetensors file
            (weights for the architecture of `hf_path`), or None (the same folder).
        batch: B of the random batch; its last row is right-padded by a quarter of `length`.
        length: L >= 2.
        seed: the batch's and the loss weights' seed.
        decode: causal models: cached greedy steps compared with transformers' full forward (0 = none).
        reference: "transformers": the float32 budget of `flax_impl.tolerances` decides, and for layers past it
            the float64 referee (run only then); "float64": the referee decides every layer.
        dtype: "float32", or "bfloat16" to also compare each side's bf16 output with its float32 one.
        sides: `load_sides(hf_path, flax_path)` when already loaded.
        progress: where to report each phase (None: nowhere).
    Returns:
        A Report (`parity_hf_checks.Report`): its `ok` is the verdict.
    Raises:
        ValueError: length < 2, decode < 0, an unknown reference or dtype.
    """
    import jax

    if length < 2:
        raise ValueError(f"length={length} must be >= 2: the padded row keeps at least one real token")
    if decode < 0 or reference not in ("transformers", "float64") or dtype not in ("float32", "bfloat16"):
        raise ValueError(f"decode={decode} must be >= 0, reference={reference!r} 'transformers' or 'float64', "
                         f"dtype={dtype!r} 'float32' or 'bfloat16'")  # fmt: skip
    jax.config.update("jax_default_matmul_precision", "highest")
    step = progress.step if progress is not None else (lambda *a, **k: None)
    s = sides if sides is not None else load_sides(hf_path, flax_path, progress, decode=decode)
    cfg = s.cfg
    width = cfg.vocab_size if cfg.causal else cfg.d_model
    b = sides_.make_batch(cfg, s.bos, batch, length, seed, width)
    step("running the Flax model (forward and gradients)")
    ours = sides_.run_ours(s.model, s.model_type, b)
    step("running transformers (float32, forward and gradients)")
    key = (batch, length, seed)
    theirs = s.theirs(hf_path, "float32", b, key)
    rows = checks.layer_rows(ours, theirs, b.real)
    report = checks.Report(rows, shape=dict(batch=batch, length=length), reference=reference)
    if cfg.causal:
        report.logits = checks.distributions(ours.out[b.real], theirs.out[b.real])
    if cfg.causal and decode:
        step(f"decoding {decode} steps (Flax generate vs transformers' full forward)")
        report.decode = checks.decode_row(sides_.decode(s.model, s.ref, b, decode))
    if reference == "float64" or not all(r.ok for r in report.rows):
        step("loading and running transformers in float64 (the referee)")
        exact = s.theirs(hf_path, "float64", b, key)
        report.referee = checks.referee_rows(ours, theirs, exact, b.real)
    if dtype == "bfloat16":
        report.bf16 = _bf16(hf_path, flax_path, s, b, key, ours, theirs, step)
    step("done", n=progress.total if progress is not None else 1)
    return report


def _bf16(
    hf_path: str, flax_path: str | None, s: Loaded, b: Any, key: tuple, ours: Any, theirs: Any, step: Any
) -> tuple:
    """(ours, transformers') `Deviation` of the bf16 output from the same side's float32 output."""
    import flax_impl as fi
    from flax_impl import hf

    step("loading and running both sides in bfloat16")
    flax_config = fi.FlaxConfig(dtype="bfloat16", param_dtype="bfloat16")  # transformers' bf16: both in bf16
    folder = flax_path if flax_path is not None and os.path.isdir(flax_path) else hf_path
    _, low = hf.from_pretrained(folder, flax_config=flax_config)
    if flax_path is not None and not os.path.isdir(flax_path):
        fi.load(low, flax_path)
    ours16 = sides_.run_ours(low, s.model_type, b, grads=False)
    theirs16 = s.theirs(hf_path, "bfloat16", b, key, grads=False)
    real, logits = b.real, s.cfg.causal
    return (
        checks.deviation(ours16.out[real], ours.out[real], logits),
        checks.deviation(theirs16.out[real], theirs.out[real], logits),
    )


def run(args: argparse.Namespace) -> int:
    """`flax-impl parity --hf`: 0 when every verdict holds, 1 otherwise, 2 for misuse or an unreadable folder,
    130 when interrupted (one summary line on stderr)."""
    from flax_impl.apps import args as shared

    try:
        check_options(args)
    except ValueError as e:
        return shared.fail("parity", e)
    if importlib.util.find_spec("transformers") is None:  # the reference; a test dependency, not a core one
        return shared.fail("parity", "--hf needs transformers (pip install 'transformers>=5,<6')")
    start = time.perf_counter()
    phases = 7 + (args.dtype == "bfloat16") + (args.decode > 0)  # the referee's phase may not run
    progress = Progress(phases)
    try:
        progress.step("importing jax, torch and transformers", 0)
        import transformers  # noqa: F401

        import flax_impl.hf  # noqa: F401

        try:
            s = load_sides(args.hf, args.flax, progress, decode=args.decode)
        except (ValueError, OSError) as e:
            progress.close()
            return shared.fail("parity", e)
        report = compare(
            args.hf, args.flax, batch=args.batch, length=args.length, seed=args.seed, decode=args.decode,
            reference=args.reference, dtype=args.dtype, sides=s, progress=progress,
        )  # fmt: skip
    except KeyboardInterrupt:
        progress.close()
        print(f"flax-impl parity: interrupted while {progress.phase or 'starting'}, after "
              f"{time.perf_counter() - start:.0f} s: nothing was judged", file=sys.stderr)  # fmt: skip
        return 130
    progress.close()
    progress.write(report_.format_rows(report))
    if report.bf16 is not None:
        progress.write(report_.format_bf16(*report.bf16))
    progress.write(report_.summary(report, s.cfg, s.model_type, time.perf_counter() - start))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report_.to_json(report), f, indent=2)
    return 0 if report.ok else 1
