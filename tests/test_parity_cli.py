"""`flax-impl parity`: runs, reports every module and scheme, and fails when a tolerance is exceeded."""

import json

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
        "TransformerEncoder",
    } <= modules
    for module in ("TransformerInput", "MultiHeadAttention", "TransformerBlock", "TransformerEncoder"):
        cases = " ".join(r["case"] for r in rows if r["module"] == module)
        assert all(p in cases for p in POSITIONS), module
    assert all(r["ok"] and r["max_abs_diff"] <= r["tolerance"] for r in rows)
    assert "within tolerance" in capsys.readouterr().out


def test_parity_cli_exit_status_1_when_a_tolerance_is_exceeded(monkeypatch):
    monkeypatch.setattr(tolerances, "BLOCK", 0.0)  # no fp32 block computation is bit-exact across frameworks
    assert main(SMALL) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--json", "missing-dir/rows.json"], "--json"),
        (["--n-heads", "3"], "n_heads=3 must divide d_model=16"),
        (["--length", "0"], "--length=0 must be >= 1"),
    ],
)
def test_parity_cli_bad_input_exits_2_before_any_work(monkeypatch, tmp_path, capsys, extra, message):
    def forbidden(*args, **kwargs):
        raise AssertionError("parity built twins before reporting the bad option")

    monkeypatch.setattr(parity, "_rows", forbidden)
    monkeypatch.chdir(tmp_path)
    assert main([*SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flax-impl parity: error: ") and message in err
