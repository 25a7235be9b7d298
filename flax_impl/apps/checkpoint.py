"""The checkpoints of `flax-impl train`: at every instant one complete checkpoint, whatever was killed before.

Layout of OUT/:
  checkpoint/           the newest complete checkpoint:
    model.safetensors   parameters with torch_ref key names and the TransformerConfig in the metadata
                        (flax_impl.save's format: `torch_ref.Transformer(cfg)` + `safetensors.torch.load_file`
                        + `load_state_dict` reads it);
    train_state.npz     optimizer state (AdamW moments, counts), dropout rng keys/counts, loss history;
    config.json         {"model", "train", "data", "seed", "step", "files": {name: {"bytes", "sha256"}}}: the
                        manifest, written last;
  checkpoint.old/       the previous checkpoint, only while a save swaps in the next;
  .checkpoint-tmp-*/    a save in progress;
  .lock                 the pid of the run writing to OUT (`RunLock`).

A folder is *complete* when its config.json parses and every file it lists has the listed size and sha256.

A save (`save_checkpoint`): (1) write the files into a new .checkpoint-tmp-*, each fsynced, config.json last,
then fsync the folder: the temporary folder is complete; (2) delete checkpoint.old and other temporary folders;
(3) rename checkpoint -> checkpoint.old; (4) rename the temporary folder -> checkpoint; (5) delete
checkpoint.old. Until (1) ends, `checkpoint` (or what an interrupted save left, below) is complete; from then to
(4) the temporary folder is; after (4) `checkpoint` is. A rename is atomic, and only complete folders are ever
renamed to `checkpoint`, so a `checkpoint` folder that is not complete was damaged from outside.

Recovery (`find_checkpoint`, `recover`; every run starts with it, under the lock): the newest complete folder
among checkpoint, checkpoint.old and the temporary folders is installed as `checkpoint` by steps (2)-(5), and
the incomplete ones are deleted. A damaged `checkpoint` is an error naming the bad file, never a silent fallback
to an older copy. A checkpoint written before config.json had a manifest cannot be checked and is refused.

Tests kill a save at each named step (`FAULT_POINTS`): the environment variable FLAX_IMPL_FAULT=POINT[:N] makes
the process exit (`os._exit(FAULT_EXIT)`, no cleanup) the N-th time it reaches POINT (default the first).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CKPT, OLD, TMP_PREFIX, LOCK = "checkpoint", "checkpoint.old", ".checkpoint-tmp-", ".lock"
MODEL_FILE, STATE_FILE, MANIFEST = "model.safetensors", "train_state.npz", "config.json"
FAULT_ENV, FAULT_EXIT = "FLAX_IMPL_FAULT", 137
FAULT_POINTS = (
    "tmp-created",  # (1) the temporary folder exists, empty
    "model-half",  # half of model.safetensors written
    "model-written",
    "state-written",
    "manifest-half",  # half of config.json written
    "tmp-complete",  # (1) done: the temporary folder is complete
    "remove-half",  # one file of a folder being deleted is gone, the rest not
    "stale-removed",  # (2) done
    "old-renamed",  # (3) done: no `checkpoint` folder at this instant
    "new-renamed",  # (4) done
    "old-removed",  # (5) done: the save is over
)
_fault_hits: dict[str, int] = {}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: the message names the file and what is wrong with it."""


def check_fault_spec() -> None:
    """ValueError unless FLAX_IMPL_FAULT is unset or POINT[:N] with POINT in FAULT_POINTS and N >= 1."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point not in FAULT_POINTS or not (nth == "" or (nth.isdigit() and int(nth) >= 1)):
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected POINT[:N], POINT one of {FAULT_POINTS}, N >= 1")


def fault_point(name: str) -> None:
    """Exit the process here, at once, if FLAX_IMPL_FAULT names this point (and this is its N-th visit)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point == name:
        _fault_hits[name] = _fault_hits.get(name, 0) + 1
        if _fault_hits[name] == int(nth or 1):
            os._exit(FAULT_EXIT)


# ------------------------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes, half_point: str | None = None) -> None:
    """Write `data` and fsync it; `half_point` is a fault point after the first half."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        if half_point is not None:
            f.flush()
            fault_point(half_point)
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())


def _remove(folder: Path) -> None:
    """Delete `folder` file by file (a kill may leave it half deleted: it is then incomplete, and ignored)."""
    first = True
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
            if first:
                first = False
                fault_point("remove-half")
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(folder)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's config.json after checking every file it lists (size and sha256).

    Raises:
        CheckpointError: naming the file that is missing, truncated, corrupt or unlisted.
    """
    manifest = folder / MANIFEST
    try:
        meta = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{manifest} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest} is not readable JSON ({err})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, STATE_FILE}:
        raise CheckpointError(
            f"{manifest} has no manifest of {MODEL_FILE} and {STATE_FILE} (written by an older flax-impl train, "
            "whose checkpoints cannot be checked): start a new --out"
        )
    for name, want in files.items():
        path = folder / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing") from None
        if len(data) != want.get("bytes"):
            raise CheckpointError(f"{path} is truncated or overwritten: {len(data)} bytes, its manifest says "
                                  f"{want.get('bytes')}")
        if _sha256(data) != want.get("sha256"):
            raise CheckpointError(f"{path} is corrupt: its sha256 differs from the one in {manifest}")
    return meta


def _complete(folder: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(folder)
    except CheckpointError:
        return None


# ------------------------------------------------------------------------------------------------ save / recover
def checkpoint_files(model: Any, optimizer: Any, history: dict[str, list[float]]) -> dict[str, bytes]:
    """The bytes of model.safetensors (flax_impl.save's format, config in the metadata) and train_state.npz."""
    from safetensors.numpy import save

    from flax_impl.interop import safetensors_metadata, to_numpy_state_dict

    return {
        MODEL_FILE: save(to_numpy_state_dict(model), metadata=safetensors_metadata(model)),
        STATE_FILE: state_bytes(model, optimizer, history),
    }


def save_checkpoint(out: Path, files: dict[str, bytes], meta: dict[str, Any]) -> Path:
    """Write OUT/checkpoint from `files` ({MODEL_FILE, STATE_FILE: bytes}) and `meta` by steps (1)-(5) of the
    module docstring; returns OUT/checkpoint."""
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX))
    fault_point("tmp-created")
    try:
        _write(tmp / MODEL_FILE, files[MODEL_FILE], "model-half")
        fault_point("model-written")
        _write(tmp / STATE_FILE, files[STATE_FILE])
        fault_point("state-written")
        listed = {name: {"bytes": len(data), "sha256": _sha256(data)} for name, data in files.items()}
        _write(tmp / MANIFEST, json.dumps({**meta, "files": listed}, indent=2).encode(), "manifest-half")
        _fsync_dir(tmp)
    except Exception:  # an error (a full disk): no half-written folder left behind; a kill leaves one, ignored
        _remove(tmp)
        raise
    fault_point("tmp-complete")
    return _install(out, tmp)


def _candidates(out: Path) -> list[Path]:
    """checkpoint, checkpoint.old and the temporary folders that exist, in that order."""
    named = [out / CKPT, out / OLD]
    return [p for p in named if p.is_dir()] + sorted(p for p in out.glob(TMP_PREFIX + "*") if p.is_dir())


def _install(out: Path, src: Path) -> Path:
    """Make the complete folder `src` OUT/checkpoint by steps (2)-(5), deleting every other leftover."""
    final, old = out / CKPT, out / OLD
    if src == old:  # the one name step (3) needs: move it out of the way first (a rename: complete throughout)
        moved = Path(tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX))
        os.rmdir(moved)
        os.replace(old, moved)
        src = moved
    for folder in _candidates(out):
        if folder not in (src, final):
            _remove(folder)
    fault_point("stale-removed")
    if src != final:
        if final.exists():
            os.replace(final, old)
            _fsync_dir(out)
            fault_point("old-renamed")
        os.replace(src, final)
        _fsync_dir(out)
        fault_point("new-renamed")
    if old.exists():
        _remove(old)
    fault_point("old-removed")
    return final


def find_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint folder in OUT and its config.json, without changing anything; None if none.

    Raises:
        CheckpointError: OUT/checkpoint exists and is not complete (damaged from outside), naming the file.
    """
    if not out.is_dir():
        return None
    if (out / CKPT).is_dir():
        read_manifest(out / CKPT)
    found = [(folder, meta) for folder in _candidates(out) if (meta := _complete(folder)) is not None]
    if not found:
        return None
    return max(found, key=lambda fm: int(fm[1].get("step", 0)))  # ties: the first, OUT/checkpoint


def recover(out: Path) -> Path | None:
    """Install the newest complete checkpoint as OUT/checkpoint and delete every leftover; returns it, or None
    (leftovers deleted) when OUT holds no complete checkpoint.

    Raises:
        CheckpointError: as `find_checkpoint`.
    """
    best = find_checkpoint(out)
    if best is None:
        for folder in _candidates(out) if out.is_dir() else []:
            _remove(folder)
        return None
    if _candidates(out) == [out / CKPT]:  # nothing to recover, nothing left over
        return out / CKPT
    return _install(out, best[0])


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


# ------------------------------------------------------------------------------------------------ training state
def _flat(state: Any) -> dict[str, Any]:
    from flax import nnx

    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def state_bytes(model: Any, optimizer: Any, history: dict[str, list[float]]) -> bytes:
    """train_state.npz: optimizer state ("opt/..."), dropout rng state ("rng/..."), loss history ("history/...")."""
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
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_state(path: Path, model: Any, optimizer: Any) -> dict[str, list[float]]:
    """Read `state_bytes`'s file into `optimizer` and `model`'s rng state; returns the loss history.

    Raises:
        ValueError: an entry the model needs is missing or has another shape (a different model wrote it).
    """
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
