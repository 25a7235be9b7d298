"""`flax-impl train`'s checkpoints under kills (flax_impl.apps.checkpoint).

The save is killed at each of its named points (`FAULT_POINTS`), then the next process is killed at each point
again (every pair: points x points), then a process runs to the end. At every point any process reaches, killed
there or not, OUT must hold a complete checkpoint (`find_checkpoint`), whose files are byte for byte those of its
step; no kill may lose a step that a finished save wrote; the last clean process leaves only `checkpoint`.

Most of the matrix runs in this process, the fault hook raising instead of exiting (and fsync off: a kill keeps
the page cache; what fsync adds, surviving a power cut, no test here can show). Real kills (`os._exit` in a
subprocess, no cleanup of any kind) check every point twice in a row.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoint_fault_worker import lifetime

from flax_impl.apps import checkpoint as ck

WORKER = Path(__file__).with_name("checkpoint_fault_worker.py")
ROOT = Path(__file__).resolve().parents[1]


class Killed(BaseException):
    """The in-process stand-in for a kill: no `except Exception` cleanup runs."""


@pytest.fixture(scope="module")
def files() -> dict[int, dict[str, bytes]]:
    """The contents of steps 1..4, different for each step and file. Placeholders: what is tested is that the
    files found after any kills are byte for byte those a save wrote (the train CLI's test loads real ones after
    a real kill and resumes bit for bit)."""
    rng = np.random.default_rng(0)
    return {
        step: {name: rng.bytes(size) for name, size in ((ck.MODEL_FILE, 5000 + step), (ck.STATE_FILE, 9000))}
        for step in range(1, 5)
    }


def _check(out: Path, files: dict[int, dict[str, bytes]]) -> int:
    """The invariant: a complete checkpoint exists and holds its step's files; returns its step."""
    found = ck.find_checkpoint(out)
    assert found is not None, f"no complete checkpoint in {sorted(os.listdir(out))}"
    folder, meta = found
    for name, data in files[meta["step"]].items():
        assert (folder / name).read_bytes() == data, (folder, name)
    return int(meta["step"])


def _process(monkeypatch, out: Path, files: dict, kill_at: str | None, seen: list[int]) -> bool:
    """One process lifetime, killed at the first visit of `kill_at`; True if it was. At every point visited,
    the invariant is checked (once a first checkpoint exists) and the step found appended to `seen`."""
    def fault(name: str) -> None:
        seen.append(_check(out, files) if any(seen) or ck.find_checkpoint(out) else 0)
        if name == kill_at:
            raise Killed(name)

    monkeypatch.setattr(ck, "fault_point", fault)
    try:
        lifetime(out, files)
    except Killed:
        return True
    return False


def test_every_pair_of_kill_points_leaves_a_complete_checkpoint(tmp_path, monkeypatch, files):
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    visits = 0
    for first in ck.FAULT_POINTS:
        for second in ck.FAULT_POINTS:
            out = tmp_path / f"{first}+{second}"
            out.mkdir()
            seen: list[int] = []
            assert not _process(monkeypatch, out, files, None, seen) and _check(out, files) == 1
            assert _process(monkeypatch, out, files, first, seen), f"the save never reached {first}"
            s1 = _check(out, files)
            assert s1 in (1, 2)  # step 1 was saved; step 2 only if its folder was complete when killed
            killed = _process(monkeypatch, out, files, second, seen)
            s2 = _check(out, files)
            assert s2 == s1 + 1 or (killed and s2 == s1), (first, second, s1, s2)
            assert not _process(monkeypatch, out, files, None, seen)
            assert _check(out, files) == s2 + 1
            assert sorted(os.listdir(out)) == [ck.CKPT], (first, second)
            first_save = seen.index(1)  # the first process's save, before its folder was installed: none yet
            assert min(seen[first_save:]) >= 1  # from then on, at every point visited, a complete checkpoint
            visits += len(seen)
    assert visits > 2 * len(ck.FAULT_POINTS) ** 2


@pytest.mark.parametrize("point", ck.FAULT_POINTS)
def test_real_kills_twice_at_the_same_point_then_resume(tmp_path, files, point):
    source = tmp_path / "files"
    for step, contents in files.items():
        (source / str(step)).mkdir(parents=True)
        for name, data in contents.items():
            (source / str(step) / name).write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    lifetime(out, files)  # step 1, in this process
    env = {**os.environ, ck.FAULT_ENV: point, "PYTHONPATH": os.pathsep.join([str(ROOT), str(WORKER.parent)])}
    codes = []
    for _ in range(2):
        run = subprocess.run([sys.executable, str(WORKER), str(out), str(source)], env=env, capture_output=True)
        codes.append(run.returncode)
        assert run.returncode in (0, ck.FAULT_EXIT), run.stderr.decode()
        _check(out, files)
    assert codes[0] == ck.FAULT_EXIT  # the first save is killed at `point`
    s2 = _check(out, files)
    assert lifetime(out, files) == s2 + 1 and _check(out, files) == s2 + 1
    assert sorted(os.listdir(out)) == [ck.CKPT]


def test_a_damaged_checkpoint_names_the_file_and_is_never_skipped(tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    lifetime(out, files)
    lifetime(out, files)
    ckpt = out / ck.CKPT
    state = ckpt / ck.STATE_FILE
    good = state.read_bytes()
    cases = [
        (lambda: state.unlink(), f"{state} is missing"),
        (lambda: state.write_bytes(good[:100]), f"{state} is truncated or overwritten: 100 bytes"),
        (lambda: state.write_bytes(good[:-1] + bytes([good[-1] ^ 1])), f"{state} is corrupt: its sha256 differs"),
        (lambda: (ckpt / ck.MANIFEST).write_text("{"), f"{ckpt / ck.MANIFEST} is not readable JSON"),
        (lambda: (ckpt / ck.MANIFEST).write_text('{"step": 2}'), f"{ckpt / ck.MANIFEST} has no manifest of"),
    ]
    manifest = (ckpt / ck.MANIFEST).read_bytes()
    (out / ck.OLD).mkdir()  # an older complete copy must not be used in its place
    for name, data in files[1].items():
        (out / ck.OLD / name).write_bytes(data)
    for damage, message in cases:
        damage()
        with pytest.raises(ck.CheckpointError, match="^" + re.escape(message)):
            ck.find_checkpoint(out)
        with pytest.raises(ck.CheckpointError):
            ck.recover(out)
        state.write_bytes(good)
        (ckpt / ck.MANIFEST).write_bytes(manifest)
    assert ck.find_checkpoint(out)[1]["step"] == 2


def test_the_lock_admits_one_run_and_frees_itself_when_its_process_dies(tmp_path):
    with ck.RunLock(tmp_path):
        assert (tmp_path / ck.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=rf"in use by another flax-impl train \(pid {os.getpid()}, lock"):
            ck.RunLock(tmp_path).acquire()
    assert not (tmp_path / ck.LOCK).exists()
    # A process that took the lock and died without a word: its file stays, its lock does not.
    code = "import sys; from pathlib import Path; from flax_impl.apps.checkpoint import RunLock; " \
           "import os; RunLock(Path(sys.argv[1])).acquire(); os._exit(9)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env).returncode == 9
    assert (tmp_path / ck.LOCK).read_text().strip().isdigit()
    with ck.RunLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_fault_spec_is_checked(monkeypatch):
    for bad in ("nowhere", "tmp-complete:0", "tmp-complete:x"):
        monkeypatch.setenv(ck.FAULT_ENV, bad)
        with pytest.raises(ValueError, match=f"{ck.FAULT_ENV}={bad!r}: expected POINT"):
            ck.check_fault_spec()
    monkeypatch.setenv(ck.FAULT_ENV, "old-renamed:2")
    ck.check_fault_spec()


@pytest.mark.parametrize("name", [ck.OLD, ck.TMP_PREFIX + "left"])
def test_a_lone_complete_copy_is_recovered_whatever_its_name(tmp_path, files, name):
    """No `checkpoint` folder, only checkpoint.old (its temporary successor deleted by hand) or only a complete
    temporary folder (the very first save killed before its rename), beside an incomplete temporary folder."""
    out = tmp_path / "out"
    out.mkdir()
    lifetime(out, files)
    os.rename(out / ck.CKPT, out / name)
    (out / (ck.TMP_PREFIX + "torn")).mkdir()
    (out / (ck.TMP_PREFIX + "torn") / ck.MODEL_FILE).write_bytes(files[2][ck.MODEL_FILE][:10])
    assert ck.find_checkpoint(out)[0] == out / name
    assert ck.recover(out) == out / ck.CKPT
    assert sorted(os.listdir(out)) == [ck.CKPT] and _check(out, files) == 1
