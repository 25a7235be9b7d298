"""`flax-impl train`: train a small encoder (masked-token) or causal model (next-token) on the Python standard
library's source, byte-tokenized; held-out evaluation, atomic resumable checkpoints, a loss plot.

Checkpoint layout (OUT/checkpoint/, replaced as a whole, never half-written):
  model.safetensors  parameters with torch_ref key names (flax_impl.save): `torch_ref.TransformerEncoder(cfg)`
                     + `safetensors.torch.load_file` + `load_state_dict` reads it;
  config.json        {"model": TransformerConfig dict, "train": TrainConfig dict, "step": ..., "seed": ...};
  train_state.npz    optimizer state (AdamW moments, counts), dropout rng keys/counts, step, loss history.
Batches depend only on (seed, step), so a resumed run replays the uninterrupted run's batches and masks.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.config import POSITIONS, TrainConfig, TransformerConfig
from flax_impl.tokenizer import PAD_ID, ByteTokenizer

CKPT, OLD = "checkpoint", "checkpoint.old"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of `flax-impl train`."""
    a = p.add_argument
    a("--steps", type=int, default=600, help="total optimizer steps (the schedule's length) [600]")
    a("--batch-size", type=int, default=16, help="sequences per step [16]")
    a("--seq-len", type=int, default=128, help="tokens (bytes) per sequence [128]")
    a("--lr", type=float, default=2e-3, help="peak learning rate [2e-3]")
    a("--warmup", type=int, default=60, help="linear warmup steps, then cosine decay to 0.1 x lr [60]")
    a("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay on Linear kernels [0.01]")
    a("--clip-norm", type=float, default=1.0, help="global gradient-norm clip, 0 = off [1.0]")
    a("--d-model", type=int, default=128, help="model width D [128]")
    a("--n-layers", type=int, default=2, help="blocks [2]")
    a("--n-heads", type=int, default=4, help="attention heads [4]")
    a("--d-ff", type=int, default=None, help="feed-forward width F [4 x d_model]")
    a("--max-len", type=int, default=256, help="longest sequence the model accepts (learned positions) [256]")
    a("--dropout", type=float, default=0.1, help="dropout rate [0.1]")
    a("--position", choices=POSITIONS, default="rope", help="position scheme [rope]")
    a("--causal", action="store_true", help="next-token objective with causal attention (default: masked-token)")
    a("--mask-prob", type=float, default=0.15, help="masked-token objective: fraction of positions predicted [0.15]")
    a("--out", default="flax-impl-train", help="output directory for checkpoint and plot [./flax-impl-train]")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (same model options)")
    a("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step; resume later")
    a("--seed", type=int, default=0, help="seed of the weights, dropout masks, batches and token masks [0]")
    a("--eval-every", type=int, default=100, help="held-out evaluation + checkpoint every N steps [100]")
    a("--eval-batches", type=int, default=8, help="held-out batches per evaluation [8]")
    a("--plot", default=None, help="PNG of train/eval loss [OUT/loss.png]; 'none' to skip")
    a("--corpus", default=None, help="a text file or directory instead of the standard library's source")
    a("--corpus-mb", type=float, default=4.0, help="read at most this many MB of text [4]")
    a("--mesh", default=None, help="data=D,model=M: train sharded on a device mesh (flax_impl.distributed) [off]")


def _fail(msg: str) -> int:
    print(f"flax-impl train: error: {msg}", file=sys.stderr)
    return 2


def _configs(args: argparse.Namespace) -> tuple[TransformerConfig, TrainConfig]:
    """Validate the options (ValueError naming the option) and build the two configs, before any work."""
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "n_layers", "d_model", "n_heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 0 or args.warmup >= args.steps:
        raise ValueError(f"--warmup={args.warmup} must be in [0, --steps={args.steps})")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise ValueError(f"--stop-at={args.stop_at} must be in [1, --steps={args.steps}]")
    if not args.corpus_mb > 0:
        raise ValueError(f"--corpus-mb={args.corpus_mb} must be > 0")
    if args.position == "learned" and args.seq_len > args.max_len:
        raise ValueError(
            f"--seq-len={args.seq_len} is above --max-len={args.max_len}: learned positions have no row past "
            "max_len (raise --max-len or shorten --seq-len)"
        )
    cfg = TransformerConfig(
        vocab_size=ByteTokenizer.vocab_size,
        d_model=args.d_model,
        n_heads=args.n_heads,
        d_ff=args.d_ff or 4 * args.d_model,
        n_layers=args.n_layers,
        dropout=args.dropout,
        max_len=args.max_len,
        position=args.position,
        causal=args.causal,
        padding_idx=PAD_ID,
        embed_scale=True,
    )
    tcfg = TrainConfig(
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        total_steps=args.steps,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm or None,
        mask_prob=args.mask_prob,
    )
    return cfg, tcfg


def checkpoint_dir(out: str | os.PathLike) -> Path | None:
    """OUT/checkpoint, or OUT/checkpoint.old if a save was interrupted mid-swap, or None."""
    for name in (CKPT, OLD):
        if (Path(out) / name / "train_state.npz").is_file():
            return Path(out) / name
    return None


# ------------------------------------------------------------------------------------------- train state (npz)
def _flat(state: Any) -> dict[str, Any]:
    from flax import nnx

    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def _save_state(path: Path, model: Any, optimizer: Any, history: dict[str, list[float]]) -> None:
    import jax
    from flax import nnx

    arrays = {}
    for key, var in _flat(nnx.state(optimizer)).items():
        arrays["opt/" + key] = np.asarray(var[...])
    for key, var in _flat(nnx.state(model, nnx.RngState)).items():
        value = var[...]
        arrays["rng/" + key] = np.asarray(jax.random.key_data(value) if isinstance(var, nnx.RngKey) else value)
    for key, values in history.items():
        arrays["history/" + key] = np.asarray(values, dtype=np.float64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_state(path: Path, model: Any, optimizer: Any) -> dict[str, list[float]]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    with np.load(path) as data:
        saved = {k: data[k] for k in data.files}
    for prefix, obj, filt in (("opt/", optimizer, ...), ("rng/", model, nnx.RngState)):
        state = nnx.state(obj) if filt is ... else nnx.state(obj, filt)
        for key, var in _flat(state).items():
            if prefix + key not in saved:
                raise ValueError(f"{path} has no entry {prefix + key}: it was written by a different model")
            value = saved[prefix + key]
            if isinstance(var, nnx.RngKey):
                var[...] = jax.random.wrap_key_data(value, impl=jax.random.key_impl(var[...]))
            else:
                if value.shape != var[...].shape:
                    raise ValueError(f"{path}: {prefix + key} has shape {value.shape}, the model {var[...].shape}")
                var[...] = jnp.asarray(value, var[...].dtype)
        nnx.update(obj, state)
    return {k[len("history/") :]: saved[k].tolist() for k in saved if k.startswith("history/")}


def save_checkpoint(out: Path, model: Any, optimizer: Any, meta: dict, history: dict[str, list[float]]) -> Path:
    """Write OUT/checkpoint atomically: fill a temporary directory, then swap it in with renames."""
    from flax_impl.interop import save

    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-tmp-"))
    try:
        save(model, tmp / "model.safetensors")
        _save_state(tmp / "train_state.npz", model, optimizer, history)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        final, old = out / CKPT, out / OLD
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------------------------------- display
class Progress:
    """tqdm bar if tqdm is importable (an optional extra), else a carriage-return line on a terminal and a plain
    line per evaluation elsewhere."""

    def __init__(self, total: int, initial: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=None) if tqdm else None
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, tok_s: float) -> None:
        text = f"loss {loss:.4f}  {tok_s:,.0f} tok/s"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.tty:
            print(f"\rstep {step}  {text}", end="", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(("\n" if self.tty else "") + line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            print(file=sys.stderr)


def plot_losses(path: Path, history: dict[str, list[float]], baseline: float, title: str) -> str:
    """Write the PNG; returns a message (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["train_step"], history["train_loss"], lw=0.8, alpha=0.6, label="train (per step)")
    ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out")
    ax.axhline(baseline, color="gray", ls="--", label=f"unigram entropy {baseline:.3f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


# --------------------------------------------------------------------------------------------------------- run
def _scale_embedding(model: Any) -> None:
    """Token embedding N(0, 1/D) instead of nn.Embedding's N(0, 1), with `embed_scale` (x sqrt(D)) at the input:
    unit-scale inputs and, through the tied head, initial logits of std ~1 instead of ~sqrt(D) (Vaswani et al.'s
    shared-embedding convention). The padding row stays zero."""
    w = model.input.embed.weight
    w[...] = w[...] * (model.config.d_model**-0.5)


def run(args: argparse.Namespace) -> int:
    """Exit code: 0 done, 1 stopped on a non-finite loss (last good checkpoint kept), 2 bad input."""
    from flax_impl.apps.corpus import load_corpus

    out = Path(args.out)
    try:
        cfg, tcfg = _configs(args)
        mesh = _mesh(args, cfg)
        ckpt = checkpoint_dir(out)
        if args.resume and ckpt is None:
            raise ValueError(f"--resume: no checkpoint in {str(out)!r}")
        if not args.resume and ckpt is not None:
            raise ValueError(f"{str(ckpt)!r} exists: pass --resume to continue it, or another --out")
        if ckpt is not None:
            saved = json.loads((ckpt / "config.json").read_text())
            diff = {k: (v, cfg.to_dict()[k]) for k, v in saved["model"].items() if cfg.to_dict().get(k) != v}
            if diff:
                raise ValueError(f"--resume with other model options than the checkpoint: {diff} (saved, given)")
            if (saved["train"]["clip_norm"] is None) != (tcfg.clip_norm is None):
                raise ValueError("--resume cannot switch gradient clipping on or off (the optimizer state differs)")
            if saved["seed"] != args.seed:
                raise ValueError(f"--resume with --seed={args.seed}, the checkpoint used --seed={saved['seed']}")
        corpus = load_corpus(args.corpus, max_bytes=int(args.corpus_mb * 1e6))
        window = args.seq_len + 1 if cfg.causal else args.seq_len
        for name, stream in (("training", corpus.train), ("held-out", corpus.heldout)):
            if stream.size < window:
                raise ValueError(
                    f"the {name} split has {stream.size} tokens, fewer than one --seq-len window ({window})"
                )
    except (ValueError, OSError) as e:
        return _fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    if mesh is None:
        return _train(args, cfg, tcfg, corpus, ckpt, out, window)
    import jax

    with jax.set_mesh(mesh):
        return _train(args, cfg, tcfg, corpus, ckpt, out, window, mesh)


def _mesh(args: argparse.Namespace, cfg: TransformerConfig) -> Any:
    """--mesh -> a (data, model) Mesh, or None; ValueError if it does not fit the devices, the model or the batch."""
    if args.mesh is None:
        return None
    from flax_impl.distributed import check_shardable, make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh))
    check_shardable(cfg, mesh)
    if args.batch_size % mesh.shape["data"]:
        raise ValueError(f"--batch-size={args.batch_size} is not divisible by the mesh's data axis size "
                         f"{mesh.shape['data']}")
    return mesh


def _train(
    args: argparse.Namespace,
    cfg: TransformerConfig,
    tcfg: TrainConfig,
    corpus: Any,
    ckpt: Path | None,
    out: Path,
    window: int,
    mesh: Any = None,
) -> int:
    import jax
    from flax import nnx

    from flax_impl.apps.corpus import even_windows, sample_windows, unigram_entropy
    from flax_impl.encoder import TransformerEncoder
    from flax_impl.interop import load
    from flax_impl.train import eval_step, lr_schedule, make_batch, make_optimizer, make_tx, train_step

    rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1)
    if mesh is None:
        model = TransformerEncoder(cfg, rngs=rngs)
        _scale_embedding(model)
        optimizer, step_fn = make_optimizer(model, tcfg), train_step
    else:  # sharded init (the same values as unsharded for the same seed), sharded optimizer state and step
        from flax_impl import distributed

        model = distributed.create_sharded_model(cfg, mesh, rngs=rngs)
        _scale_embedding(model)
        optimizer = distributed.create_sharded_optimizer(model, make_tx(tcfg), mesh)
        step_fn = functools.partial(distributed.sharded_train_step, mesh=mesh)
    history: dict[str, list[float]] = {"train_step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
    if ckpt is not None:
        load(model, ckpt / "model.safetensors")
        history = _load_state(ckpt / "train_state.npz", model, optimizer)
        if mesh is not None:  # loaded values are plain arrays: back to their shards
            distributed.reshard(model, mesh)
            distributed.reshard(optimizer, mesh)
    start = int(optimizer.step[...])
    stop = args.stop_at or args.steps
    objective = "next-token" if cfg.causal else f"masked-token (mask id {ByteTokenizer.mask_id})"
    print(
        f"corpus {corpus.source}: {corpus.train.size:,} train / {corpus.heldout.size:,} held-out byte tokens "
        f"({corpus.n_train_files} / {corpus.n_heldout_files} files); {objective}, {cfg.position} positions, "
        f"{cfg.n_layers} x {cfg.d_model}; steps {start} -> {stop} of {args.steps}"
        + ("" if mesh is None else f"; mesh data={mesh.shape['data']} x model={mesh.shape['model']}")
    )
    heldout = even_windows(corpus.heldout, args.eval_batches * args.batch_size, window)
    eval_batches = [
        make_batch(heldout[i : i + args.batch_size], cfg, tcfg, np.random.default_rng([args.seed, 2**31, i]))
        for i in range(0, len(heldout), args.batch_size)
    ]
    meta = {"model": cfg.to_dict(), "train": tcfg.to_dict(), "seed": args.seed, "seq_len": args.seq_len}
    schedule = lr_schedule(tcfg)
    baseline = unigram_entropy(corpus.heldout)

    def evaluate() -> float:
        model.eval()
        sums = [eval_step(model, b) for b in eval_batches]
        model.train()
        return float(sum(s for s, _ in sums) / max(sum(c for _, c in sums), 1.0))

    progress = Progress(total=stop, initial=start)
    t_start, t_first, tokens, t_tokens = time.perf_counter(), None, 0, 0.0
    model.train()
    last_good = str(ckpt / "model.safetensors") if ckpt else None
    code, reason = 0, ""
    for step in range(start, stop):
        rng = np.random.default_rng([args.seed, step])
        batch = make_batch(sample_windows(corpus.train, args.batch_size, window, rng), cfg, tcfg, rng)
        t0 = time.perf_counter()
        metrics = step_fn(model, optimizer, batch)
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        dt = time.perf_counter() - t0
        if t_first is None:
            t_first = dt
        else:
            tokens, t_tokens = tokens + batch["inputs"].size, t_tokens + dt
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            code, reason = 1, f"non-finite loss {loss} (gradient norm {gnorm}) at step {step + 1}"
            break
        history["train_step"].append(step + 1)
        history["train_loss"].append(loss)
        progress.update(step + 1, loss, tokens / t_tokens if t_tokens else 0.0)
        if (step + 1) % args.eval_every == 0 or step + 1 == stop:
            eval_loss = evaluate()
            params = jax.tree.leaves(nnx.state(model, nnx.Param))
            params_ok = all(bool(jax.numpy.isfinite(v).all()) for v in params)
            if not (math.isfinite(eval_loss) and params_ok):
                code, reason = 1, f"non-finite held-out loss {eval_loss} or parameters after step {step + 1}"
                break
            history["eval_step"].append(step + 1)
            history["eval_loss"].append(eval_loss)
            path = save_checkpoint(out, model, optimizer, {**meta, "step": step + 1}, history)
            last_good = str(path / "model.safetensors")
            progress.write(
                f"step {step + 1:>5}  train {loss:.4f}  held-out {eval_loss:.4f} nats/token  "
                f"lr {float(schedule(step)):.2e}  |g| {gnorm:.2f}  -> {path}"
            )
    progress.close()
    elapsed = time.perf_counter() - t_start
    plot = out / "loss.png" if args.plot is None else None if args.plot.lower() == "none" else Path(args.plot)
    if plot is not None and history["eval_step"]:
        title = f"{objective}, {cfg.position}, {cfg.n_layers}x{cfg.d_model}, stdlib bytes"
        print(plot_losses(plot, history, baseline, title))
    if code:
        print(
            f"flax-impl train: stopped: {reason}. Lower --lr or raise --warmup. The last good checkpoint is "
            f"intact: {last_good or 'none was written'}",
            file=sys.stderr,
        )
        return code
    final = history["eval_loss"][-1]
    print(
        f"final held-out loss {final:.4f} nats/token ({final / math.log(2):.3f} bits) vs unigram entropy of the "
        f"held-out text {baseline:.4f} nats ({baseline / math.log(2):.3f} bits); {stop - start} steps in "
        f"{elapsed:.1f} s (first step incl. compile {t_first or 0:.1f} s, "
        f"{tokens / t_tokens if t_tokens else 0:,.0f} tokens/s after); checkpoint {last_good}"
    )
    return 0
