"""The training loop of `flax-impl finetune`: the model loaded (on a mesh if asked), the steps, held-out loss,
checkpoints (the library's kill-safe Orbax format, `flax_impl.apps.checkpoint`), Ctrl-C, and the output folder.

OUT/checkpoint/<step> holds the newest checkpoint (model, AdamW state, rng streams, the run's options and loss
history); OUT/.lock the pid of the run writing OUT. With several processes (jax.distributed) every process runs
the same steps on its devices' rows; process 0 prints, takes the lock, plots and writes the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from flax_impl.apps import args as shared, checkpoint as ck, step_loop
from flax_impl.apps.step_loop import INTERRUPTED, CtrlC, StepLoop

# Copied from FOLDER into OUT when present: what transformers' tokenizers and generate read.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def resume_command(args: argparse.Namespace) -> str:
    """The command line that continues this run: the one given with --resume."""
    argv = getattr(args, "argv", None) or ["finetune", args.folder, "--data", args.data, "--out", args.out]
    return step_loop.resume_line(list(argv))


def _primary() -> bool:
    import jax

    return jax.process_index() == 0


def run(args: argparse.Namespace, plan: Any, meta: dict[str, Any]) -> int:
    """Lock OUT, check the checkpoint to resume, train; the exit status of `flax_impl.apps.finetune.run`."""
    out = Path(args.out)
    lock = None
    try:
        mesh = shared.build_mesh(args.mesh, plan.config, [args.batch_size]) if args.mesh else None
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        if _primary():
            lock = ck.RunLock(out).acquire()
        stop = args.stop_at or plan.steps
        ckpt = ck.prepare(out, meta, resume=args.resume, stop=stop)
    except (ValueError, OSError) as err:
        if lock is not None:
            lock.release()
            if created and not any(out.iterdir()):
                out.rmdir()
        return shared.fail("finetune", err)
    try:
        with CtrlC() as ctrl_c:
            return _train(args, plan, meta, mesh, ckpt, out, ctrl_c)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: the last checkpoint is kept
        return step_loop.interrupted_early("finetune", out, resume_command(args))
    finally:
        if lock is not None:
            lock.release()


def load(args: argparse.Namespace, plan: Any, mesh: Any) -> tuple[Any, Any]:
    """(model, optimizer): the folder's weights in train mode, placed on the mesh (FSDP: split over `data` too)
    when there is one; AdamW over every parameter, or with LoRA over the adapters only."""
    import jax
    from flax import nnx

    import flax_impl.hf
    from flax_impl import distributed
    from flax_impl.apps import finetune_step as fs
    from flax_impl.config import FlaxConfig
    from flax_impl.lora import apply_lora, lora_decay
    from flax_impl.train import default_decay, make_tx

    flax_config = FlaxConfig(dtype="bfloat16" if args.bf16 else "float32", remat=args.remat)
    _, model = flax_impl.hf.from_pretrained(plan.folder, flax_config=flax_config, rngs_seed=args.seed)
    model.train()
    if mesh is not None:
        if args.fsdp:
            fs.fsdp_shard(model, mesh.shape["data"])
        fs.place_state(model, mesh)
    decay, wrt = default_decay, nnx.Param
    if plan.lora is not None:  # the adapters only are trained: no gradient nor AdamW state for the base weights
        apply_lora(model, plan.lora, rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1))
        decay, wrt = lora_decay, nnx.LoRAParam
    if mesh is not None:
        return model, distributed.create_sharded_optimizer(model, make_tx(plan.tcfg, decay=decay), mesh, wrt=wrt)
    # Committed to one device, as the step's outputs are: the step compiles once, not twice.
    nnx.update(model, jax.device_put(nnx.state(model), jax.local_devices()[0]))
    optimizer = nnx.Optimizer(model, make_tx(plan.tcfg, decay=decay), wrt=wrt)
    nnx.update(optimizer, jax.device_put(nnx.state(optimizer), jax.local_devices()[0]))
    return model, optimizer


def _train(args: argparse.Namespace, plan: Any, meta: dict[str, Any], mesh: Any, ckpt: Any, out: Path,
           ctrl_c: CtrlC) -> int:
    from flax_impl.apps import finetune_step as fs
    from flax_impl.apps.finetune_batches import eval_batches, step_batch
    from flax_impl.train import lr_schedule

    primary = _primary()
    say = print if primary else (lambda *a, **k: None)
    model, optimizer = load(args, plan, mesh)
    loop = StepLoop("finetune", out, model, optimizer, meta, ckpt, export=False)
    start, stop = loop.start, args.stop_at or plan.steps
    for note in plan.notes:
        say(f"flax-impl finetune: {note}")
    say(f"flax-impl finetune: {plan.model_type} {plan.config.n_layers} x {plan.config.d_model} from "
        f"{plan.folder}; steps {start} -> {stop} of {plan.steps}"
        + ("" if mesh is None else f"; mesh data={mesh.shape['data']} x model={mesh.shape['model']}"
           + (" (FSDP)" if args.fsdp else "")))
    heldout = [] if plan.eval_rows is None else eval_batches(plan.eval_rows, args.batch_size)
    schedule = lr_schedule(plan.tcfg)

    def held_out(done: int) -> tuple[float | None, str]:
        if not heldout:
            return None, ""
        eval_loss = loop.held_out_loss(heldout, lambda b: fs.eval_sums(model, b, mesh=mesh))
        return eval_loss, "" if math.isfinite(eval_loss) else f"non-finite held-out loss {eval_loss} after step {done}"

    def batch_at(step: int) -> dict[str, Any]:
        return step_batch(plan.train_rows, step, batch_size=args.batch_size, accumulate=args.grad_accum,
                          seed=args.seed)

    code = loop.run(stop, ctrl_c=ctrl_c, batch_at=batch_at, step_fn=lambda m, o, b: fs.train_step(m, o, b, mesh=mesh),
                    eval_every=args.eval_every, held_out=held_out, schedule=schedule, label="fine-tuning",
                    idle_rate="-", show=primary)
    if code == INTERRUPTED:
        return loop.interrupted(stop, resume_command(args), show=primary)
    if code == 1:
        return loop.diverged(show=primary)
    if code:  # a checkpoint could not be written: reported
        return code
    history, saved = loop.history, loop.saved
    plot = step_loop.plot_path(args.plot, out)
    if plot is not None and primary and history["train_step"]:
        say(_plot(plot, history, f"{plan.model_type} fine-tuning, {plan.config.n_layers} x {plan.config.d_model}"))
    if stop < plan.steps:
        say(f"flax-impl finetune: stopped at step {stop} of {plan.steps} (--stop-at): checkpoint {saved[1]}; "
            f"continue with: {resume_command(args)}")
        return 0
    export(model, plan, out, args, mesh)
    rate = f"{loop.rate():,.0f} tokens/s after the first step" if loop.t_tokens else "-"
    final = f"held-out loss {history['eval_loss'][-1]:.4f}, " if history["eval_loss"] else ""
    say(f"flax-impl finetune: done: {final}train loss {history['train_loss'][-1]:.4f} after {stop} steps "
        f"(first step incl. compile {loop.t_first or 0:.1f} s, {rate}); folder {out}")
    return 0


def _plot(path: Path, history: dict[str, list[float]], title: str) -> str:
    """Write the loss PNG; returns a message (matplotlib is optional)."""
    if not step_loop.plot_history(path, history, title, alpha=0.7):
        return "flax-impl finetune: matplotlib is not installed: no plot written (pip install matplotlib)"
    return f"flax-impl finetune: plot {path}"


def _host(model: Any, mesh: Any) -> Any:
    """The model with every array whole on each process (several processes: gathered), for writing."""
    if mesh is None:
        return model
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    state = nnx.state(model)
    gather = jax.jit(lambda s: s, out_shardings=NamedSharding(mesh, PartitionSpec()))
    with jax.set_mesh(mesh):
        nnx.update(model, gather(state))
    return model


def export(model: Any, plan: Any, out: Path, args: argparse.Namespace, mesh: Any) -> None:
    """OUT as a Hugging Face folder (config.json: the original's fields, ours on top; model.safetensors), or with
    LoRA as a PEFT adapter folder (and with --merge the merged model as a Hugging Face folder in OUT/merged); with
    the folder's tokenizer files (with --chat-template, that template as chat_template.jinja)."""
    from flax_impl.hf.adapters import save_peft_adapter
    from flax_impl.lora import merged_model

    model = _host(model, mesh)
    if not _primary():
        return
    model.eval()
    if plan.lora is None:
        write_folder(model, plan, out, args)
        return
    save_peft_adapter(model, out)
    copy_tokenizer(plan, out, args)
    if args.merge:
        write_folder(merged_model(model), plan, out / "merged", args)


def write_folder(model: Any, plan: Any, out: Path, args: argparse.Namespace) -> None:
    """A Hugging Face folder of `model` (no adapters) with the original's config fields and tokenizer files."""
    import flax_impl.hf
    from flax_impl.hf.io import CONFIG, read_config

    flax_impl.hf.save_pretrained(model, out, model_type=plan.model_type)
    ours = read_config(out)
    original = read_config(plan.folder)
    if "dtype" in ours:
        original.pop("torch_dtype", None)
    merged = {**original, **ours}
    tmp = out / f".tmp-{CONFIG}"
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / CONFIG)
    copy_tokenizer(plan, out, args)


def copy_tokenizer(plan: Any, out: Path, args: argparse.Namespace) -> None:
    """The folder's tokenizer files into `out`; with --chat-template, that template as chat_template.jinja."""
    for name in TOKENIZER_FILES:
        if (plan.folder / name).is_file():
            shutil.copyfile(plan.folder / name, out / name)
    extra = plan.folder / "additional_chat_templates"
    if extra.is_dir():
        shutil.copytree(extra, out / extra.name, dirs_exist_ok=True)
    if args.chat_template:
        (out / "chat_template.jinja").write_text(plan.template_source, encoding="utf-8")
