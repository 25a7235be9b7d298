"""`flax-impl train` end to end: a tiny run whose checkpoint loads into torch_ref, a run killed mid-save resumes
and replays the uninterrupted run bit for bit, a non-finite loss keeps the last good checkpoint, bad input (an
option, a path, a checkpoint file, a second run on --out) fails with exit 2 before any work."""

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save
from safetensors.torch import load_file

import flax_impl as fi
import torch_ref as tr
from flax_impl.apps import checkpoint as ck, corpus, train
from flax_impl.apps.cli import main as cli_main
from flax_impl.saved_config import CONFIG_KEY
from flax_impl.tolerances import TRAIN_REL

ROOT = Path(__file__).resolve().parents[1]

TINY = ["train", "--steps", "6", "--batch-size", "2", "--seq-len", "16", "--d-model", "16", "--n-layers", "1",
        "--n-heads", "2", "--warmup", "2", "--eval-every", "2", "--eval-batches", "2", "--corpus-mb", "0.2"]


def _history(out):
    with np.load(out / "checkpoint" / "train_state.npz") as d:
        return {k: d[k] for k in d.files if k.startswith("history/")}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_cli_trains_checkpoint_loads_into_torch_and_resume_replays(tmp_path, capsys):
    out = tmp_path / "run"
    plot = tmp_path / "loss.png"
    assert cli_main([*TINY, "--out", str(out), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "final held-out loss" in printed and "unigram entropy" in printed
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The checkpoint loads into torch_ref and computes what the Flax model loaded from it computes.
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    cfg = fi.TransformerConfig.from_dict(meta["model"])
    twin = tr.Transformer(cfg).eval()
    twin.load_state_dict(load_file(out / "checkpoint" / "model.safetensors"))
    model = fi.Transformer(cfg, rngs=nnx.Rngs(5))
    fi.load(model, out / "checkpoint" / "model.safetensors")
    model.eval()
    ids = np.random.default_rng(0).integers(4, 260, size=(2, 12))
    want = twin.logits(twin(torch.as_tensor(ids))).detach().numpy()
    got = np.asarray(model.logits(model(ids)))
    np.testing.assert_allclose(got, want, rtol=0, atol=TRAIN_REL * np.abs(want).max())

    # A real kill (os._exit, no cleanup) in the save of step 4, just after the old checkpoint was renamed away:
    # no `checkpoint` folder, a complete temporary one, a lock file of a dead process. Resume to step 6 recovers
    # step 4 and gives the same training-loss curve as the uninterrupted run, bit for bit.
    pieces = tmp_path / "pieces"
    code = ("import sys, jax; jax.config.update('jax_default_matmul_precision', 'highest'); "
            "from flax_impl.apps.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, ck.FAULT_ENV: "old-renamed", "PYTHONPATH": str(ROOT)}
    argv = [*TINY, "--out", str(pieces), "--plot", "none"]
    killed = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    assert killed.returncode == ck.FAULT_EXIT, killed.stderr
    assert not (pieces / "checkpoint").exists() and (pieces / ck.LOCK).is_file()
    assert cli_main([*TINY, "--out", str(pieces), "--plot", "none", "--resume"]) == 0
    assert "steps 4 -> 6 of 6" in capsys.readouterr().out
    assert sorted(p.name for p in pieces.iterdir()) == ["checkpoint"]
    whole, resumed = _history(out), _history(pieces)
    assert resumed["history/train_step"].tolist() == list(range(1, 7))
    np.testing.assert_array_equal(resumed["history/train_loss"], whole["history/train_loss"])
    a, b = load_file(out / "checkpoint" / "model.safetensors"), load_file(pieces / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_cli_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    causal = [*TINY, "--causal", "--out", str(out), "--plot", "none"]  # the next-token path of the CLI, too
    assert cli_main([*causal, "--stop-at", "2"]) == 0
    before = {p.name: _sha(p) for p in (out / "checkpoint").iterdir()}
    code = cli_main([*causal, "--resume", "--lr", "1e38"])  # Adam steps of ~1e38: overflow at the next forward
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "last good checkpoint is intact" in err
    assert {p.name: _sha(p) for p in (out / "checkpoint").iterdir()} == before
    assert not list(out.glob(".checkpoint-tmp-*"))


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
    monkeypatch.setenv(ck.FAULT_ENV, "nowhere")
    assert f"{ck.FAULT_ENV}='nowhere'" in _run_2([*TINY, "--out", str(tmp_path / "x")], capsys)


def _checkpoint(
    out: Path, argv: list[str], step: int = 2, model_argv: list[str] | None = None, model_config: bool = True
) -> Path:
    """A complete checkpoint of the run `train argv` at `step`, as `flax-impl train` lays it out, for the checks
    before any work (the weights and the training state are placeholders: nothing here may read them);
    `model_argv`: the model file's config instead (a model file of another config); `model_config=False`: a
    model file without one."""
    def configs(a: list[str]):
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        args = parser.parse_args(a[1:])
        return args, *train._configs(args)

    args, cfg, tcfg = configs(argv)
    meta = {"model": cfg.to_dict(), "train": tcfg.to_dict(), "data": train._data_options(args), "seed": args.seed}
    model_cfg = configs(model_argv or argv)[1]
    metadata = {CONFIG_KEY: json.dumps(model_cfg.to_dict())} if model_config else None
    model = save({"x": np.zeros(1, np.float32)}, metadata=metadata)
    out.mkdir(parents=True, exist_ok=True)
    return ck.save_checkpoint(out, {ck.MODEL_FILE: model, ck.STATE_FILE: b"placeholder"}, {**meta, "step": step})


def test_resume_checks_every_checkpoint_file_and_option_first(tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    argv = [*TINY, "--out", "run"]
    folder = _checkpoint(Path("run"), argv)
    manifest = folder / ck.MANIFEST
    mismatches = [
        (["--n-heads", "4"], f"--resume with other model options than {manifest}: n_heads: saved 2, given 4"),
        (["--position", "alibi"], "position: saved 'rope', given 'alibi'"),
        (["--causal"], "causal: saved False, given True"),
        (["--seq-len", "8"], f"--resume with other data options than {manifest}: seq_len: saved 16, given 8"),
        (["--batch-size", "4"], "batch_size: saved 2, given 4"),
        (["--seed", "3"], f"--resume with --seed=3, {manifest} used --seed=0"),
        (["--clip-norm", "0"], "--resume cannot switch gradient clipping on or off"),
        (["--stop-at", "2"], f"{manifest} is at step 2: --stop-at / --steps=2 leaves nothing to train"),
    ]
    for extra, message in mismatches:
        assert message in _run_2([*argv, "--resume", *extra], capsys), extra
    assert f"'run' holds a checkpoint (step 2, {str(folder)!r}): pass --resume" in _run_2(argv, capsys)
    state = folder / ck.STATE_FILE
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    assert f"{state} is truncated or overwritten" in _run_2([*argv, "--resume"], capsys)
    state.unlink()
    assert f"{state} is missing" in _run_2([*argv, "--resume"], capsys)
    other = Path("other")
    _checkpoint(other, [*TINY, "--out", "other"], model_argv=[*TINY, "--n-heads", "4"])
    message = f"{other / 'checkpoint' / ck.MODEL_FILE} was written for another model than"
    assert message in _run_2([*TINY, "--out", "other", "--resume"], capsys)
    _checkpoint(Path("bare"), [*TINY, "--out", "bare"], model_config=False)
    message = f"{Path('bare') / 'checkpoint' / ck.MODEL_FILE} has no flax_impl config in its metadata"
    assert message in _run_2([*TINY, "--out", "bare", "--resume"], capsys)


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys, no_work):
    out = tmp_path / "run"
    out.mkdir()
    with ck.RunLock(out):
        err = _run_2([*TINY, "--out", str(out)], capsys)
    assert f"is in use by another flax-impl train (pid {os.getpid()}" in err
    (out / ck.LOCK).write_text("999999999\n")  # a stale file: no process holds its lock
    assert "--resume: no complete checkpoint" in _run_2([*TINY, "--out", str(out), "--resume"], capsys)
