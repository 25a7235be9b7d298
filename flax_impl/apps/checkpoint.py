"""Where `flax-impl train` keeps its state: the library's Orbax checkpoints (`flax_impl.checkpoint`, kill-safe,
with checksums) in OUT/checkpoint, a safetensors copy of the weights for PyTorch, and a lock.

Layout of OUT/:
  checkpoint/<step>/    the newest checkpoint: model (parameters, dropout rng streams), optimizer (AdamW state and
                        step), config (the TransformerConfig), metadata (the run's options and loss history) and
                        checksums.json, the size and sha256 of every file, written last;
  checkpoint/.tmp-*/    a save in progress, or one that a kill interrupted (deleted by the next save);
  model.safetensors     the weights of the newest checkpoint with torch_ref's key names and the config in the
                        metadata (`flax_impl.interop.save`), for PyTorch; written after each checkpoint;
  .lock                 the pid of the run writing to OUT (`RunLock`).

At every instant OUT/checkpoint holds the newest step that a finished save wrote, or a newer complete one
(`flax_impl.checkpoint_dir`); only the newest is kept. Before any work a run reads every file of the newest step
against its checksums: a damaged step is an error naming the file, never a silent fallback to an older step.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from flax_impl.checkpoint_dir import TMP_PREFIX, CheckpointError, step_folders

CKPT, EXPORT, LOCK = "checkpoint", "model.safetensors", ".lock"


def find_checkpoint(out: Path) -> Any:
    """The newest step of OUT/checkpoint (a `flax_impl.checkpoint.CheckpointInfo`), its files checked; None if none.

    Raises:
        CheckpointError: a file of the newest step is missing, truncated or corrupt (named); OUT/checkpoint
            holds files that are not steps (an older flax-impl train's layout).
    """
    folder = out / CKPT
    if not folder.is_dir():
        return None
    strays = sorted(p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX) and not p.name.isdigit())
    if strays:
        raise CheckpointError(f"{folder} holds {strays[:3]}, not checkpoint steps (an older flax-impl train wrote "
                              "safetensors + npz there?): start a new --out")
    if not step_folders(folder):
        return None
    from flax_impl.checkpoint import checkpoint_info

    return checkpoint_info(folder)


def check_resumable(info: Any, run: dict[str, Any], stop: int) -> None:
    """CheckpointError (naming the step's folder) unless the run `run` ({"model", "train", "data", "seed"}) can
    continue the checkpoint `info` (a `flax_impl.checkpoint.CheckpointInfo`): the same model and data options,
    gradient clipping on or off as saved (the optimizer state differs), the same seed, and `stop` past the
    saved step."""
    meta = info.metadata or {}
    if info.config is None or not {"train", "data", "seed", "history"} <= set(meta):
        raise CheckpointError(f"{info.path} has no model config or run options: not written by flax-impl train")
    saved_parts = {"model": info.config, "data": meta["data"]}
    for part in ("model", "data"):
        saved, given = saved_parts[part], json.loads(json.dumps(run[part]))  # JSON's types on both sides
        diff = [f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}" for k in sorted(set(saved) | set(given))
                if saved.get(k) != given.get(k)]
        if diff:
            raise CheckpointError(f"--resume with other {part} options than {info.path}: " + "; ".join(diff))
    if (meta["train"].get("clip_norm") is None) != (run["train"]["clip_norm"] is None):
        raise CheckpointError(f"--resume cannot switch gradient clipping on or off ({info.path}: the optimizer "
                              "state differs)")
    if meta["seed"] != run["seed"]:
        raise CheckpointError(f"--resume with --seed={run['seed']}, {info.path} used --seed={meta['seed']}")
    if stop <= info.step:
        raise CheckpointError(f"{info.path} is at step {info.step}: --stop-at / --steps={stop} leaves nothing "
                              "to train")


def prepare(out: Path, run: dict[str, Any], *, resume: bool, stop: int) -> Any:
    """Under the lock, before any work: the checkpoint to resume (every file and option checked, see
    `check_resumable`) or None for a new run.

    Raises:
        ValueError: OUT holds a checkpoint and not `resume`, or holds none and `resume`; CheckpointError as
            `find_checkpoint` and `check_resumable`.
    """
    found = find_checkpoint(out)
    if not resume:
        if found is not None:
            raise ValueError(
                f"{str(out)!r} holds a checkpoint (step {found.step}, {str(found.path)!r}): pass --resume to "
                "continue it, or another --out"
            )
        return None
    if found is None:
        raise ValueError(f"--resume: no complete checkpoint in {str(out)!r}")
    check_resumable(found, run, stop)
    return found


def save_run(out: Path, model: Any, optimizer: Any, step: int, metadata: dict[str, Any], export: bool) -> Path:
    """Save step `step` as the only step of OUT/checkpoint, then (if `export`) OUT/model.safetensors; returns the
    step's folder.

    Raises:
        OSError: a write failed (a full disk); the previous checkpoint is intact.
    """
    from flax_impl.checkpoint import save_checkpoint

    folder = Path(save_checkpoint(out / CKPT, model, optimizer, step=step, max_to_keep=1, metadata=metadata))
    if export:
        from flax_impl.interop import save as save_safetensors

        for stale in glob.glob(os.path.join(glob.escape(str(out)), ".tmp-*.safetensors")):  # killed exports
            os.unlink(stale)
        save_safetensors(model, out / EXPORT)
    return folder


# ------------------------------------------------------------------------------------------------ lock
class RunLock:
    """OUT/.lock: one run at a time per output folder.

    An exclusive `flock` on the file, which the kernel releases when its process ends however it ends, so the lock
    of a killed run is free at once (a stale file is taken over); the file holds the owner's pid for the message.

    Args:
        out: the output folder (it must exist).

    Raises:
        ValueError: from `acquire`, when another live process holds the lock (its pid in the message).
    """

    def __init__(self, out: Path):
        self.path, self.fd = Path(out) / LOCK, None

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by a live process (other errors, e.g. no locks on this filesystem, rise)
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ValueError(
                    f"--out {str(self.path.parent)!r} is in use by another flax-impl train (pid {owner}, lock "
                    f"{str(self.path)!r}): wait for it to end, or choose another --out"
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the file we locked may have been unlinked by a releasing owner: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a waiting opener then retries on a new file
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
