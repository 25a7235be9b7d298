"""`flax-impl parity`: runs, reports every module and scheme, and fails when a tolerance is exceeded."""

import json

import numpy as np
import pytest

from flax_impl import tolerances
from flax_impl.apps import parity
from flax_impl.apps.cli import main
from flax_impl.config import POSITIONS

SMALL = [
    "parity",
    "--d-model",
    "16",
    "--n-heads",
    "2",
    "--d-ff",
    "32",
    "--n-layers",
    "2",
    "--length",
    "8",
    "--table-length",
    "64",
]


@pytest.mark.slow
def test_parity_cli_reports_every_module_and_scheme(tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main([*SMALL, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    modules = {r["module"] for r in rows}
    assert {
        "Dropout",
        "Embed",
        "sinusoidal_table",
        "apply_rope",
        "alibi_bias",
        "TransformerInput",
        "MultiHeadAttention",
        "TransformerBlock",
        "Transformer",
    } <= modules
    for module in ("TransformerInput", "MultiHeadAttention", "TransformerBlock", "Transformer"):
        cases = " ".join(r["case"] for r in rows if r["module"] == module)
        assert all(p in cases for p in POSITIONS), module
    assert all(r["ok"] and r["max_abs_diff"] <= r["tolerance"] for r in rows)
    assert "within tolerance" in capsys.readouterr().out


def test_parity_cli_exit_status_1_when_a_tolerance_is_exceeded(monkeypatch):
    monkeypatch.setattr(tolerances, "BLOCK", 0.0)  # no fp32 block computation is bit-exact across frameworks
    assert main(SMALL) == 1


BAD = [
    (["--json", "missing-dir/rows.json"], "--json 'missing-dir/rows.json': the directory"),
    (["--json", "."], "--json '.' is a directory"),
    (["--n-heads", "3"], "n_heads=3 must divide d_model=16"),
    (["--d-model", "18"], "RoPE rotates pairs: rotated width 9"),  # the rope rows' head dim: odd
    (["--length", "0"], "--length=0 must be >= 1"),
    (["--batch", "0"], "--batch=0 must be >= 1"),
    (["--table-length", "-1"], "--table-length=-1 must be >= 1"),
    (["--n-layers", "0"], "--n-layers=0 must be >= 1"),
    (["--d-ff", "0"], "--d-ff=0 must be >= 1"),
    (["--seed", "-1"], "--seed=-1 must be in [0, 4294967295]"),
    (["--flax", "x.safetensors"], "--flax goes with --hf"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_parity_cli_bad_input_exits_2_before_any_work(monkeypatch, tmp_path, capsys, extra, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("parity built twins before reporting the bad option")

    monkeypatch.setattr(parity, "_rows", forbidden)
    monkeypatch.chdir(tmp_path)
    assert main([*SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flax-impl parity: error: ") and message in err


def test_parity_cli_a_comparison_of_nothing_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(parity, "_rows", lambda *args: iter(()))
    assert main(SMALL) == 2
    assert "no rows to compare" in capsys.readouterr().err
    row = parity.Row("x", "empty", parity._diff(np.zeros((2, 0)), np.zeros((2, 0))), 1.0)
    assert np.isnan(row.max_abs_diff) and not row.ok  # an empty row fails, it does not pass
    assert not parity.Row("x", "nan", parity._diff([np.nan], [0.0]), 1.0).ok


def test_parity_cli_unknown_option_is_argparse_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([*SMALL, "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
