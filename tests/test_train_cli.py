"""`flax-impl train` end to end: one tiny run, shared, whose checkpoint restores and whose safetensors copy loads
into torch_ref; a run killed mid-save, resumed, interrupted by a real Ctrl-C and resumed again replays it bit for
bit (without safetensors installed for the last part); a non-finite loss and a full disk keep the last
checkpoint; bad input (an option, a path, a checkpoint file, a second run on --out) fails with exit 2 before any
work."""

import argparse
import contextlib
import errno
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file

import flax_impl as fi
import torch_ref as tr
from flax_impl import checkpoint as lib, checkpoint_dir as cd
from flax_impl.apps import checkpoint as ck, corpus, train
from flax_impl.apps.cli import main as cli_main
from flax_impl.saved_config import CONFIG_KEY
from flax_impl.tolerances import TRAIN_REL
from flax_impl.train import make_optimizer

ROOT = Path(__file__).resolve().parents[1]

TINY = ["train", "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--d-model", "16", "--n-layers", "1",
        "--n-heads", "2", "--warmup", "2", "--eval-every", "2", "--eval-batches", "2", "--corpus-mb", "0.2"]
# `flax-impl train` in a subprocess, with the test suite's matmul precision; SIGINT_AFTER=N sends the process a
# real SIGINT (Ctrl-C) from inside its N-th optimizer step, so that it arrives at a known step.
LAUNCH = """
import os, signal, sys, jax
jax.config.update("jax_default_matmul_precision", "highest")
import flax_impl.train as t
after, real, calls = int(os.environ.get("SIGINT_AFTER", 0)), t.train_step, []
def train_step(*args):
    calls.append(1)
    if len(calls) == after:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args)
t.train_step = train_step
from flax_impl.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _launch(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", LAUNCH, *argv], env=env, capture_output=True, text=True)


def _state(out: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The run's metadata (options, loss history) and every array of its checkpoint (parameters, rng streams,
    AdamW state), restored with Orbax into abstract modules."""
    info = lib.checkpoint_info(out / ck.CKPT)
    cfg = fi.TransformerConfig.from_dict(info.config)
    tcfg = fi.TrainConfig.from_dict(info.metadata["train"])
    model = lib.abstract(lambda: fi.Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = lib.abstract(lambda: make_optimizer(fi.Transformer(cfg, rngs=nnx.Rngs(0)), tcfg))
    lib.restore_checkpoint(out / ck.CKPT, model, opt)
    arrays = {}
    for prefix, node in (("model/", model), ("opt/", opt)):
        for path, var in nnx.to_flat_state(nnx.state(node)):
            value = var.get_value()
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
            arrays[prefix + "/".join(map(str, path))] = np.asarray(value)
    return {**info.metadata, "step": info.step}, arrays


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, str, str]:
    """The uninterrupted tiny run: (OUT, stdout, stderr)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main([*TINY, "--out", str(out), "--plot", str(out.parent / "loss.png")])
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.mark.slow
def test_cli_trains_and_its_safetensors_copy_loads_into_torch(whole):
    out, printed, log = whole
    assert "final held-out loss" in printed and "unigram entropy" in printed
    assert f"checkpoint {out / ck.CKPT / '6'}, weights for PyTorch {out / ck.EXPORT}" in printed
    assert (out.parent / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [ck.CKPT, ck.EXPORT]
    assert sorted(p.name for p in (out / ck.CKPT).iterdir()) == ["6"]
    # Progress a log can read: plain lines (stderr is not a terminal here), no carriage returns.
    assert "\r" not in log and "training (the first step compiles)\n" in log
    # The safetensors copy holds the checkpoint's parameters, bit for bit, and loads into torch_ref with the
    # config from its own metadata; both compute the same logits.
    meta, arrays = _state(out)
    assert meta["step"] == 6 and meta["history"]["train_step"] == [1, 2, 3, 4, 5, 6]
    with safe_open(str(out / ck.EXPORT), framework="numpy") as f:
        cfg = fi.TransformerConfig.from_dict(json.loads(f.metadata()[CONFIG_KEY]))
    model = fi.Transformer(cfg, rngs=nnx.Rngs(5))
    lib.restore_checkpoint(out / ck.CKPT, model)
    exported = load_file(out / ck.EXPORT)
    assert all(np.array_equal(exported[k].numpy(), v) for k, v in fi.to_numpy_state_dict(model).items())
    twin = tr.Transformer(cfg).eval()
    twin.load_state_dict(exported)
    model.eval()
    ids = np.random.default_rng(0).integers(4, 260, size=(2, 12))
    want = twin.logits(twin(torch.as_tensor(ids))).detach().numpy()
    got = np.asarray(model.logits(model(ids)))
    np.testing.assert_allclose(got, want, rtol=0, atol=TRAIN_REL * np.abs(want).max())


class Killed(BaseException):
    """An in-process kill: no `except Exception` cleanup runs, nothing after it is written."""


@pytest.mark.slow
def test_killed_then_interrupted_runs_resume_bit_for_bit(whole, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pieces"
    argv = [*TINY, "--out", str(out), "--plot", "none"]

    def kill_in_second_save(name: str) -> None:
        if name == "tmp-complete" and cd.temporary_folders(out / ck.CKPT)[0].name.startswith(cd.TMP_PREFIX + "4-"):
            raise Killed(name)

    # Killed in the save of step 4, its folder complete but not yet renamed: step 2 stays the checkpoint, beside
    # a complete temporary folder (real kills at every point: tests/test_checkpoint_faults.py).
    monkeypatch.setattr(cd, "fault_point", kill_in_second_save)
    with pytest.raises(Killed):
        cli_main(argv)
    monkeypatch.undo()
    assert sorted(cd.step_folders(out / ck.CKPT)) == [2] and cd.temporary_folders(out / ck.CKPT)
    # Resumed in a process of its own, which gets a real SIGINT (Ctrl-C) during step 3: the step ends, is saved,
    # and the process says how to resume, without a traceback.
    stopped = _launch([*argv, "--resume"], SIGINT_AFTER="1")
    assert stopped.returncode == train.INTERRUPTED, stopped.stderr
    assert "Traceback" not in stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert lines[-2].startswith("flax-impl train: interrupted after step 3 of 6 (train loss ")
    assert lines[-2].endswith(f"): checkpoint {out / ck.CKPT / '3'}")
    assert lines[-1] == f"resume with: {shlex.join(['flax-impl', *argv, '--resume'])}"
    assert sorted(p.name for p in (out / ck.CKPT).iterdir()) == ["3"]
    # The printed command, in this process, without safetensors (a core-only install): it trains to the end.
    monkeypatch.setitem(sys.modules, "safetensors", None)
    exported = (out / ck.EXPORT).read_bytes()
    assert cli_main(shlex.split(lines[-1].removeprefix("resume with: "))[1:]) == 0
    printed = capsys.readouterr().out
    assert "steps 3 -> 6 of 6" in printed and f"no {out / ck.EXPORT} for PyTorch: pip install safetensors" in printed
    assert (out / ck.EXPORT).read_bytes() == exported  # not rewritten
    assert sorted(p.name for p in out.iterdir()) == [ck.CKPT, ck.EXPORT]
    (want_meta, want), (got_meta, got) = _state(whole[0]), _state(out)
    assert got_meta == want_meta  # the loss history included: every float equal
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    moments = [v for k, v in want.items() if "/mu/" in k]
    assert moments and all(np.abs(v).max() > 0 for v in moments)  # AdamW's moments moved


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cli_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A parameter overflows after step 3 (set to inf between two steps): step 4's loss is not finite."""
    import flax_impl.train as ftrain

    real, calls = ftrain.train_step, []

    def train_step(model, optimizer, batch):
        calls.append(1)
        if len(calls) == 4:
            model.final_norm.scale[...] = jnp.full_like(model.final_norm.scale[...], jnp.inf)
        return real(model, optimizer, batch)

    monkeypatch.setattr(ftrain, "train_step", train_step)
    out = tmp_path / "run"
    assert cli_main([*TINY, "--out", str(out), "--plot", "none"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 4" in err
    assert f"last good checkpoint is intact: {out / ck.CKPT / '2'}" in err
    assert sorted(p.name for p in (out / ck.CKPT).iterdir()) == ["2"]
    assert ck.find_checkpoint(out).metadata["history"]["train_step"] == [1, 2]  # every file checked


@pytest.mark.slow
def test_cli_full_disk_is_one_line_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills while step 4 is written (its files are in the temporary folder, then a write fails)."""
    out = tmp_path / "run"
    real, before = lib.write_step, {}

    def full_disk(directory, step, write, keep=None):
        def fill(folder):
            write(folder)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        before.update(_files(out), **{ck.LOCK: b"released"})
        return real(directory, step, fill if step == 4 else write, keep=keep)

    monkeypatch.setattr(lib, "write_step", full_disk)
    assert cli_main([*TINY, "--out", str(out), "--plot", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"flax-impl train: error: cannot write the checkpoint of step 4: [Errno {errno.ENOSPC}] "
                       f"{os.strerror(errno.ENOSPC)}: '{out / ck.CKPT}'; the checkpoint of step 2 is intact "
                       f"({out / ck.CKPT / '2'})")
    assert not any("Traceback" in line for line in err)
    assert {**_files(out), ck.LOCK: b"released"} == before  # step 2 and its export as they were; nothing of step 4
    assert ck.find_checkpoint(out).step == 2 and ck.EXPORT in before


def test_cli_bad_input_fails_before_training(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli_main([*TINY, "--out", str(tmp_path / "a"), "--corpus", str(empty)]) == 2
    assert "has no text" in capsys.readouterr().err
    code = cli_main([*TINY, "--out", str(tmp_path / "b"), "--position", "learned", "--max-len", "8"])
    assert code == 2
    assert "--seq-len=16 is above --max-len=8" in capsys.readouterr().err
    assert cli_main([*TINY, "--out", str(tmp_path / "c"), "--n-heads", "3"]) == 2
    assert "n_heads=3 must divide d_model=16" in capsys.readouterr().err
    assert cli_main([*TINY, "--out", str(tmp_path / "d"), "--resume"]) == 2
    assert "--resume: no complete checkpoint in" in capsys.readouterr().err
    assert cli_main([*TINY, "--out", str(tmp_path / "d"), "--d-ff", "0"]) == 2
    assert "flax-impl train: error: --d-ff=0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main([*TINY, "--out", str(tmp_path / "e"), "--bogus-option"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus-option" in capsys.readouterr().err
    assert not any((tmp_path / d / "checkpoint").exists() for d in "abcde")


# ----------------------------------------------------------------------------------- misuse: exit 2 before work
@pytest.fixture
def no_work(monkeypatch):
    """Reading the corpus or training is a failure: every check must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("flax-impl train started work before reporting the bad input")

    monkeypatch.setattr(corpus, "load_corpus", forbidden)
    monkeypatch.setattr(train, "_train", forbidden)


def _run_2(argv, capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flax-impl train: error: "), err
    return err


BAD_OPTIONS = [
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--batch-size", "0"], "--batch-size=0 must be >= 1"),
    (["--seq-len", "-3"], "--seq-len=-3 must be >= 1"),
    (["--max-len", "0"], "--max-len=0 must be >= 1"),
    (["--eval-every", "0"], "--eval-every=0 must be >= 1"),
    (["--eval-batches", "0"], "--eval-batches=0 must be >= 1"),
    (["--n-layers", "0"], "--n-layers=0 must be >= 1"),
    (["--warmup", "6"], "--warmup=6 must be in [0, --steps=6)"),
    (["--warmup", "-1"], "--warmup=-1 must be in [0, --steps=6)"),
    (["--stop-at", "7"], "--stop-at=7 must be in [1, --steps=6]"),
    (["--stop-at", "0"], "--stop-at=0 must be in [1, --steps=6]"),
    (["--seed", "-1"], "--seed=-1 must be in [0, 4294967295]"),
    (["--seed", str(2**32)], "--seed=4294967296 must be in [0, 4294967295]"),
    (["--lr", "0"], "--lr=0.0 must be a finite number > 0"),
    (["--lr", "nan"], "--lr=nan must be a finite number > 0"),
    (["--lr", "inf"], "--lr=inf must be a finite number > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay=-0.1 must be a finite number >= 0"),
    (["--clip-norm", "-1"], "--clip-norm=-1.0 must be a finite number >= 0 (0 = off)"),
    (["--dropout", "1"], "--dropout=1.0 must be a finite number in [0, 1)"),
    (["--mask-prob", "0"], "--mask-prob=0.0 must be a finite number in (0, 1]"),
    (["--mask-prob", "1.5"], "--mask-prob=1.5 must be a finite number in (0, 1]"),
    (["--corpus-mb", "inf"], "--corpus-mb=inf must be a finite number >= 1e-06 (one byte)"),
    (["--corpus-mb", "1e-9"], "--corpus-mb=1e-09 must be a finite number >= 1e-06 (one byte)"),
    (["--corpus", "no/such/file.txt"], "--corpus 'no/such/file.txt' does not exist"),
    (["--plot", "no/such/dir/loss.png"], "--plot 'no/such/dir/loss.png': the directory"),
    (["--plot", "."], "--plot '.' is a directory"),
    (["--n-heads", "3"], "n_heads=3 must divide d_model=16"),
    (["--mesh", "data=3"], "--mesh"),
]


@pytest.mark.parametrize("extra, message", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_is_exit_2_before_any_work(tmp_path, monkeypatch, capsys, no_work, extra, message):
    monkeypatch.chdir(tmp_path)
    assert message in _run_2([*TINY, "--out", "run", *extra], capsys)
    assert not (tmp_path / "run").exists()


def test_bad_output_folder_and_fault_spec_are_exit_2(tmp_path, monkeypatch, capsys, no_work):
    (tmp_path / "file").write_text("")
    assert "is a file, not a directory" in _run_2([*TINY, "--out", str(tmp_path / "file")], capsys)
    assert "is a file, not a directory" in _run_2([*TINY, "--out", str(tmp_path / "file" / "sub")], capsys)
    monkeypatch.setenv(cd.FAULT_ENV, "nowhere")
    assert f"{cd.FAULT_ENV}='nowhere'" in _run_2([*TINY, "--out", str(tmp_path / "x")], capsys)


class Placeholder(nnx.Module):
    """Stands for the model in the checkpoints of the checks before any work: it carries the config, and one
    array that nothing may read."""

    def __init__(self, config: fi.TransformerConfig):
        self.config, self.x = config, nnx.Param(jnp.zeros(1))


def _checkpoint(out: Path, argv: list[str], step: int = 2, run_options: bool = True) -> Path:
    """A checkpoint of the run `train argv` at `step` in OUT/checkpoint, as `flax-impl train` writes it but with
    a placeholder model and no optimizer state; `run_options=False`: without the run's options (no metadata)."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    cfg, tcfg = train._configs(args)
    meta = {"train": tcfg.to_dict(), "data": train._data_options(args), "seed": args.seed, "history": {}}
    folder = lib.save_checkpoint(out / ck.CKPT, Placeholder(cfg), step=step, metadata=meta if run_options else None)
    return Path(folder)


def test_resume_checks_every_checkpoint_file_and_option_first(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    argv = [*TINY, "--out", "run"]
    folder = _checkpoint(Path("run"), argv)
    mismatches = [
        (["--n-heads", "4"], f"--resume with other model options than {folder}: head_dim: saved 8, given 4; "
                             "n_heads: saved 2, given 4"),  # the derived head_dim D / N changes too
        (["--position", "alibi"], "position: saved 'rope', given 'alibi'"),
        (["--causal"], "causal: saved False, given True"),
        (["--seq-len", "8"], f"--resume with other data options than {folder}: seq_len: saved 16, given 8"),
        (["--batch-size", "4"], "batch_size: saved 2, given 4"),
        (["--seed", "3"], f"--resume with --seed=3, {folder} used --seed=0"),
        (["--clip-norm", "0"], "--resume cannot switch gradient clipping on or off"),
        (["--stop-at", "2"], f"{folder} is at step 2: --stop-at / --steps=2 leaves nothing to train"),
    ]
    for extra, message in mismatches:
        assert message in _run_2([*argv, "--resume", *extra], capsys), extra
    assert f"'run' holds a checkpoint (step 2, {str(folder)!r}): pass --resume" in _run_2(argv, capsys)
    # Every file is read against checksums.json before any work, the metadata and arrays alike.
    for name in ("metadata/metadata", next(str(p.relative_to(folder)) for p in folder.rglob("d/*"))):
        path = folder / name
        good = path.read_bytes()
        path.write_bytes(good[:-1] + bytes([good[-1] ^ 4]))
        assert f"{path} is corrupt: its sha256 differs" in _run_2([*argv, "--resume"], capsys)
        path.write_bytes(good[: len(good) // 2])
        assert f"{path} is truncated or overwritten" in _run_2([*argv, "--resume"], capsys)
        path.unlink()
        assert f"{path} is missing" in _run_2([*argv, "--resume"], capsys)
        path.write_bytes(good)
    bare = _checkpoint(Path("bare"), [*TINY, "--out", "bare"], run_options=False)
    message = f"{bare} has no model config or run options: not written by flax-impl train"
    assert message in _run_2([*TINY, "--out", "bare", "--resume"], capsys)
    (Path("old") / ck.CKPT).mkdir(parents=True)  # the layout of an older flax-impl train
    (Path("old") / ck.CKPT / "config.json").write_text("{}")
    message = f"{Path('old') / ck.CKPT} holds ['config.json'], not checkpoint steps"
    assert message in _run_2([*TINY, "--out", "old"], capsys)


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys, no_work):
    out = tmp_path / "run"
    out.mkdir()
    with ck.RunLock(out):
        err = _run_2([*TINY, "--out", str(out)], capsys)
    assert f"is in use by another flax-impl train (pid {os.getpid()}" in err
    (out / ck.LOCK).write_text("999999999\n")  # a stale file: no process holds its lock
    assert "--resume: no complete checkpoint" in _run_2([*TINY, "--out", str(out), "--resume"], capsys)
