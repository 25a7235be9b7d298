"""`flax-impl finetune FOLDER --data PATH --out DIR`: fine-tune a local Hugging Face causal LM on text or chat /
instruction records, and write a folder that transformers loads (docs/finetune.md).

Before any work (exit 2, one line naming the option, the file or the record): every option; the folder (config,
a causal family we read, weights, tokenizer.json, chat template); every record of --data (and --eval-data) read,
tokenized and checked (`flax_impl.apps.finetune_data`); --out writable and not used by another run; with
--resume, the checkpoint's files and options. Then training (`flax_impl.apps.finetune_loop`): AdamW with warmup
and cosine decay, clipping, accumulation, held-out loss and a checkpoint every --eval-every steps; Ctrl-C saves a
checkpoint, prints a summary and the resume command, exit 130. At the end OUT holds the fine-tuned folder:
config.json (the original's fields kept), model.safetensors and the tokenizer's files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flax_impl.apps import args as shared
from flax_impl.checkpoint_dir import check_fault_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `flax-impl finetune` options."""
    a = p.add_argument
    a("folder", metavar="FOLDER", help="local Hugging Face folder of a causal LM: config.json, safetensors weights, "
      "tokenizer.json (and a chat template for chat records)")
    a("--data", required=True, metavar="PATH", help="training data: .txt (plain text) or .jsonl (records with "
      "'messages', 'prompt' + 'completion', or 'text')")
    a("--out", required=True, metavar="DIR", help="output folder: the fine-tuned Hugging Face folder, checkpoint/, "
      "loss.png")
    a("--eval-data", metavar="PATH", help="held-out data (same formats) [--eval-fraction of --data]")
    a("--eval-fraction", type=float, default=0.05, help="share of --data's records held out when no --eval-data; "
      "0 = no held-out loss [0.05]")
    a("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the folder's")
    a("--seq-len", type=int, metavar="L", help="model inputs per row [the model's maximum, at most 1024]")
    a("--pack", action="store_true", help="pack several records per row (each attends to itself only) "
      "[one record per row, padded]")
    a("--batch-size", type=int, default=8, help="rows per micro-batch [8]")
    a("--grad-accum", type=int, default=1, metavar="A", help="micro-batches per optimizer step [1]")
    a("--epochs", type=float, default=1.0, help="passes over the training rows, sets --steps [1]")
    a("--steps", type=int, help="optimizer steps (the schedule's length) [from --epochs]")
    a("--lr", type=float, default=2e-5, help="peak learning rate [2e-5]")
    a("--warmup", type=int, help="linear warmup steps, then cosine decay [10%% of --steps]")
    a("--end-lr-ratio", type=float, default=0.1, help="final learning rate / --lr [0.1]")
    a("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay on Linear kernels [0]")
    a("--clip-norm", type=float, default=1.0, help="global gradient-norm clip, 0 = off [1.0]")
    a("--bf16", action="store_true", help="compute in bfloat16 (parameters and AdamW state stay float32)")
    a("--remat", action="store_true", help="recompute each block in the backward pass (less memory)")
    a("--eval-every", type=int, default=50, help="held-out loss and a checkpoint every N steps [50]")
    a("--resume", action="store_true", help="continue from OUT/checkpoint (same options)")
    a("--stop-at", type=int, help="stop (with a checkpoint) after this step; --resume later")
    shared.add_seed_option(p, "the held-out split, the row order and dropout")
    shared.add_plot_option(p, "train and held-out loss", default_text="OUT/loss.png; 'none' to skip")
    shared.add_mesh_option(p, "fine-tune sharded")
    a("--fsdp", action="store_true", help="with --mesh: also split parameters and AdamW state over the data axis")
    a("--lora-r", type=int, metavar="R", help="train LoRA adapters of rank R instead of every weight; OUT is then "
      "a PEFT adapter folder [full fine-tuning]")
    a("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: adapters add (alpha / r) x A B [16]")
    a("--lora-dropout", type=float, default=0.0, help="dropout on each adapter's input [0]")
    a("--lora-targets", default="all-linear", metavar="NAMES", help="the modules to adapt, by the family's names "
      "(comma-separated, e.g. q_proj,v_proj; or one regular expression; or all-linear) [all-linear]")
    a("--merge", action="store_true", help="with --lora-r: also write the adapters folded into the weights as a "
      "full Hugging Face folder, OUT/merged")
    a("--coordinator", metavar="HOST:PORT", help="several processes (jax.distributed): the coordinator's address")
    a("--num-processes", type=int, help="several processes: how many")
    a("--process-id", type=int, help="several processes: this one's index")


@dataclass
class Plan:
    """What `make_plan` checked before any work."""

    folder: Path
    model_type: str
    config: Any  # TransformerConfig
    tokens: Any  # finetune_data.Tokens
    train_rows: Any  # finetune_batches.Rows
    eval_rows: Any  # finetune_batches.Rows or None
    tcfg: Any  # TrainConfig
    lora: Any  # LoraConfig, or None for full fine-tuning
    seq_len: int
    steps: int
    template_source: str | None
    notes: list[str] = field(default_factory=list)


def _check_options(args: argparse.Namespace) -> None:
    shared.check_at_least(args, ("batch_size", "grad_accum", "steps", "eval_every", "seq_len"))
    shared.check_seed(args)
    shared.check_number("--epochs", args.epochs, low=0.0, low_open=True)
    shared.check_number("--eval-fraction", args.eval_fraction, low=0.0, high=1.0, high_open=True)
    shared.check_number("--lr", args.lr, low=0.0, low_open=True)
    shared.check_number("--end-lr-ratio", args.end_lr_ratio, low=0.0, high=1.0)
    shared.check_number("--weight-decay", args.weight_decay, low=0.0)
    shared.check_number("--clip-norm", args.clip_norm, low=0.0, what="(0 = off)")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} must be >= 0")
    if args.lora_r is None and (args.merge or args.lora_dropout or args.lora_alpha != 16.0
                                or args.lora_targets != "all-linear"):
        raise ValueError("--merge and the --lora-* options need --lora-r (LoRA fine-tuning)")
    if args.fsdp and not args.mesh:
        raise ValueError("--fsdp shards over the mesh's data axis: give --mesh data=D,model=M too")
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and not all(given):
        raise ValueError("several processes need all of --coordinator, --num-processes and --process-id")
    if all(given):
        if not args.mesh:
            raise ValueError("several processes train one model on one mesh: give --mesh too")
        if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
            raise ValueError(f"--process-id={args.process_id} must be in [0, --num-processes={args.num_processes})")
    for option in ("data", "eval_data", "chat_template"):
        path = getattr(args, option)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{option.replace('_', '-')} {path!r} is not a file")
    shared.check_output_dir("--out", args.out)
    check_fault_spec()
    if args.plot is not None and args.plot.lower() != "none":
        shared.check_output_paths(args)


def read_folder(folder: Path, chat_template: str | None) -> tuple[Any, Any, Any, str | None]:
    """(family, config, tokenizer, template source) of a causal LM folder, no weight read.

    Raises:
        ValueError / FileNotFoundError: naming the file: no config, an unsupported or non-causal family, no
            weights, no or a bad tokenizer.json, no tokenizers package, a bad chat template.
    """
    from flax_impl.apps.finetune_template import load_chat_template
    from flax_impl.hf.convert import config_from_hf
    from flax_impl.hf.io import read_config, weight_files

    hf = read_config(folder)
    fam, cfg = config_from_hf(hf)
    if not cfg.causal:
        raise ValueError(f"FOLDER {str(folder)!r} holds a {fam.model_type} model, which is not causal: finetune "
                         "trains causal language models (gpt2, llama, mistral, qwen2, bloom, mpt)")
    weight_files(folder)
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ValueError("finetune reads the folder's tokenizer.json with the tokenizers package: "
                         "pip install tokenizers") from None
    from flax_impl.apps.generate import load_tokenizer

    tokenizer = load_tokenizer(folder)
    source = Path(chat_template).read_text(encoding="utf-8") if chat_template else load_chat_template(folder)
    return fam, cfg, tokenizer, source


def make_plan(args: argparse.Namespace) -> Plan:
    """Check every option, the folder and every record; no weight is read, nothing is compiled.

    Raises:
        ValueError / OSError: the first problem, named.
    """
    from flax_impl.apps.finetune_batches import pack_rows, pad_rows, split_heldout
    from flax_impl.apps.finetune_data import Tokens, read_examples
    from flax_impl.apps.finetune_template import ChatTemplate, special_tokens
    from flax_impl.apps.generate import eos_ids
    from flax_impl.config import TrainConfig
    from flax_impl.hf.io import read_config

    _check_options(args)
    folder = Path(args.folder)
    fam, cfg, tokenizer, source = read_folder(folder, args.chat_template)
    seq_len = args.seq_len or min(cfg.max_len, 1024)
    if seq_len > cfg.max_len:
        raise ValueError(f"--seq-len={seq_len} is above the model's maximum length {cfg.max_len}")
    template = None if source is None else ChatTemplate(source, special_tokens(folder))
    eos = eos_ids(folder, read_config(folder))
    tokens = Tokens(tokenizer, eos[0] if eos else None, template, cfg.vocab_size)
    train = read_examples(args.data, tokens, seq_len=seq_len, max_len=cfg.max_len)
    if args.eval_data:
        heldout = read_examples(args.eval_data, tokens, seq_len=seq_len, max_len=cfg.max_len)
    else:
        train, heldout = split_heldout(train, args.eval_fraction, args.seed)
    pad = tokens.eos_id if tokens.eos_id is not None else 0

    def rows(examples: list) -> Any:
        if args.pack:
            return pack_rows(examples, seq_len, pad_id=pad, position_offset=cfg.position_offset)
        return pad_rows(examples, seq_len, pad_id=pad)

    train_rows, eval_rows = rows(train), rows(heldout) if heldout else None
    per_step = args.batch_size * args.grad_accum
    steps = args.steps or max(1, math.ceil(args.epochs * len(train_rows) / per_step))
    warmup = args.warmup if args.warmup is not None else steps // 10
    if warmup >= steps:
        raise ValueError(f"--warmup={warmup} must be below the {steps} steps")
    if args.stop_at is not None and not 1 <= args.stop_at <= steps:
        raise ValueError(f"--stop-at={args.stop_at} must be in [1, {steps}] (the steps)")
    tcfg = TrainConfig(learning_rate=args.lr, warmup_steps=warmup, total_steps=steps, end_lr_ratio=args.end_lr_ratio,
                       weight_decay=args.weight_decay, clip_norm=args.clip_norm or None)
    layout = "packed" if args.pack else "padded"
    n_eval = 0 if eval_rows is None else len(eval_rows)
    notes = [f"{len(train)} training / {len(heldout)} held-out examples -> {len(train_rows)} / {n_eval} rows of "
             f"{seq_len} ({layout}); {train_rows.trained_tokens:,} trained tokens; {steps} steps of "
             f"{args.grad_accum} x {args.batch_size} rows"]
    lora = lora_plan(args, fam.model_type, cfg)
    if lora is not None:
        notes.append(f"LoRA r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g} on {lora.targets}; the base "
                     "weights frozen")
    return Plan(folder, fam.model_type, cfg, tokens, train_rows, eval_rows, tcfg, lora, seq_len, steps, source, notes)


def lora_plan(args: argparse.Namespace, model_type: str, cfg: Any) -> Any:
    """The LoraConfig of --lora-*, its targets checked against the family's modules (None without --lora-r).

    Raises:
        ValueError: a value out of range, or targets that name no module of the model.
    """
    if args.lora_r is None:
        return None
    from flax import nnx

    from flax_impl.lora import LoraConfig, target_sites
    from flax_impl.transformer import Transformer

    names = args.lora_targets.split(",")
    targets = args.lora_targets if len(names) == 1 else tuple(n.strip() for n in names)
    try:
        config = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets,
                            model_type=model_type)
        target_sites(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), config)
    except ValueError as err:
        raise ValueError(f"--lora-*: {err}") from None
    return config


def run_options(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """What a resumed run must share with the saved one (`flax_impl.apps.checkpoint.check_resumable`)."""
    def absolute(p: str | None) -> str | None:
        return None if p is None else os.path.abspath(p)

    lora = None if plan.lora is None else json.loads(json.dumps(dataclasses.asdict(plan.lora)))  # JSON's types
    data = {"folder": absolute(args.folder), "data": absolute(args.data), "eval_data": absolute(args.eval_data),
            "eval_fraction": args.eval_fraction, "chat_template": absolute(args.chat_template),
            "seq_len": plan.seq_len, "pack": args.pack, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
            "bf16": args.bf16, "lora": lora}
    return {"model": plan.config.to_dict(), "train": plan.tcfg.to_dict(), "data": data, "seed": args.seed}


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 1 a non-finite loss (the last good checkpoint kept), 2 bad input or a checkpoint that
    could not be written, 130 interrupted (Ctrl-C) with a checkpoint."""
    from flax_impl.apps import finetune_loop

    try:
        if args.num_processes is not None:
            _check_options(args)
            import jax

            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        plan = make_plan(args)
    except (ValueError, OSError) as err:
        return shared.fail("finetune", err)
    return finetune_loop.run(args, plan, run_options(args, plan))
