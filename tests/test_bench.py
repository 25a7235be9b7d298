"""`flax-impl bench` runs end to end on a tiny encoder and writes well-formed JSON and a PNG. Speed is never
asserted: only that every measurement is present, finite and positive, and that the FLOP count is the formula
counted matmul by matmul."""

import json
import math

import pytest

from flax_impl.apps import bench
from flax_impl.apps.cli import main
from flax_impl.config import TransformerConfig

TINY = ["--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "50", "--shapes", "2x8", "--repeats", "2",
        "--warmup", "0", "--matmul-size", "64", "--compile-layers", "1,2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = main(["bench", *TINY, "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")])
    assert status == 0
    return json.loads((out / "bench.json").read_text()), out


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_json_top_level(report):
    result, _ = report
    assert result["device"] == "cpu" and isinstance(result["device_name"], str) and result["device_name"]
    assert _positive(result["matmul_peak_flops"])
    assert set(result["matmul_peak"]) == {"jax", "torch"}
    assert result["matmul_peak_flops"] == max(result["matmul_peak"].values())
    assert result["config"]["n_layers"] == 1 and result["config"]["d_model"] == 32


@pytest.mark.slow
def test_every_measurement_present_and_positive(report):
    result, _ = report
    rows = result["results"]
    assert {(r["framework"], r["mode"]) for r in rows} == {
        ("flax", "forward"), ("torch", "forward"), ("flax", "train"), ("torch", "train")
    }
    for r in rows:
        assert (r["batch"], r["length"], r["position"]) == (2, 8, "sinusoidal")
        tps = r["tokens_per_s"]
        assert all(_positive(tps[k]) for k in ("median", "min", "max"))
        assert tps["min"] <= tps["median"] <= tps["max"]
        assert len(r["times_s"]) == r["repeats"] == 2 and all(_positive(t) for t in r["times_s"])
        assert r["compile_s"] >= 0 and _positive(r["first_call_s"])
        assert _positive(r["flops"]) and _positive(r["achieved_flops"]) and _positive(r["peak_fraction"])
        assert r["achieved_flops"] == pytest.approx(r["flops"] / r["step_s"]["median"])
        assert r["peak_fraction"] == pytest.approx(r["achieved_flops"] / result["matmul_peak_flops"])
        if r["peak_rss_mb"] is not None:
            assert _positive(r["peak_rss_mb"])
        if r["framework"] == "flax":
            assert _positive(r["speedup_vs_torch_eager"])


@pytest.mark.slow
def test_compile_scaling_and_plot(report):
    result, out = report
    assert [s["mode"] for s in result["compile_scaling"]] == ["forward", "train"]
    for s in result["compile_scaling"]:
        assert set(s["compile_s"]) == {"1", "2"} and all(_positive(t) for t in s["compile_s"].values())
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_flop_count_matches_matmul_by_matmul(mode):
    cfg = TransformerConfig(vocab_size=11, d_model=48, n_heads=6, d_ff=80, n_layers=3)
    B, L, D, F, N, H = 2, 7, 48, 80, 6, 8
    per_layer = (
        3 * 2 * (B * L) * D * D  # q, k, v projections
        + 2 * B * N * L * L * H  # q . k^T
        + 2 * B * N * L * L * H  # probs . v
        + 2 * (B * L) * D * D  # output projection
        + 2 * (B * L) * D * F  # feed-forward in
        + 2 * (B * L) * F * D  # feed-forward out
    )
    expected = 3 * per_layer * (1 if mode == "forward" else 3)
    assert bench.encoder_flops(cfg, B, L, mode) == expected


@pytest.mark.parametrize("bad", ["8", "8x", "x128", "0x128", "8x-1", "8*128"])
def test_bad_shapes_rejected(bad):
    with pytest.raises(ValueError, match="BxL"):
        bench.parse_shapes(bad)


def test_bad_arguments_exit_2_before_work(capsys):
    assert main(["bench", "--shapes", "8x", "--json", "/nonexistent/dir/x.json"]) == 2
    assert "BxL" in capsys.readouterr().err
    assert main(["bench", "--modes", "backward"]) == 2
    assert "--modes" in capsys.readouterr().err


def test_layer_options_reach_the_config_and_the_table():
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--layers", "6", "--scan-unroll", "6"])
    cfg, fcfg = bench._build_config(args, max_length=128)
    assert (cfg.n_layers, fcfg.scan_layers, fcfg.scan_unroll) == (6, True, 6)
    assert bench._layers_text(cfg.to_dict(), fcfg.to_dict()) == "scanned layers, 6 per loop iteration"
    assert bench._layers_text(cfg.to_dict(), fcfg.replace(scan_unroll=1).to_dict()) == "scanned layers"
    cfg, unrolled = bench._build_config(parser.parse_args(["--unrolled"]), max_length=128)
    assert bench._layers_text(cfg.to_dict(), unrolled.to_dict()) == "unrolled layers"
    assert main(["bench", "--scan-unroll", "0"]) == 2  # a bad value is an argument error, before any work
