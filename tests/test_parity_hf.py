"""`flax-impl parity --hf`: per-layer divergence between the Flax model and transformers' on a local folder.

A clean folder passes every row; a Flax side whose layer k was perturbed is reported at layer k (forward), with
exit status 1; misuse is exit 2 before any work. Tiny random GPT-2 and Llama models, built in-process."""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity_tests"))
from hf_helpers import SPECS, perturb  # noqa: E402

import flax_impl as fi  # noqa: E402
import flax_impl.hf as fh  # noqa: E402
from flax_impl.apps import parity_hf  # noqa: E402


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def folder(request, tmp_path_factory):
    spec = SPECS[request.param]
    model = getattr(transformers, spec.model_cls)(getattr(transformers, spec.config_cls)(**spec.kwargs))
    perturb(model, 0)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def _args(hf, flax=None, json_path=None):
    return argparse.Namespace(hf=str(hf), flax=flax, batch=2, length=12, seed=0, json=json_path)


def test_clean_folder_passes_every_layer(folder, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert parity_hf.run(_args(folder, json_path=str(out))) == 0
    rows = json.loads(out.read_text())
    assert [r["layer"] for r in rows] == ["input", "0", "1", "output"]
    assert all(r["ok"] for r in rows) and "PARTS WAYS" not in capsys.readouterr().out


@pytest.mark.parametrize("layer", [0, 1])
def test_a_perturbed_layer_is_reported_at_that_layer(folder, layer, tmp_path, capsys):
    _, model = fh.from_pretrained(folder)
    sd = fi.to_numpy_state_dict(model)
    key = f"blocks.{layer}.attn.out_proj.weight"
    sd[key] = sd[key] + np.float32(0.01) * np.random.default_rng(1).standard_normal(sd[key].shape, np.float32)
    fi.load_torch_state_dict(model, sd)
    bad = tmp_path / "port.safetensors"
    fi.save(model, bad)
    assert parity_hf.run(_args(folder, flax=str(bad))) == 1
    rows = parity_hf.compare(str(folder), str(bad), length=12)
    assert parity_hf.first_divergence(rows) == (str(layer), "forward")
    below = rows[: layer + 1]  # the input and every layer below k compute the same; their gradients need not
    assert all(r.hidden_diff <= r.hidden_tol for r in below), parity_hf.format_rows(rows)
    assert "PARTS WAYS HERE (forward)" in capsys.readouterr().out


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
        ({"seed": -1}, "--seed=-1 must be in [0, 4294967295]"),
        ({"json": str(tmp_path / "missing" / "rows.json")}, "--json"),
        ({"argv": ["parity", "--hf", str(tmp_path), "--d-model=16"]}, "--d-model does not apply with --hf"),
        ({"argv": ["parity", "--hf", str(tmp_path), "--table-length", "8"]}, "--table-length does not apply"),
    ]
    for change, message in cases:
        args = _args(tmp_path)
        vars(args).update(change)
        assert parity_hf.run(args) == 2, change
        err = capsys.readouterr().err
        assert err.startswith("flax-impl parity: error: ") and message in err, (change, err)


def test_a_flax_file_of_another_config_is_exit_2(folder, tmp_path, capsys):
    cfg, _ = fh.from_pretrained(folder)
    other = fi.Transformer(cfg.replace(n_heads=2, n_kv_heads=None), rngs=nnx.Rngs(0))  # the same shapes
    fi.save(other, tmp_path / "other.safetensors")
    assert parity_hf.run(_args(folder, flax=str(tmp_path / "other.safetensors"))) == 2
    assert f"config n_heads: checkpoint 2 vs model {cfg.n_heads}" in capsys.readouterr().err
