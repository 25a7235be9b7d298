"""`flax-impl bench` runs end to end on a tiny encoder (one run shared by every test here) and writes well-formed
JSON, a PNG and markdown. Speed is never asserted: only that every measurement is present, finite and positive,
that the JSON still holds every field a recorded run holds, that the FLOP count is the formula counted matmul by
matmul, that the machine is reported as it describes itself, and that bad input stops before any work."""

import argparse
import contextlib
import io
import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from bench_helpers import key_paths

from flax_impl.apps.bench import common, encoder, encoder_sides, machine
from flax_impl.apps.bench.encoder import EAGER_PEERS
from flax_impl.apps.cli import main
from flax_impl.apps.progress import Progress
from flax_impl.config import TransformerConfig

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "cpu-quick-pairs-2026-12-01-6.json"
TINY = ["--quick", "--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "50", "--shapes", "8x128",
        "--repeats", "3", "--warmup", "0", "--matmul-size", "64", "--compile-layers", "1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    log = io.StringIO()
    with contextlib.redirect_stderr(log):  # not a terminal: the progress writes plain lines
        status = main(["bench", *TINY, "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")])
    assert status == 0, log.getvalue()
    return json.loads((out / "bench.json").read_text()), out, log.getvalue()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_holds_every_field_of_a_recorded_run(report):
    result, _, _ = report
    missing = key_paths(json.loads(RECORDED.read_text())) - key_paths(result)
    assert not missing, f"fields a recorded run reports and this one does not: {sorted(missing)}"
    assert result["interrupted"] is False


def test_json_top_level(report):
    result, _, _ = report
    assert result["device"] == "cpu" and isinstance(result["device_name"], str) and result["device_name"]
    assert set(result["matmul_peak"]) == {"jax", "torch"} and _positive(result["matmul_peak_flops"])
    assert result["matmul_peak_flops"] == max(result["matmul_peak"].values())
    assert result["config"]["n_layers"] == 1 and result["config"]["d_model"] == 32
    assert result["command"].startswith("flax-impl bench --quick --layers 1 --d-model 32")
    assert datetime.fromisoformat(result["date_utc"]).utcoffset() == timedelta(0)


def test_json_machine_is_the_detected_one(report):
    result, _, _ = report
    m = result["machine"]
    assert {k: m[k] for k in ("cpu_model", "cpu_model_source", "isa")} == machine.read_cpu()
    assert result["device_name"] == (m["cpu_model"] or f"{m['arch']} CPU, model not reported")
    assert m["cores"] == result["cores"] == os.cpu_count()
    assert m["torch_threads"] == result["torch_threads"] >= 1 and m["torch_interop_threads"] >= 1
    assert m["gpu"] is None and m["xla_flags"] == os.environ.get("XLA_FLAGS")
    assert m["thread_env"] == {name: os.environ.get(name) for name in machine.THREAD_ENV}
    assert m["versions"] == result["versions"] and set(m["versions"]) == {"python", "jax", "flax", "numpy", "torch"}
    for key in ("load_average_start", "load_average_end"):
        assert m[key] is None or (len(m[key]) == 3 and all(x >= 0 for x in m[key]))


def test_every_measurement_present_and_positive(report):
    result, _, _ = report
    rows = result["results"]
    assert result["peers"] == list(EAGER_PEERS) and result["peer_notes"] == []
    assert [(r["framework"], r["mode"]) for r in rows] == [
        (name, mode) for mode in ("forward", "train") for name in ("flax", *EAGER_PEERS)]
    for r in rows:
        assert (r["batch"], r["length"], r["position"]) == (8, 128, "sinusoidal")
        tps = r["tokens_per_s"]
        assert all(_positive(tps[k]) for k in ("median", "min", "max")) and tps["min"] <= tps["median"] <= tps["max"]
        assert len(r["times_s"]) == r["repeats"] == 3 and all(_positive(t) for t in r["times_s"])
        assert r["compile_s"] >= 0 and _positive(r["first_call_s"]) and _positive(r["peak_fraction"])
        assert r["achieved_flops"] == pytest.approx(r["flops"] / r["step_s"]["median"])
        assert r["peak_fraction"] == pytest.approx(r["achieved_flops"] / result["matmul_peak_flops"])
        assert r["mfu"] is None and result["device_peak_flops"] is None  # no nominal peak for a CPU
        assert isinstance(r["attention"], str) and r["attention"]
        assert r["peak_rss_mb"] is None or _positive(r["peak_rss_mb"])
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
        assert len(fastest) == 1 and fastest[0]["tokens_per_s"]["median"] == max(
            r["tokens_per_s"]["median"] for r in peers)
    targets = {(t["mode"], t["what"]): t for t in result["targets"]}  # 8 x 128 is a target shape
    assert set(targets) == {("forward", "torch_ref"), ("forward", "fastest"), ("forward", "peak"), ("train", "fastest")}
    for t in targets.values():
        assert t["met"] == (t["value"] >= t["threshold"])


def test_kernels_precision_and_thread_policy_are_stated(report):
    result, _, log = report
    for kernels in result["attention"].values():
        assert set(kernels) == {"flax", *EAGER_PEERS}
    assert result["attention"]["forward"]["flax"].startswith("einsum")  # CPU: "auto" takes the einsum path
    assert "dropout" in result["attention"]["train"]["flax"]
    assert "SDPA" in result["attention"]["forward"]["torch_ref+sdpa"]
    assert "'float32'" in result["matmul_precision"]["jax"] and "'highest'" in result["matmul_precision"]["torch"]
    assert result["omp_wait_policy"]["requested"] == "passive"
    assert result["omp_wait_policy"]["effective"] is False  # the test process imported torch first: say so
    assert "\r" not in log and "first call (compile)" in log  # progress a log file can read


def test_compile_scaling_and_plot(report):
    result, out, _ = report
    assert [s["mode"] for s in result["compile_scaling"]] == ["forward", "train"]
    for s in result["compile_scaling"]:
        assert list(s["compile_s"]) == ["1"] and _positive(s["compile_s"]["1"]) and s["layers"] == "scanned layers"
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_of_recorded_runs(capsys):
    assert main(["bench", "--markdown", str(RECORDED), str(RECORDED)]) == 0
    text = capsys.readouterr().out
    assert text.count("| flax | forward | 8 | 128 |") == 2 and "median of runs [all pairs]" in text
    assert "| 8 x 128 | forward | torch_ref | 1.03 (0.91-1.15) / 1.03 (0.91-1.15) | 1.03 [" in text
    older = ROOT / "benchmarks" / "cpu-quick-2026-12-01-1.json"  # written before the peers and the pairs
    assert main(["bench", "--markdown", str(older)]) == 2
    assert "not a result of this command" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_flop_count_matches_matmul_by_matmul(mode):
    cfg = TransformerConfig(vocab_size=11, d_model=48, n_heads=6, d_ff=80, n_layers=3)
    B, L, D, F, N, H = 2, 7, 48, 80, 6, 8
    per_layer = (3 * 2 * (B * L) * D * D + 2 * B * N * L * L * H + 2 * B * N * L * L * H  # q, k, v; q.k^T; p.v
                 + 2 * (B * L) * D * D + 2 * (B * L) * D * F + 2 * (B * L) * F * D)  # out; feed-forward in, out
    assert encoder.encoder_flops(cfg, B, L, mode) == 3 * per_layer * (1 if mode == "forward" else 3)


@pytest.mark.parametrize("bad", ["8", "8x", "x128", "0x128", "8x-1", "8*128"])
def test_bad_shapes_rejected(bad):
    with pytest.raises(ValueError, match="BxL"):
        encoder.parse_shapes(bad)


@pytest.fixture
def no_work(monkeypatch):
    """Every step that measures or builds a model fails loudly: a test using it proves nothing ran."""

    def forbidden(*args, **kwargs):
        raise AssertionError("bench did work before reporting the bad option")

    for module, name in ((common, "matmul_peak"), (machine, "detect_machine"), (encoder_sides, "FlaxSide")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.mark.parametrize("argv, option", [
    (["--shapes", "8x", "--json", "/nonexistent/dir/x.json"], "--json"),
    (["--shapes", "8x"], "BxL"),
    (["--modes", "backward"], "--modes"),
    (["--peers", "torch.nn,pytorch"], "--peers"),
    (["--peers", "torch.nn", "--position", "rope"], "--peers torch.nn"),  # nn.TransformerEncoderLayer: no RoPE
    (["--frameworks", "flax", "--peers", "torch_ref"], "--peers"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "-1"], "--warmup"),
    (["--compile-layers", "1,x"], "--compile-layers"),
    (["--config", "/nonexistent/cfg.json"], "cfg.json"),
    (["--seed", "-1"], "--seed=-1"),
    (["--seed", str(2**32)], "--seed=4294967296"),
    (["--dropout", "nan"], "--dropout"),
    (["--d-model", "30", "--heads", "4"], "n_heads=4 must divide d_model=30"),
    (["--scan-unroll", "0"], "--scan-unroll=0"),
])
def test_bad_arguments_exit_2_before_work(no_work, capsys, argv, option):
    assert main(["bench", *argv]) == 2, argv
    out, err = capsys.readouterr()
    assert out == "" and option in err and len(err.strip().splitlines()) == 1


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


@pytest.mark.parametrize("option, path, message", [("--json", "missing-dir/x.json", "does not exist"),
                                                   ("--plot", "missing-dir/x.png", "does not exist"),
                                                   ("--json", ".", "is a directory")])
def test_bad_output_path_fails_before_any_work(no_work, tmp_path, capsys, option, path, message):
    assert main(["bench", "--quick", option, str(tmp_path / path)]) == 2
    err = capsys.readouterr().err
    assert f"flax-impl bench: error: {option} " in err and message in err
    assert not (tmp_path / "missing-dir").exists()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    encoder.add_arguments(parser)
    return parser


def test_default_peers_leave_out_what_cannot_hold_the_architecture():
    plan = encoder.make_plan(_parser().parse_args(["--position", "rope", "--shapes", "2x8"]))
    assert plan.peers == ["torch_ref", "torch_ref+sdpa"]
    assert len(plan.peer_notes) == 1 and "position=rope" in plan.peer_notes[0]
    plan = encoder.make_plan(_parser().parse_args(["--shapes", "2x8", "--torch-compile"]))
    assert plan.peers == [*EAGER_PEERS, "torch.compile"]


def test_layer_and_model_options_reach_the_config():
    cfg, fcfg = encoder.build_config(_parser().parse_args(["--layers", "6", "--scan-unroll", "6"]), max_length=128)
    assert (cfg.n_layers, fcfg.scan_layers, fcfg.scan_unroll) == (6, True, 6)
    assert encoder.layers_text(cfg, fcfg) == "scanned layers, 6 per loop iteration"
    assert encoder.layers_text(cfg, fcfg.replace(scan_unroll=1)) == "scanned layers"
    cfg, unrolled = encoder.build_config(_parser().parse_args(["--unrolled"]), max_length=128)
    assert encoder.layers_text(cfg, unrolled) == "unrolled layers"
    for spelling in (["--n-heads", "4", "--n-layers", "3"], ["--heads", "4", "--layers", "3"]):
        cfg, _ = encoder.build_config(_parser().parse_args(["--d-model", "32", *spelling]), max_length=8)
        assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff) == (32, 4, 3, 128)


def test_without_torch_flax_alone_runs_and_the_rest_says_what_to_install(tmp_path):
    """A core install: `bench --frameworks flax` runs, `bench` and `bench-decode` exit 2 naming what to install."""
    code = f"""import sys, json
sys.modules["torch"] = sys.modules["transformers"] = None  # as if not installed
from flax_impl.apps.cli import main
print(main(["bench"]), main(["bench-decode"]))
print(main(["bench", "--frameworks", "flax", "--modes", "forward", *{TINY!r}, "--json", {str(tmp_path / "f.json")!r}]))
print("torch" in sys.modules and sys.modules["torch"] is not None)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "2 2" and lines[-2:] == ["0", "False"], out.stdout + out.stderr
    assert "flax-impl bench: error: --frameworks torch (the PyTorch peers; --frameworks flax runs without) needs " \
           "torch: pip install torch" in out.stderr
    assert "flax-impl bench-decode: error: bench-decode --sides flax,torch_ref,hf-eager,hf-sdpa needs torch, " \
           "transformers" in out.stderr
    result = json.loads((tmp_path / "f.json").read_text())
    assert [r["framework"] for r in result["results"]] == ["flax"] and "torch" not in result["versions"]


def test_importing_the_bench_leaves_torch_unloaded():
    """torch's OpenMP runtime reads OMP_WAIT_POLICY when torch loads: the bench must set it first."""
    code = "import sys; import flax_impl.apps.bench.encoder, flax_impl.apps.bench.decode, flax_impl.apps.cli; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "False"


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma avx512f_not_a_flag

processor\t: 1
model name\t: Some Other CPU
flags\t\t: avx2 avx512f avx512_bf16 amx_tile
"""


def test_parse_cpuinfo_reads_the_first_processor_and_guesses_nothing(tmp_path):
    assert machine.parse_cpuinfo(CPUINFO) == {  # whole words only: "avx512f_not_a_flag" is not avx512f
        "cpu_model": "AMD EPYC 7B13",
        "isa": {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_tile": False, "amx_bf16": False}}
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
    assert machine.parse_cpuinfo(arm) == {"cpu_model": None, "isa": None}  # no model name, no flags line
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert machine.read_cpu(str(path))["cpu_model_source"] == f"{path} model name"
    path.write_text("processor\t: 0\nflags\t\t: avx2\n")
    no_model = machine.read_cpu(str(path))
    assert no_model["cpu_model"] == (platform.processor() or None) and no_model["isa"]["avx2"] is True
    assert no_model["cpu_model_source"] == "platform.processor()"
    missing = machine.read_cpu(str(tmp_path / "absent"))
    assert missing["isa"] is None and missing["cpu_model_source"] == "platform.processor()"


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo on this OS")
def test_detect_machine_reports_what_proc_cpuinfo_says():
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    m = machine.detect_machine(with_torch=False)
    assert m["cpu_model"] == model and m["cpu_model_source"] == "/proc/cpuinfo model name"
    assert m["isa"] == {name: name in flags for name in machine.ISA_FLAGS}
    assert m["cores"] == os.cpu_count() and m["torch_threads"] is None and "torch" not in m["versions"]
    line = machine.describe({**m, "load_average_end": machine.load_average()})
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
