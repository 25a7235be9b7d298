"""`flax-impl train` end to end: a tiny run whose checkpoint loads into torch_ref, resume replays the run bit for
bit, a non-finite loss keeps the last good checkpoint, bad input fails before any training."""

import hashlib
import json

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

import flax_impl as fi
import torch_ref as tr
from flax_impl.apps.cli import main as cli_main
from flax_impl.tolerances import TRAIN_REL

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
    twin = tr.TransformerEncoder(cfg).eval()
    twin.load_state_dict(load_file(out / "checkpoint" / "model.safetensors"))
    model = fi.TransformerEncoder(cfg, rngs=nnx.Rngs(5))
    fi.load(model, out / "checkpoint" / "model.safetensors")
    model.eval()
    ids = np.random.default_rng(0).integers(4, 260, size=(2, 12))
    want = twin.logits(twin(torch.as_tensor(ids))).detach().numpy()
    got = np.asarray(model.logits(model(ids)))
    np.testing.assert_allclose(got, want, rtol=0, atol=TRAIN_REL * np.abs(want).max())

    # Stop at step 3, resume to 6: the same training-loss curve as the uninterrupted run, bit for bit.
    pieces = tmp_path / "pieces"
    assert cli_main([*TINY, "--out", str(pieces), "--plot", "none", "--stop-at", "3"]) == 0
    assert _history(pieces)["history/train_step"].tolist() == [1, 2, 3]
    assert cli_main([*TINY, "--out", str(pieces), "--plot", "none", "--resume"]) == 0
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
    assert "no checkpoint" in capsys.readouterr().err
    assert cli_main([*TINY, "--out", str(tmp_path / "d"), "--d-ff", "0"]) == 2
    assert "flax-impl train: error: --d-ff=0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main([*TINY, "--out", str(tmp_path / "e"), "--bogus-option"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus-option" in capsys.readouterr().err
    assert not any((tmp_path / d / "checkpoint").exists() for d in "abcde")
