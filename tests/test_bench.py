"""`flax-impl bench` runs end to end on a tiny encoder and writes well-formed JSON and a PNG. Speed is never
asserted: only that every measurement is present, finite and positive, that the FLOP count is the formula
counted matmul by matmul, and that the machine is reported as it describes itself (never guessed)."""

import argparse
import io
import json
import math
import os
import platform
from datetime import datetime, timedelta

import pytest

from flax_impl.apps import bench, machine
from flax_impl.apps.bench_report import layers_text
from flax_impl.apps.bench_results import EAGER_PEERS
from flax_impl.apps.cli import main
from flax_impl.apps.progress import Progress
from flax_impl.config import TransformerConfig

TINY = ["--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "50", "--shapes", "2x8", "--repeats", "3",
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
    assert result["command"].startswith("flax-impl bench --layers 1 --d-model 32")
    assert datetime.fromisoformat(result["date_utc"]).utcoffset() == timedelta(0)


@pytest.mark.slow
def test_json_machine_is_the_detected_one(report):
    result, _ = report
    m = result["machine"]
    expected = machine.read_cpu()
    assert {k: m[k] for k in ("cpu_model", "cpu_model_source", "isa")} == expected
    assert result["device_name"] == (m["cpu_model"] or f"{m['arch']} CPU, model not reported")
    assert m["cores"] == result["cores"] == os.cpu_count()
    assert m["torch_threads"] == result["torch_threads"] and m["torch_threads"] >= 1
    assert m["torch_interop_threads"] >= 1 and m["gpu"] is None  # a CPU run
    assert m["thread_env"] == {name: os.environ.get(name) for name in machine.THREAD_ENV}
    assert m["versions"] == result["versions"] and set(m["versions"]) == {"python", "jax", "flax", "numpy", "torch"}
    assert m["xla_flags"] == os.environ.get("XLA_FLAGS")
    for key in ("load_average_start", "load_average_end"):
        assert m[key] is None or (len(m[key]) == 3 and all(x >= 0 for x in m[key]))


@pytest.mark.slow
def test_every_measurement_present_and_positive(report):
    result, _ = report
    rows = result["results"]
    assert result["peers"] == list(EAGER_PEERS) and result["peer_notes"] == []
    assert {(r["framework"], r["mode"]) for r in rows} == {
        (name, mode) for name in ("flax", *EAGER_PEERS) for mode in ("forward", "train")
    }
    for r in rows:
        assert (r["batch"], r["length"], r["position"]) == (2, 8, "sinusoidal")
        tps = r["tokens_per_s"]
        assert all(_positive(tps[k]) for k in ("median", "min", "max"))
        assert tps["min"] <= tps["median"] <= tps["max"]
        assert len(r["times_s"]) == r["repeats"] == 3 and all(_positive(t) for t in r["times_s"])
        assert r["compile_s"] >= 0 and _positive(r["first_call_s"])
        assert _positive(r["flops"]) and _positive(r["achieved_flops"]) and _positive(r["peak_fraction"])
        assert r["achieved_flops"] == pytest.approx(r["flops"] / r["step_s"]["median"])
        assert r["peak_fraction"] == pytest.approx(r["achieved_flops"] / result["matmul_peak_flops"])
        assert r["mfu"] is None and result["device_peak_flops"] is None  # no nominal peak for a CPU
        assert isinstance(r["attention"], str) and r["attention"]
        if r["peak_rss_mb"] is not None:
            assert _positive(r["peak_rss_mb"])
        if r["framework"] == "flax":
            assert r["flax_speedup"] is None and not r["fastest_peer"]
            continue
        flax = next(x for x in rows if (x["framework"], x["mode"]) == ("flax", r["mode"]))
        s = r["flax_speedup"]  # this peer's time over Flax's, round by round
        assert s["pairs"] == pytest.approx([p / f for p, f in zip(r["times_s"], flax["times_s"], strict=True)])
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    for mode in ("forward", "train"):
        peers = [r for r in rows if r["mode"] == mode and r["framework"] in EAGER_PEERS]
        fastest = [r for r in peers if r["fastest_peer"]]
        assert len(fastest) == 1
        assert fastest[0]["tokens_per_s"]["median"] == max(r["tokens_per_s"]["median"] for r in peers)
    assert result["targets"] == []  # measured only at the target shapes (8x128, 4x512)


@pytest.mark.slow
def test_kernels_precision_and_thread_policy_are_stated(report):
    result, _ = report
    assert set(result["attention"]) == {"forward", "train"}
    for kernels in result["attention"].values():
        assert set(kernels) == {"flax", *EAGER_PEERS}
    assert result["attention"]["forward"]["flax"].startswith("einsum")  # CPU: "auto" takes the einsum path
    assert "dropout" in result["attention"]["train"]["flax"]
    assert "SDPA" in result["attention"]["forward"]["torch_ref+sdpa"]
    assert set(result["matmul_precision"]) == {"jax", "torch"}
    assert "'float32'" in result["matmul_precision"]["jax"] and "'highest'" in result["matmul_precision"]["torch"]
    omp = result["omp_wait_policy"]
    assert omp["requested"] == "passive"
    assert omp["effective"] is False  # the test process imported torch first: the report must say so


@pytest.mark.slow
def test_compile_scaling_and_plot(report):
    result, out = report
    assert [s["mode"] for s in result["compile_scaling"]] == ["forward", "train"]
    for s in result["compile_scaling"]:
        assert set(s["compile_s"]) == {"1", "2"} and all(_positive(t) for t in s["compile_s"].values())
        assert s["layers"] == "scanned layers"
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


def test_bad_arguments_exit_2_before_work(no_work, capsys):
    assert main(["bench", "--shapes", "8x", "--json", "/nonexistent/dir/x.json"]) == 2
    assert "BxL" in capsys.readouterr().err
    assert main(["bench", "--modes", "backward"]) == 2
    assert "--modes" in capsys.readouterr().err
    for argv, option in [
        (["--peers", "torch.nn,pytorch"], "--peers"),
        (["--peers", "torch.nn", "--position", "rope"], "--peers torch.nn"),  # nn.TransformerEncoderLayer: no RoPE
        (["--frameworks", "flax", "--peers", "torch_ref"], "--peers"),
        (["--repeats", "0"], "--repeats"),
        (["--warmup", "-1"], "--warmup"),
        (["--compile-layers", "1,x"], "--compile-layers"),
        (["--config", "/nonexistent/cfg.json"], "cfg.json"),
    ]:
        assert main(["bench", *argv]) == 2, argv
        assert option in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "tpu"])
def test_missing_accelerator_exits_2_before_work(no_work, capsys, device):
    import jax

    try:
        jax.devices(device)
        pytest.skip(f"this machine has a {device}")
    except RuntimeError:
        pass
    assert main(["bench", "--quick", "--device", device]) == 2
    assert f"--device {device}" in capsys.readouterr().err


def test_default_peers_leave_out_what_cannot_hold_the_architecture():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    plan = bench.make_plan(parser.parse_args(["--position", "rope", "--shapes", "2x8"]))
    assert plan.peers == ["torch_ref", "torch_ref+sdpa"]
    assert len(plan.peer_notes) == 1 and "position=rope" in plan.peer_notes[0]
    plan = bench.make_plan(parser.parse_args(["--shapes", "2x8", "--torch-compile"]))
    assert plan.peers == [*EAGER_PEERS, "torch.compile"]


def test_importing_the_bench_leaves_torch_unloaded():
    """torch's OpenMP runtime reads OMP_WAIT_POLICY when torch loads: the bench must set it first."""
    import subprocess
    import sys

    code = "import sys; import flax_impl.apps.bench, flax_impl.apps.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "False"


def test_layer_options_reach_the_config_and_the_table():
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--layers", "6", "--scan-unroll", "6"])
    cfg, fcfg = bench.build_config(args, max_length=128)
    assert (cfg.n_layers, fcfg.scan_layers, fcfg.scan_unroll) == (6, True, 6)
    assert layers_text(cfg.to_dict(), fcfg.to_dict()) == "scanned layers, 6 per loop iteration"
    assert layers_text(cfg.to_dict(), fcfg.replace(scan_unroll=1).to_dict()) == "scanned layers"
    cfg, unrolled = bench.build_config(parser.parse_args(["--unrolled"]), max_length=128)
    assert layers_text(cfg.to_dict(), unrolled.to_dict()) == "unrolled layers"
    assert main(["bench", "--scan-unroll", "0"]) == 2  # a bad value is an argument error, before any work


@pytest.mark.parametrize("spelling", [["--n-heads", "4", "--n-layers", "3"], ["--heads", "4", "--layers", "3"]])
def test_model_options_are_the_shared_ones(spelling):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    cfg, _ = bench.build_config(parser.parse_args(["--d-model", "32", *spelling]), max_length=8)
    assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff) == (32, 4, 3, 128)
    cfg, _ = bench.build_config(parser.parse_args(["--d-model", "32", "--d-ff", "48", *spelling]), max_length=8)
    assert cfg.d_ff == 48


@pytest.fixture
def no_work(monkeypatch):
    """Make every step that measures or builds a model fail loudly: a test using it proves nothing ran."""

    def forbidden(*args, **kwargs):
        raise AssertionError("bench did work before reporting the bad option")

    for name in ("matmul_peak", "FlaxSide", "TorchSide", "detect_machine"):
        monkeypatch.setattr(bench, name, forbidden)


@pytest.mark.parametrize(
    "option, path, message",
    [
        ("--json", "missing-dir/x.json", "does not exist"),
        ("--plot", "missing-dir/x.png", "does not exist"),
        ("--json", ".", "is a directory"),
    ],
)
def test_bad_output_path_fails_before_any_work(no_work, tmp_path, capsys, option, path, message):
    target = str(tmp_path / path)
    assert main(["bench", "--quick", option, target]) == 2
    err = capsys.readouterr().err
    assert f"flax-impl bench: error: {option} " in err and message in err
    assert not (tmp_path / "missing-dir").exists()


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma avx512f_not_a_flag

processor\t: 1
model name\t: Some Other CPU
flags\t\t: avx2 avx512f avx512_bf16 amx_tile
"""


def test_parse_cpuinfo_reads_the_first_processor_and_guesses_nothing():
    info = machine.parse_cpuinfo(CPUINFO)
    assert info == {  # whole words only: "avx512f_not_a_flag" is not avx512f
        "cpu_model": "AMD EPYC 7B13",
        "isa": {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False},
    }
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
    assert machine.parse_cpuinfo(arm) == {"cpu_model": None, "isa": None}  # no model name, no flags line


def test_read_cpu_names_its_source(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert machine.read_cpu(str(path))["cpu_model_source"] == f"{path} model name"
    path.write_text("processor\t: 0\nflags\t\t: avx2\n")
    no_model = machine.read_cpu(str(path))
    assert no_model["cpu_model"] == (platform.processor() or None)
    assert no_model["cpu_model_source"] == "platform.processor()"
    assert no_model["isa"]["avx2"] is True
    missing = machine.read_cpu(str(tmp_path / "absent"))
    assert missing["isa"] is None and missing["cpu_model_source"] == "platform.processor()"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo on this OS")
def test_detect_machine_reports_what_proc_cpuinfo_says():
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    m = machine.detect_machine(with_torch=False)
    assert m["cpu_model"] == model and m["cpu_model_source"] == "/proc/cpuinfo model name"
    assert m["isa"] == {name: name in flags for name in machine.ISA_FLAGS}
    assert m["cores"] == os.cpu_count() and m["torch_threads"] is None and "torch" not in m["versions"]
    assert m["xla_flags"] == os.environ.get("XLA_FLAGS")
    line = machine.describe(machine.finish_machine(m))
    assert line.startswith(f"{model} (/proc/cpuinfo model name)") and "->" in line
    for name in machine.ISA_FLAGS:
        assert (f" {name}" if name in flags else f"-{name}") in line


def test_progress_off_a_terminal_writes_one_line_per_phase():
    out = io.StringIO()
    p = Progress(4, stream=out)
    p.step("phase a", 0)
    p.step("phase a", detail="ignored off a terminal")
    p.step("phase b", 3)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("phase a") and "ignored" not in out.getvalue()
    assert lines[1].startswith("[" + "#" * 24 + "] 100%") and lines[1].endswith("phase b")
