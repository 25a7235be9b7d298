"""`flax-impl train`: train a small encoder (masked-token) or causal model (next-token) on the Python standard
library's source, byte-tokenized; held-out evaluation, the library's Orbax checkpoints that survive any sequence
of kills (their layout: `flax_impl.apps.checkpoint`), a safetensors copy of the weights for PyTorch, a loss plot.

Every option, path and checkpoint file is checked before any work (exit 2, the error names the option or the
file); one run at a time per --out (a lock). Ctrl-C stops after the current step with a checkpoint of it and
prints the command that resumes (exit 130); a second Ctrl-C stops at once, the last checkpoint kept. Exit 1 only
when training diverged (a non-finite loss); 2 also when a checkpoint cannot be written (a full disk).

Batches depend only on (seed, step), so a resumed run replays the uninterrupted run's batches and masks.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.apps import args as shared, checkpoint as ck, step_loop
from flax_impl.apps.step_loop import INTERRUPTED, CtrlC, StepLoop
from flax_impl.checkpoint_dir import check_fault_spec
from flax_impl.config import TrainConfig, TransformerConfig
from flax_impl.tokenizer import PAD_ID, ByteTokenizer


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
    shared.add_model_options(p, d_model=128, n_heads=4, n_layers=2, d_ff=None)
    a("--max-len", type=int, default=256, help="longest sequence the model accepts (learned positions) [256]")
    a("--dropout", type=float, default=0.1, help="dropout rate [0.1]")
    shared.add_position_option(p, "rope")
    a("--causal", action="store_true", help="next-token objective with causal attention (default: masked-token)")
    a("--mask-prob", type=float, default=0.15, help="masked-token objective: fraction of positions predicted [0.15]")
    a("--out", default="flax-impl-train", help="output directory: checkpoint/, model.safetensors, loss.png "
      "[./flax-impl-train]")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (same model options)")
    a("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step; resume later")
    shared.add_seed_option(p, "the weights, dropout masks, batches and token masks")
    a("--eval-every", type=int, default=100, help="held-out evaluation + checkpoint every N steps [100]")
    a("--eval-batches", type=int, default=8, help="held-out batches per evaluation [8]")
    shared.add_plot_option(p, "train and held-out loss", default_text="OUT/loss.png; 'none' to skip")
    a("--corpus", default=None, help="a text file or directory instead of the standard library's source")
    a("--corpus-mb", type=float, default=4.0, help="read at most this many MB of text [4]")
    shared.add_mesh_option(p, "train sharded")


def _check_options(args: argparse.Namespace) -> None:
    """ValueError naming the first option out of range, before any work."""
    names = ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "n_layers", "d_model", "n_heads", "d_ff",
             "max_len")
    shared.check_at_least(args, names)
    shared.check_seed(args)
    if args.warmup < 0 or args.warmup >= args.steps:
        raise ValueError(f"--warmup={args.warmup} must be in [0, --steps={args.steps})")
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise ValueError(f"--stop-at={args.stop_at} must be in [1, --steps={args.steps}]")
    shared.check_number("--lr", args.lr, low=0.0, low_open=True)
    shared.check_number("--weight-decay", args.weight_decay, low=0.0)
    shared.check_number("--clip-norm", args.clip_norm, low=0.0, what="(0 = off)")
    shared.check_number("--dropout", args.dropout, low=0.0, high=1.0, high_open=True)
    shared.check_number("--mask-prob", args.mask_prob, low=0.0, high=1.0, low_open=True)
    shared.check_number("--corpus-mb", args.corpus_mb, low=1e-6, what="(one byte)")
    if args.position == "learned" and args.seq_len > args.max_len:
        raise ValueError(
            f"--seq-len={args.seq_len} is above --max-len={args.max_len}: learned positions have no row past "
            "max_len (raise --max-len or shorten --seq-len)"
        )
    if args.corpus is not None and not os.path.exists(args.corpus):
        raise ValueError(f"--corpus {args.corpus!r} does not exist")
    shared.check_output_dir("--out", args.out)
    if args.plot is not None and args.plot.lower() != "none":
        shared.check_output_paths(args)
    check_fault_spec()


def _configs(args: argparse.Namespace) -> tuple[TransformerConfig, TrainConfig]:
    """Validate the options (ValueError naming the option) and build the two configs, before any work."""
    _check_options(args)
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


def _data_options(args: argparse.Namespace) -> dict[str, Any]:
    """What the batches depend on besides the seed: a resumed run must read the same data the same way."""
    corpus = None if args.corpus is None else os.path.abspath(args.corpus)
    return {"corpus": corpus, "corpus_mb": args.corpus_mb, "seq_len": args.seq_len, "batch_size": args.batch_size}


def plot_losses(path: Path, history: dict[str, list[float]], baseline: float, title: str) -> str:
    """Write the PNG (the run has held-out losses); returns a message (matplotlib is optional)."""
    if not step_loop.plot_history(path, history, title, alpha=0.6, baseline=baseline):
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    return f"plot: {path}"


# --------------------------------------------------------------------------------------------------------- run
def _scale_embedding(model: Any) -> None:
    """Token embedding N(0, 1/D) instead of nn.Embedding's N(0, 1), with `embed_scale` (x sqrt(D)) at the input:
    unit-scale inputs and, through the tied head, initial logits of std ~1 instead of ~sqrt(D) (Vaswani et al.'s
    shared-embedding convention). The padding row stays zero."""
    w = model.input.embed.weight
    w[...] = w[...] * (model.config.d_model**-0.5)


def _resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the one given (`flax-impl` + argv) with --resume."""
    return step_loop.resume_line(list(getattr(args, "argv", None) or ["train", "--out", args.out]))


def run(args: argparse.Namespace) -> int:
    """Exit code: 0 done, 1 stopped on a non-finite loss (last good checkpoint kept), 2 bad input (an option, a
    path, a checkpoint file, another run on --out) reported before any work, or a checkpoint that could not be
    written (a full disk), 130 interrupted (Ctrl-C) with a checkpoint of the last step."""
    from flax_impl.apps.corpus import load_corpus

    out = Path(args.out)
    try:
        cfg, tcfg = _configs(args)
        mesh = shared.build_mesh(args.mesh, cfg, [args.batch_size]) if args.mesh else None
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        lock = ck.RunLock(out).acquire()
    except (ValueError, OSError) as e:
        return shared.fail("train", e)
    run_meta = {"model": cfg.to_dict(), "train": tcfg.to_dict(), "data": _data_options(args), "seed": args.seed}
    try:
        with CtrlC() as ctrl_c:
            try:
                ckpt = ck.prepare(out, run_meta, resume=args.resume, stop=args.stop_at or args.steps)
                corpus = load_corpus(args.corpus, max_bytes=int(args.corpus_mb * 1e6))
                window = args.seq_len + 1 if cfg.causal else args.seq_len
                for name, stream in (("training", corpus.train), ("held-out", corpus.heldout)):
                    if stream.size < window:
                        raise ValueError(
                            f"the {name} split has {stream.size} tokens, fewer than one --seq-len window ({window})"
                        )
            except (ValueError, OSError) as e:
                lock.release()
                if created and not any(out.iterdir()):
                    out.rmdir()
                return shared.fail("train", e)
            if mesh is None:
                return _train(args, cfg, tcfg, corpus, ckpt, out, window, run_meta, ctrl_c)
            import jax

            with jax.set_mesh(mesh):
                return _train(args, cfg, tcfg, corpus, ckpt, out, window, run_meta, ctrl_c, mesh)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: the last checkpoint is kept
        return step_loop.interrupted_early("train", out, _resume_command(args))
    finally:
        lock.release()


def _train(
    args: argparse.Namespace,
    cfg: TransformerConfig,
    tcfg: TrainConfig,
    corpus: Any,
    ckpt: Any,
    out: Path,
    window: int,
    meta: dict[str, Any],
    ctrl_c: CtrlC,
    mesh: Any = None,
) -> int:
    import jax
    from flax import nnx

    from flax_impl.apps.corpus import even_windows, sample_windows, unigram_entropy
    from flax_impl.train import eval_step, lr_schedule, make_batch, make_optimizer, make_tx, train_step
    from flax_impl.transformer import Transformer

    rngs = nnx.Rngs(params=args.seed, dropout=args.seed + 1)
    if mesh is None:
        model = Transformer(cfg, rngs=rngs)
        _scale_embedding(model)
        optimizer, step_fn = make_optimizer(model, tcfg), train_step
    else:  # sharded init (the same values as unsharded for the same seed), sharded optimizer state and step
        from flax_impl import distributed

        model = distributed.create_sharded_model(cfg, mesh, rngs=rngs)
        _scale_embedding(model)
        optimizer = distributed.create_sharded_optimizer(model, make_tx(tcfg), mesh)
        step_fn = functools.partial(distributed.sharded_train_step, mesh=mesh)
    export = importlib.util.find_spec("safetensors") is not None
    loop = StepLoop("train", out, model, optimizer, meta, ckpt, export=export)
    start, stop = loop.start, args.stop_at or args.steps
    objective = "next-token" if cfg.causal else f"masked-token (mask id {ByteTokenizer.mask_id})"
    print(
        f"corpus {corpus.source}: {corpus.train.size:,} train / {corpus.heldout.size:,} held-out byte tokens "
        f"({corpus.n_train_files} / {corpus.n_heldout_files} files); {objective}, {cfg.position} positions, "
        f"{cfg.n_layers} x {cfg.d_model}; steps {start} -> {stop} of {args.steps}"
        + ("" if mesh is None else f"; mesh data={mesh.shape['data']} x model={mesh.shape['model']}")
        + ("" if export else f"; no {out / ck.EXPORT} for PyTorch: pip install safetensors")
    )
    heldout = even_windows(corpus.heldout, args.eval_batches * args.batch_size, window)
    eval_batches = [
        make_batch(heldout[i : i + args.batch_size], cfg, tcfg, np.random.default_rng([args.seed, 2**31, i]))
        for i in range(0, len(heldout), args.batch_size)
    ]
    schedule = lr_schedule(tcfg)
    baseline = unigram_entropy(corpus.heldout)

    def held_out(done: int) -> tuple[float, str]:
        eval_loss = loop.held_out_loss(eval_batches, lambda b: eval_step(model, b))
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        if math.isfinite(eval_loss) and all(bool(jax.numpy.isfinite(v).all()) for v in params):
            return eval_loss, ""
        return eval_loss, f"non-finite held-out loss {eval_loss} or parameters after step {done}"

    def batch_at(step: int) -> dict[str, Any]:
        rng = np.random.default_rng([args.seed, step])
        return make_batch(sample_windows(corpus.train, args.batch_size, window, rng), cfg, tcfg, rng)

    t_start = time.perf_counter()
    model.train()
    code = loop.run(stop, ctrl_c=ctrl_c, batch_at=batch_at, step_fn=step_fn, eval_every=args.eval_every,
                    held_out=held_out, schedule=schedule, label="training", idle_rate="0 tok/s")
    if code == INTERRUPTED:
        return loop.interrupted(stop, _resume_command(args))
    if code == 2:  # a checkpoint could not be written: reported
        return code
    elapsed = time.perf_counter() - t_start
    plot = step_loop.plot_path(args.plot, out)
    history, saved = loop.history, loop.saved
    if plot is not None and history["eval_step"]:
        title = f"{objective}, {cfg.position}, {cfg.n_layers}x{cfg.d_model}, stdlib bytes"
        print(plot_losses(plot, history, baseline, title))
    if code:
        return loop.diverged()
    final = history["eval_loss"][-1]
    print(
        f"final held-out loss {final:.4f} nats/token ({final / math.log(2):.3f} bits) vs unigram entropy of the "
        f"held-out text {baseline:.4f} nats ({baseline / math.log(2):.3f} bits); {stop - start} steps in "
        f"{elapsed:.1f} s (first step incl. compile {loop.t_first or 0:.1f} s, "
        f"{loop.rate():,.0f} tokens/s after); checkpoint {saved[1]}"
        + (f", weights for PyTorch {out / ck.EXPORT}" if export else "")
    )
    return 0
