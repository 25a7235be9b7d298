"""Run by test_finetune_mesh.py in a subprocess with 8 simulated CPU devices: `flax-impl finetune` on one device,
on a (data=4, model=2) mesh, and fully sharded (FSDP) on (data=8) and (data=2, model=4), from the same tiny Llama
folder and data; then, with --restore DIR, a checkpoint written by two processes restored onto a (data=2,
model=4) mesh. Prints one JSON object (the last stdout line); the assertions live in test_finetune_mesh.py.

    python finetune_mesh_worker.py WORK            # the four runs (WORK: a folder to write in)
    python finetune_mesh_worker.py WORK --restore  # WORK/processes/checkpoint onto data=2,model=4
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
from finetune_helpers import CHATS, make_folder, write_jsonl  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

RUNS = {"one": [], "4x2": ["--mesh", "data=4,model=2"], "fsdp8": ["--mesh", "data=8", "--fsdp"],
        "fsdp2x4": ["--mesh", "data=2,model=4", "--fsdp"]}


def argv(work: Path, out: Path, *extra: str) -> list[str]:
    """The run every test compares: 3 steps of 2 x 8 packed rows, held-out loss at step 3."""
    return ["finetune", str(work / "llama"), "--data", str(work / "data.jsonl"), "--out", str(out), "--seq-len", "128",
            "--pack", "--batch-size", "8", "--grad-accum", "2", "--steps", "3", "--eval-every", "3",
            "--eval-fraction", "0.2", "--lr", "1e-3", "--plot", "none", *extra]


def prepare(work: Path) -> None:
    if not (work / "llama").exists():
        make_folder(work / "llama", "llama")
        write_jsonl(work / "data.jsonl", CHATS * 3)


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def layout(node) -> dict[str, list]:
    """path -> the spec of every array of `node` (parameters, or the optimizer's state)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(node)):
        value = var.get_value()
        if isinstance(getattr(value, "sharding", None), NamedSharding):
            out["/".join(map(str, path))] = [a if not isinstance(a, tuple) else list(a) for a in value.sharding.spec]
    return out


def runs(work: Path) -> dict:
    from flax_impl.apps import finetune, finetune_loop
    from flax_impl.apps.cli import main
    from flax_impl.checkpoint import checkpoint_info

    report = {"devices": jax.device_count()}
    for name, extra in RUNS.items():
        out = work / name
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(argv(work, out, *extra))
        assert code == 0, name
        meta = checkpoint_info(out / "checkpoint").metadata
        run = {"train_loss": meta["history"]["train_loss"], "eval_loss": meta["history"]["eval_loss"]}
        report[name] = run
    # The FSDP layout itself: every parameter and AdamW moment split over `data` (and `model` where Megatron does).
    from flax_impl.apps import args as shared

    parser = __import__("argparse").ArgumentParser()
    finetune.add_arguments(parser)
    args = parser.parse_args(argv(work, work / "unused", *RUNS["fsdp2x4"])[1:])
    plan = finetune.make_plan(args)
    mesh = shared.build_mesh(args.mesh, plan.config, [args.batch_size])
    model, optimizer = finetune_loop.load(args, plan, mesh)
    report["fsdp_params"] = layout(nnx.state(model, nnx.Param))
    report["fsdp_opt"] = layout(optimizer.opt_state)
    return report


def restore(work: Path) -> dict:
    """The two-process run's checkpoint onto a (data=2, model=4) mesh of this one process."""
    import flax_impl.hf
    from flax_impl.apps import finetune_step as fs
    from flax_impl.checkpoint import restore_checkpoint
    from flax_impl.distributed import make_mesh

    mesh = make_mesh(data=2, model=4)
    _, model = flax_impl.hf.from_pretrained(work / "llama")
    fs.place_state(model, mesh)
    step = restore_checkpoint(work / "processes" / "checkpoint", model)
    spec = model.blocks.attn.in_proj.kernel.get_value().sharding.spec
    model.eval()
    exported = flax_impl.hf.to_hf_state_dict(model, "llama")
    saved = weights(work / "processes")
    diff = max(float(np.abs(exported[k] - saved[k]).max()) for k in saved)
    return {"step": step, "in_proj_spec": [a if not isinstance(a, tuple) else list(a) for a in spec],
            "max_abs_diff_to_saved_folder": diff, "n_devices": len(model.blocks.attn.in_proj.kernel.get_value()
                                                                   .sharding.device_set)}


if __name__ == "__main__":
    work = Path(sys.argv[1])
    prepare(work)
    print(json.dumps(restore(work) if "--restore" in sys.argv else runs(work)))
