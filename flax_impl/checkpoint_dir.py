"""Checkpoint folders that survive any kill: step folders written under a temporary name, listed with their sizes
and sha256 in a manifest, then renamed. Whatever writes the files (Orbax, in `flax_impl.checkpoint`) is a
callback; this module imports only the standard library.

Layout of a checkpoint directory:
    <step>/                 a complete step: the files the writer wrote and `checksums.json`, the manifest
                            {"format", "step", "files": {relative path: {"bytes", "sha256"}}}, written last;
    .tmp-<step>-*/          a save in progress, a killed save's leftover, or an older step being deleted.

A save (`write_step`): (1) delete the leftovers (temporary folders); (2) write the files into a new temporary
folder, fsync each, write checksums.json, fsync the folder; (3) rename it to <step>; (4) for each step beyond
`keep`, rename it to a temporary name and delete it. A rename is atomic and only a complete folder is ever
renamed to a step's name, and a step leaves its name only by a rename, so every <step> folder is complete unless
it was damaged from outside. The steps installed before a save stay until (3) is done: at every instant the
directory holds the newest complete step that a finished save wrote, or a newer one.

`verify_step` reads every file of a step against its manifest: a missing, truncated or changed file is a
`CheckpointError` naming it (a flipped byte changes the sha256).

Tests kill a save at each named point (`FAULT_POINTS`): the environment variable FLAX_IMPL_FAULT=POINT[:N] makes
the process exit (`os._exit(FAULT_EXIT)`, no cleanup) the N-th time it reaches POINT (default the first).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST, TMP_PREFIX, FORMAT = "checksums.json", ".tmp-", "flax_impl.checkpoint/1"
FAULT_ENV, FAULT_EXIT = "FLAX_IMPL_FAULT", 137
FAULT_POINTS = (
    "stale-removed",  # (1) done: no leftover of an earlier save
    "tmp-created",  # the temporary folder exists, empty
    "items-written",  # the writer is done; nothing fsynced, no manifest
    "manifest-half",  # half of checksums.json written
    "tmp-complete",  # (2) done: the temporary folder is complete
    "new-renamed",  # (3) done: the new step is installed, the older ones are still there
    "old-renamed",  # (4) a step beyond `keep` renamed to a temporary name
    "remove-half",  # one file of a folder being deleted is gone, the rest not
    "old-removed",  # (4) done: the save is over
)
_fault_hits: dict[str, int] = {}
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as saved: the message names the file and what is wrong with it."""


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
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[str]:
    """Every file under `folder` as a relative POSIX path, sorted."""
    return sorted(
        Path(root, name).relative_to(folder).as_posix() for root, _, names in os.walk(folder) for name in names
    )


def _sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _remove(folder: Path) -> None:
    """Delete `folder` file by file (a kill may leave it half deleted; only temporary folders are deleted)."""
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


def step_folders(directory: str | os.PathLike) -> dict[int, Path]:
    """{step: folder} of the step folders of `directory` (names that are integers >= 0); {} if there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def temporary_folders(directory: str | os.PathLike) -> list[Path]:
    """The leftovers of saves (in progress or killed) and of deletions in `directory`."""
    directory = Path(directory)
    return sorted(p for p in directory.glob(TMP_PREFIX + "*") if p.is_dir()) if directory.is_dir() else []


# ------------------------------------------------------------------------------------------------ write / verify
def write_step(
    directory: str | os.PathLike, step: int, write: Callable[[Path], None], *, keep: int | None = None
) -> Path:
    """Write step `step` of `directory` by steps (1)-(4) of the module docstring; returns its folder.

    The caller ensures a single writer per directory: leftovers of other saves are deleted.

    Args:
        directory: the checkpoint directory (created if missing).
        step: the new step (its folder must not exist).
        write: writes the step's files into the folder it is given, which exists and is empty; it may replace
            it (Orbax writes `<folder>.orbax-checkpoint-tmp` and renames it), naming any other folder it makes
            `<folder>.*`.
        keep: keep only the newest this many steps; None: all.

    Returns:
        directory/<step>.

    Raises:
        Whatever `write` raises (OSError for a full disk included): the temporary folder is deleted first, and
        the steps already in `directory` are untouched.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for folder in temporary_folders(directory):
        _remove(folder)
    fault_point("stale-removed")
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f"{TMP_PREFIX}{step}-"))
    fault_point("tmp-created")
    try:
        write(tmp)
        fault_point("items-written")
        listed = {}
        for name in _files(tmp):
            _fsync(tmp / name)
            size, digest = _sha256(tmp / name)
            listed[name] = {"bytes": size, "sha256": digest}
        for root, _, _ in os.walk(tmp, topdown=False):  # every folder Orbax made, then the step's own
            _fsync(Path(root))
        manifest = json.dumps({"format": FORMAT, "step": step, "files": listed}, indent=1).encode()
        with open(tmp / MANIFEST, "wb") as f:
            f.write(manifest[: len(manifest) // 2])
            f.flush()
            fault_point("manifest-half")
            f.write(manifest[len(manifest) // 2 :])
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
    except (Exception, KeyboardInterrupt):  # a full disk, Ctrl-C: nothing half-written left behind
        for folder in [tmp, *directory.glob(glob.escape(tmp.name) + ".*")]:  # and the writer's own temporaries
            if folder.is_dir():
                _remove(folder)
        raise
    fault_point("tmp-complete")
    final = directory / str(step)
    os.rename(tmp, final)  # refuses an existing (non-empty) folder of the same step
    _fsync(directory)
    fault_point("new-renamed")
    if keep is not None:
        for old in sorted(step_folders(directory))[:-keep]:
            trash = Path(tempfile.mkdtemp(dir=directory, prefix=f"{TMP_PREFIX}{old}-deleted-"))
            os.rmdir(trash)
            os.rename(step_folders(directory)[old], trash)
            fault_point("old-renamed")
            _remove(trash)
        _fsync(directory)
    fault_point("old-removed")
    return final


def verify_step(folder: str | os.PathLike) -> dict[str, Any]:
    """The step folder's manifest after checking every file it lists (size and sha256).

    Args:
        folder: a step folder written by `write_step`.

    Returns:
        The manifest: {"format", "step", "files"}.

    Raises:
        CheckpointError: naming the manifest when it is missing, not JSON or not a manifest of this folder, or the
            file that is missing, truncated, overwritten or corrupt.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the step cannot be checked (written by an older flax_impl, "
                              "or not by save_checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err})") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files or meta.get("format") != FORMAT or str(meta.get("step")) != folder.name:
        raise CheckpointError(f"{path} is not the manifest of step {folder.name} ({FORMAT})")
    for name, want in sorted(files.items()):
        file = folder / name
        try:
            size, digest = _sha256(file)
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing") from None
        if not isinstance(want, dict) or size != want.get("bytes"):
            raise CheckpointError(f"{file} is truncated or overwritten: {size} bytes, {path} says "
                                  f"{want.get('bytes') if isinstance(want, dict) else want!r}")
        if digest != want.get("sha256"):
            raise CheckpointError(f"{file} is corrupt: its sha256 differs from the one in {path}")
    return meta


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Write one file so that readers see the old file or the new one, never half of one: `write(tmp)` fills a
    temporary file beside `path` (mode 0644, as a plain `open` would give it), then it replaces `path`; on any
    error (a full disk, Ctrl-C) the temporary file is removed and the old file stays."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp (and some writers) make it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

