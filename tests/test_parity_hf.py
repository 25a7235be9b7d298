"""`flax-impl parity --hf`: per-layer divergence between the Flax model and transformers' on a local folder.

A clean folder passes every row; a Flax side whose layer k was perturbed is reported at layer k (forward), with
exit status 1; misuse and unreadable weight files are exit 2 before any work, Ctrl-C exit 130 with one line; the
summary line says what was compared under which tolerance; progress reads in a log. Tiny random GPT-2 and Llama
models, built in-process. The trained-like models with outliers and the seeded mistakes:
test_parity_hf_outliers.py."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import transformers
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity_tests"))
from hf_helpers import SPECS, perturb  # noqa: E402

import flax_impl as fi  # noqa: E402
import flax_impl.hf as fh  # noqa: E402
from flax_impl import tolerances as tol  # noqa: E402
from flax_impl.apps import parity_hf, parity_hf_checks, parity_hf_sides  # noqa: E402
from flax_impl.apps.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _save(family: str, path: Path) -> Path:
    spec = SPECS[family]
    model = getattr(transformers, spec.model_cls)(getattr(transformers, spec.config_cls)(**spec.kwargs))
    perturb(model, 0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def folder(request, tmp_path_factory):
    return _save(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """One family for the checks that do not depend on it."""
    return _save("llama", tmp_path_factory.mktemp("llama"))


def _args(hf, flax=None, json_path=None, **changes):
    args = argparse.Namespace(
        hf=str(hf), flax=flax, batch=2, length=12, seed=0, json=json_path, reference="transformers",
        dtype="float32", decode=4,
    )  # fmt: skip
    vars(args).update(changes)
    return args


def test_clean_folder_passes_every_layer(folder, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert parity_hf.run(_args(folder, json_path=str(out))) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["ok"] and [r["layer"] for r in rows] == ["input", "0", "1", "output"]
    assert all(r["ok"] and r["verdict"] for r in rows) and "referee" not in report  # no layer needed it
    assert 0 < max(r["hidden"] for r in rows) <= tol.HF_FORWARD_REL and report["decode"]["ok"]
    assert report["logits"]["kl_max"] < 1e-9 and report["logits"]["top1"] == 1.0
    captured = capsys.readouterr()
    assert "PARTS WAYS" not in captured.out
    summary = captured.out.strip().splitlines()[-1]  # one line: what, under which tolerance, the verdict
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert summary.startswith(f"ok: {model_type}, 2 layers, B=2 L=12, float32"), summary
    assert "4 of 4 layers within the float32 budget" in summary and "1e-05 x its largest |value|" in summary
    assert "decode 4 steps within the budget" in summary and "top-1 100.0%" in summary
    # Progress off a terminal (a log file, CI): one plain line per phase, each with its percentage and seconds.
    lines = captured.err.strip().splitlines()
    phases = [line.split("s  ", 1)[1] for line in lines]
    assert phases[:3] == [
        "importing jax, torch and transformers", "checking the config and the weight files", "loading the Flax model"
    ]
    assert phases[-1] == "done"
    assert "decoding 4 steps (Flax generate vs transformers' full forward)" in phases and "\r" not in "".join(lines)
    percents = [int(line.split("]")[1].split("%")[0]) for line in lines]
    assert percents == sorted(percents) and percents[-1] == 100


@pytest.mark.parametrize("layer", [0, 1])
def test_a_perturbed_layer_is_reported_at_that_layer(folder, layer, tmp_path, capsys):
    _, model = fh.from_pretrained(folder)
    sd = fi.to_numpy_state_dict(model)
    key = f"blocks.{layer}.attn.out_proj.weight"
    sd[key] = sd[key] + np.float32(0.01) * np.random.default_rng(1).standard_normal(sd[key].shape, np.float32)
    fi.load_torch_state_dict(model, sd)
    bad = tmp_path / "port.safetensors"
    fi.save(model, bad)
    assert parity_hf.run(_args(folder, flax=str(bad), decode=0, json_path=str(tmp_path / "rows.json"))) == 1
    out = capsys.readouterr().out
    assert "PARTS WAYS HERE (forward)" in out and out.strip().splitlines()[-1].startswith("FAIL: ")
    assert f"parts ways at layer {layer} (forward)" in out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "rows.json").read_text())
    below = report["rows"][: layer + 1]  # the input and every layer below k compute the same; gradients need not
    assert all(r["hidden"] <= r["hidden_tol"] for r in below), out
    # The referee ran for the layers past the budget and finds no roundoff there: Flax is far from float64.
    assert not report["rows"][layer + 1]["verdict"] and not report["referee"][layer + 1]["ok"]


def test_reference_float64_prints_both_errors_and_their_ratio(llama, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert parity_hf.run(_args(llama, reference="float64", decode=0, json_path=str(out))) == 0
    text = capsys.readouterr().out
    assert "Flax hidden" in text and "HF hidden" in text and "ratio" in text and "as close as transformers" in text
    assert "as close to transformers in float64 as transformers' own float32" in text.splitlines()[-1]
    referee = json.loads(out.read_text())["referee"]
    assert [r["layer"] for r in referee] == ["input", "0", "1", "output"] and all(r["ok"] for r in referee)
    for r in referee[1:]:  # both float32 runs are off float64 by roundoff, neither exactly
        assert 0 < r["ours_hidden"] < tol.HF_FORWARD_REL and 0 < r["theirs_hidden"] < tol.HF_FORWARD_REL
        assert 0 < r["ours_grad"] < tol.GRAD_REL and 0 < r["theirs_grad"] < tol.GRAD_REL


def test_bfloat16_is_judged_against_each_sides_float32(llama, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert parity_hf.run(_args(llama, dtype="bfloat16", decode=0, json_path=str(out))) == 0
    text = capsys.readouterr().out
    assert "bfloat16 against the same side's float32" in text and "bf16 as close to float32 as" in text
    bf16 = json.loads(out.read_text())["bf16"]
    for side in ("flax", "transformers"):  # bf16 keeps 8 bits: off float32 by far more than roundoff, not O(1)
        assert 1e-3 < bf16[side]["mean_abs"] < 0.5 and 0 < bf16[side]["kl_mean"] < 0.1


def test_misuse_is_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    assert parity_hf.run(_args(tmp_path / "nowhere")) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert parity_hf.run(_args(tmp_path)) == 2  # a folder without config.json
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert parity_hf.run(_args(tmp_path)) == 2  # read and refused before any comparison
    assert "t5" in capsys.readouterr().err

    def forbidden(*args, **kwargs):
        raise AssertionError("parity --hf loaded the models before reporting the bad option")

    monkeypatch.setattr(parity_hf, "load_sides", forbidden)
    cases = [
        ({"length": 1}, "--length=1 must be >= 2"),
        ({"batch": 0}, "--batch=0 must be >= 1"),
        ({"decode": -1}, "--decode=-1 must be >= 0"),
        ({"seed": -1}, "--seed=-1 must be in [0, 4294967295]"),
        ({"json": str(tmp_path / "missing" / "rows.json")}, "--json"),
        ({"argv": ["parity", "--hf", str(tmp_path), "--d-model=16"]}, "--d-model does not apply with --hf"),
        ({"argv": ["parity", "--hf", str(tmp_path), "--table-length", "8"]}, "--table-length does not apply"),
    ]
    for change, message in cases:
        assert parity_hf.run(_args(tmp_path, **change)) == 2, change
        err = capsys.readouterr().err
        assert err.startswith("flax-impl parity: error: ") and message in err, (change, err)
    for option in (["--reference", "float64"], ["--dtype", "bfloat16"], ["--decode", "2"]):
        assert main(["parity", *option]) == 2  # options of --hf alone
        assert f"{option[0]} goes with --hf" in capsys.readouterr().err


def test_unreadable_weight_files_are_exit_2_naming_the_file(llama, tmp_path, capsys, monkeypatch):
    """A truncated or corrupt safetensors file: one line naming it, exit 2, before any model is built."""
    monkeypatch.setattr(fh, "from_pretrained", lambda *a, **k: pytest.fail("a model was built"))
    data = (llama / "model.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) // 2], "corrupt": b"\0" * 8 + data[8:], "empty": b""}
    for name, content in broken.items():
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_bytes((llama / "config.json").read_bytes())
        (bad / "model.safetensors").write_bytes(content)
        assert parity_hf.run(_args(bad)) == 2, name
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
        assert len(err) == 1 and str(bad / "model.safetensors") in err[0], err
        assert "truncated or corrupt" in err[0] and "Traceback" not in err[0]
        flax_file = tmp_path / f"{name}.safetensors"  # the same for a --flax file
        flax_file.write_bytes(content)
        assert parity_hf.run(_args(llama, flax=str(flax_file))) == 2
        assert str(flax_file) in capsys.readouterr().err


def test_decode_past_the_models_length_is_exit_2(llama, capsys, monkeypatch):
    monkeypatch.setattr(fh, "from_pretrained", lambda *a, **k: pytest.fail("a model was built"))
    assert parity_hf.run(_args(llama, decode=64)) == 2  # the tiny Llama holds 64 positions
    assert "--decode=64 leaves no room for a prompt: the model holds 64 positions" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(llama, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(parity_hf_sides, "check_weight_files", interrupted)
    assert parity_hf.run(_args(llama)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("flax-impl parity: interrupted while checking the config and the weight files")
    assert err[-1].endswith("nothing was judged") and not any("Traceback" in line for line in err)


@pytest.mark.slow  # a fresh interpreter importing jax, torch and transformers: ~10-20 s
def test_sigint_stops_the_command(llama):
    """A real SIGINT (Ctrl-C) while the models load: exit 130 and the one-line summary, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "flax_impl", "parity", "--hf", str(llama), "--length", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    seen = []
    while not any("loading the Flax model" in line for line in seen):  # past its imports and checks: working
        seen.append(proc.stderr.readline())
        assert seen[-1], f"the command ended before loading: {seen}"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "flax-impl parity: interrupted while" in err and "Traceback" not in err


def test_a_flax_file_of_another_config_is_exit_2(folder, tmp_path, capsys):
    cfg, _ = fh.from_pretrained(folder)
    other = fi.Transformer(cfg.replace(n_heads=2, n_kv_heads=None), rngs=nnx.Rngs(0))  # the same shapes
    fi.save(other, tmp_path / "other.safetensors")
    assert parity_hf.run(_args(folder, flax=str(tmp_path / "other.safetensors"))) == 2
    assert f"config n_heads: checkpoint 2 vs model {cfg.n_heads}" in capsys.readouterr().err


def test_row_and_group_errors_follow_their_definitions():
    ref = np.array([[1.0, -2.0, 0.5], [1000.0, 3.0, -1.0]])  # (rows, width): the second row has an outlier
    ours = ref + np.array([[0.0, 2e-5, 0.0], [1e-3, 0.0, 0.0]])
    assert tol.row_error(ours, ref) == pytest.approx(1e-5)  # row 0: 2e-5 / 2; row 1: 1e-3 / 1000 = 1e-6
    assert tol.group_error([(ours, ref)]) == pytest.approx(1e-3 / 1000)
    assert tol.group_error([(ours[:1], ref[:1]), (ours[1:], ref[1:])]) == pytest.approx(1e-6)
    assert tol.row_error(np.zeros((2, 3)), np.zeros((2, 3))) == 0.0
    assert tol.row_error(np.ones((1, 3)), np.zeros((1, 3))) == np.inf  # a zero row compares exactly
    assert tol.row_error(np.where(ref > 2, np.nan, ref), ref) == np.inf  # NaN never passes
    with pytest.raises(ValueError, match="equal non-empty shapes"):
        tol.row_error(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="at least one"):
        tol.group_error([])


def test_kl_divergence_follows_its_definition():
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.standard_normal((4, 7)), rng.standard_normal((4, 7))
    p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
    q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
    want = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(parity_hf_checks.kl_divergence(q_logits, p_logits), want, rtol=1e-12)
    assert np.all(parity_hf_checks.kl_divergence(p_logits + 3.0, p_logits) < 1e-15)  # a shift is the same softmax
    d = parity_hf_checks.distributions(q_logits, p_logits)
    assert d.top1 == np.mean(q_logits.argmax(-1) == p_logits.argmax(-1)) and d.kl_max == pytest.approx(want.max())
