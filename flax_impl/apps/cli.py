"""`flax-impl` command line: `parity`, `bench`, `train`. Each subcommand lives in its own module, which
provides `add_arguments(parser)` and `run(args) -> int`; it is imported only when chosen."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "parity": ("flax_impl.apps.parity", "max abs difference Flax vs torch_ref for every module and position scheme"),
    "bench": ("flax_impl.apps.bench.encoder", "jit benchmark side by side with PyTorch"),
    "train": ("flax_impl.apps.train", "train a small encoder on the Python standard library's source"),
    "finetune": ("flax_impl.apps.finetune", "fine-tune a local Hugging Face causal LM on text or chat records"),
    "generate": ("flax_impl.apps.generate", "continue a prompt with a local Hugging Face causal LM (KV cache)"),
    "bench-decode": ("flax_impl.apps.bench.decode", "decode benchmark: Flax generate vs torch_ref vs transformers"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flax-impl", description="Flax NNX Transformer blocks with PyTorch twins: parity, benchmarks, training."
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import (jax, torch, ...) only for the subcommand that runs
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    args.argv = list(argv)  # the command line as given, for reports (`flax-impl bench` records it)
    if args.command is None:
        parser.print_help()
        return 2
    from flax_impl.apps.progress import interruptible

    with interruptible() as interrupted:  # a Ctrl-C is never lost in a callback (progress.interruptible)
        status = int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args))
    if status == 130 and interrupted():
        # The command handled a real Ctrl-C and said so; end here with its status. Returning could still end the
        # process by SIGINT (status -2, seen when the interrupt landed inside transformers' loading), which a
        # shell or a test reads as "killed", not as the command's own exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return status


if __name__ == "__main__":
    sys.exit(main())
