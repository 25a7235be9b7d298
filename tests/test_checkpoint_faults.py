"""Orbax checkpoints under kills (flax_impl.checkpoint_dir's protocol, as `flax-impl train` uses it).

The save is killed at each of its named points (`FAULT_POINTS`), then the next process is killed at each point
again (every pair: points x points), then a process runs to the end. At every point any process reaches, killed
there or not, OUT must hold a complete step (its files match its checksums.json) whose files are byte for byte
those of a real Orbax step; no kill may lose a step that a finished save wrote; the last clean process leaves
only its own step, which restores with Orbax to that step's values.

The matrix runs in this process, the fault hook raising instead of exiting (and fsync off: a kill keeps the page
cache; what fsync adds, surviving a power cut, no test here can show), each save writing the files that
`save_checkpoint` wrote for its step. `save_checkpoint` itself is killed at every point once. Real kills
(`os._exit` in a subprocess, no cleanup of any kind) check every point twice in a row.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_fault_worker import lifetime
from flax import nnx

from flax_impl import checkpoint_dir as cd
from flax_impl.apps import checkpoint as app
from flax_impl.checkpoint import CheckpointError, restore_checkpoint, save_checkpoint

WORKER = Path(__file__).with_name("checkpoint_fault_worker.py")
ROOT = Path(__file__).resolve().parents[1]
STEPS = range(1, 5)


class Killed(BaseException):
    """The in-process stand-in for a kill: no `except Exception` cleanup runs."""


class Tiny(nnx.Module):
    """A model whose values say which step saved it."""

    def __init__(self, step: int):
        self.w = nnx.Param(jnp.full((3,), float(step)))
        self.rngs = nnx.Rngs(step)


def _restored(out: Path) -> int:
    """The newest step of OUT read back with Orbax (checksums verified); asserts its values are that step's."""
    model = Tiny(0)
    step = restore_checkpoint(out, model)
    np.testing.assert_array_equal(model.w[...], np.full(3, float(step)))
    return step


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """SOURCE/<step>/: the files save_checkpoint writes for steps 1..4, less checksums.json."""
    saved, source = tmp_path_factory.mktemp("saved"), tmp_path_factory.mktemp("source")
    for step in STEPS:
        save_checkpoint(saved, Tiny(step), step=step)
        shutil.copytree(saved / str(step), source / str(step), ignore=shutil.ignore_patterns(cd.MANIFEST))
    return source


def _check(out: Path, source: Path) -> int:
    """The invariant: the newest step is complete (every file as its checksums.json lists it) and holds its step's
    files, byte for byte (by sha256); returns its step."""
    steps = cd.step_folders(out)
    assert steps, f"no step in {sorted(os.listdir(out))}"
    step = max(steps)
    files = cd.verify_step(steps[step])["files"]
    assert {name: f["sha256"] for name, f in files.items()} == _digests(source / str(step)), step
    return step


@functools.cache
def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def _process(monkeypatch, out: Path, source: Path, kill_at: str | None, seen: list[int]) -> bool:
    """One process lifetime, killed at the first visit of `kill_at`; True if it was. At every point visited,
    the invariant is checked (once a first step exists) and the step found appended to `seen`."""
    def fault(name: str) -> None:
        seen.append(_check(out, source) if any(seen) or cd.step_folders(out) else 0)
        if name == kill_at:
            raise Killed(name)

    monkeypatch.setattr(cd, "fault_point", fault)
    try:
        lifetime(out, source)
    except Killed:
        return True
    return False


def test_every_pair_of_kill_points_leaves_a_complete_checkpoint(tmp_path, monkeypatch, source):
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    visits = 0
    for first in cd.FAULT_POINTS:
        for second in cd.FAULT_POINTS:
            out = tmp_path / f"{first}+{second}"
            seen: list[int] = []
            assert not _process(monkeypatch, out, source, None, seen) and _check(out, source) == 1
            assert _process(monkeypatch, out, source, first, seen), f"the save never reached {first}"
            s1 = _check(out, source)
            assert s1 == (2 if cd.FAULT_POINTS.index(first) >= cd.FAULT_POINTS.index("new-renamed") else 1)
            killed = _process(monkeypatch, out, source, second, seen)
            s2 = _check(out, source)
            assert s2 == s1 + 1 or (killed and s2 == s1), (first, second, s1, s2)
            assert not _process(monkeypatch, out, source, None, seen)
            assert _check(out, source) == s2 + 1
            assert sorted(os.listdir(out)) == [str(s2 + 1)], (first, second)
            first_save = seen.index(1)  # the first process's save, before its folder was installed: none yet
            assert min(seen[first_save:]) >= 1  # from then on, at every point visited, a complete checkpoint
            visits += len(seen)
    assert visits > 2 * len(cd.FAULT_POINTS) ** 2
    assert _restored(out) == s2 + 1


def test_save_checkpoint_killed_at_each_point_keeps_the_newest_saved_step(tmp_path, monkeypatch):
    """The Orbax save itself (not a copy of its files), killed once at each point, keeping one step."""
    for point in cd.FAULT_POINTS:
        out = tmp_path / point
        save_checkpoint(out, Tiny(1), step=1, max_to_keep=1)

        def fault(name: str, point=point) -> None:
            if name == point:
                raise Killed(name)

        monkeypatch.setattr(cd, "fault_point", fault)
        with pytest.raises(Killed):
            save_checkpoint(out, Tiny(2), step=2, max_to_keep=1)
        monkeypatch.undo()
        step = _restored(out)
        assert step == (2 if cd.FAULT_POINTS.index(point) >= cd.FAULT_POINTS.index("new-renamed") else 1), point
        save_checkpoint(out, Tiny(step + 1), step=step + 1, max_to_keep=1)
        assert sorted(os.listdir(out)) == [str(step + 1)] and _restored(out) == step + 1


@pytest.mark.parametrize("point", cd.FAULT_POINTS)
def test_real_kills_twice_at_the_same_point_then_resume(tmp_path, source, point):
    out = tmp_path / "out"
    lifetime(out, source)  # step 1, in this process
    env = {**os.environ, cd.FAULT_ENV: point, "PYTHONPATH": os.pathsep.join([str(ROOT), str(WORKER.parent)])}
    codes = []
    for _ in range(2):
        run = subprocess.run([sys.executable, str(WORKER), str(out), str(source)], env=env, capture_output=True)
        codes.append(run.returncode)
        assert run.returncode in (0, cd.FAULT_EXIT), run.stderr.decode()
        _check(out, source)
    assert codes[0] == cd.FAULT_EXIT  # the first save is killed at `point`
    s2 = _check(out, source)
    assert lifetime(out, source) == s2 + 1 and _check(out, source) == s2 + 1
    assert sorted(os.listdir(out)) == [str(s2 + 1)]


def test_a_damaged_newest_step_names_the_file_and_is_never_skipped(tmp_path, source, monkeypatch):
    """flax-impl train's start: the newest step is read whole; an older complete step is no fallback."""
    run = tmp_path / "run"
    out = run / app.CKPT
    lifetime(out, source)

    def fault(name: str) -> None:
        if name == "new-renamed":
            raise Killed(name)

    monkeypatch.setattr(cd, "fault_point", fault)
    with pytest.raises(Killed):  # steps 1 and 2 both installed: a kill before the older one was deleted
        lifetime(out, source)
    monkeypatch.undo()
    assert sorted(cd.step_folders(out)) == [1, 2] and app.find_checkpoint(run).step == 2
    step = out / "2"
    data = next(p for p in sorted(step.rglob("*")) if p.is_file() and p.parent.name == "d")
    good = data.read_bytes()
    cases = [
        (lambda: data.unlink(), f"{data} is missing"),
        (lambda: data.write_bytes(good[:10]), f"{data} is truncated or overwritten: 10 bytes"),
        (lambda: data.write_bytes(good[:-1] + bytes([good[-1] ^ 1])), f"{data} is corrupt: its sha256 differs"),
        (lambda: (step / cd.MANIFEST).unlink(), f"{step / cd.MANIFEST} is missing"),
    ]
    manifest = (step / cd.MANIFEST).read_bytes()
    for damage, message in cases:
        damage()
        with pytest.raises(CheckpointError, match="^" + re.escape(message)):
            app.find_checkpoint(run)
        data.write_bytes(good)
        (step / cd.MANIFEST).write_bytes(manifest)
    assert app.find_checkpoint(run).step == 2


def test_the_lock_admits_one_run_and_frees_itself_when_its_process_dies(tmp_path):
    with app.RunLock(tmp_path):
        assert (tmp_path / app.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=rf"in use by another flax-impl train \(pid {os.getpid()}, lock"):
            app.RunLock(tmp_path).acquire()
    assert not (tmp_path / app.LOCK).exists()
    # A process that took the lock and died without a word: its file stays, its lock does not.
    code = "import sys; from pathlib import Path; from flax_impl.apps.checkpoint import RunLock; " \
           "import os; RunLock(Path(sys.argv[1])).acquire(); os._exit(9)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env).returncode == 9
    assert (tmp_path / app.LOCK).read_text().strip().isdigit()
    with app.RunLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_fault_spec_is_checked(monkeypatch):
    for bad in ("nowhere", "tmp-complete:0", "tmp-complete:x"):
        monkeypatch.setenv(cd.FAULT_ENV, bad)
        with pytest.raises(ValueError, match=f"{cd.FAULT_ENV}={bad!r}: expected POINT"):
            cd.check_fault_spec()
    monkeypatch.setenv(cd.FAULT_ENV, "old-renamed:2")
    cd.check_fault_spec()
