"""`flax-impl bench-decode` runs end to end on a tiny Llama-architecture model in float32 and bfloat16 (one run
shared by the tests here; the real-size model takes the same code path with another config, and is never built
in CI) and writes well-formed JSON, markdown and a PNG. Speed is never asserted: only that every measurement is
present and is the formula of the method (prefill = time of 1 token, decode = (time(N) - time(1)) / (N - 1), the
floor's share), that the JSON still holds every field of a recorded run, and that bad input and Ctrl-C stop
cleanly."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import key_paths

from flax_impl.apps.bench import decode, decode_sides
from flax_impl.apps.bench.decode import SIDES, TARGETS, agreement, llama_d_ff, summarize
from flax_impl.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "decode-cpu-2026-12-01-llama.json"
N = 5
TINY = ["--quick", "--models", "llama", "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--layers", "1",
        "--vocab", "64", "--batches", "2", "--prompts", "8", "--new-tokens", str(N), "--repeats", "2",
        "--dtype", "float32,bfloat16"]
DEFAULT_SIDES = ["flax", "torch_ref", "hf-eager", "hf-sdpa"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-decode")
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        status = main(["bench-decode", *TINY, "--json", str(out / "d.json"), "--plot", str(out / "d.png")])
    assert status == 0, log.getvalue()
    return json.loads((out / "d.json").read_text()), out, log.getvalue()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_holds_every_field_of_a_recorded_run(report):
    result, _, _ = report
    recorded = json.loads(RECORDED.read_text())
    recorded.pop("precision")  # one dtype per run then; now per row ("dtype") and per run ("dtypes")
    missing = key_paths(recorded) - key_paths(result)
    assert not missing, f"fields a recorded run reports and this one does not: {sorted(missing)}"


def test_top_level_machine_and_model(report):
    result, out, log = report
    assert result["command"].startswith("flax-impl bench-decode --quick --models llama")
    assert (result["batches"], result["prompts"], result["new_tokens"], result["repeats"]) == ([2], [8], N, 2)
    assert result["sides"] == DEFAULT_SIDES and result["targets"] == TARGETS["small"] and result["size"] == "small"
    assert result["dtypes"] == ["float32", "bfloat16"] and set(result["side_notes"]) == set(DEFAULT_SIDES)
    m = result["machine"]
    assert set(m["versions"]) == {"python", "jax", "flax", "numpy", "torch", "transformers"}
    assert "load_average_end" in m and result["omp_wait_policy"]["requested"] == "passive"
    assert m["thread_env"]["OMP_WAIT_POLICY"] == result["omp_wait_policy"]["value"] is not None  # as `bench` sets it
    model = result["models"]["llama"]
    cfg = model["config"]
    assert (cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"], cfg["causal"]) == (32, 4, 2, 1, True)
    assert cfg["position"] == "rope" and cfg["d_ff"] == llama_d_ff(32) == 128 and cfg["lm_head"] == "untied"
    assert model["hf_config"]["model_type"] == "llama" and model["hf_config"]["num_key_value_heads"] == 2
    assert model["weight_bytes"] == {"float32": 4 * model["params"], "bfloat16": 2 * model["params"]}
    assert (out / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "\r" not in log and "building the model on every side" in log


def test_every_side_measured_as_the_method_says(report):
    result, _, _ = report
    assert [(r["model"], r["dtype"], r["batch"], r["prompt"]) for r in result["results"]] == [
        ("llama", "float32", 2, 8), ("llama", "bfloat16", 2, 8)]
    for row in result["results"]:
        assert list(row["sides"]) == DEFAULT_SIDES
        for s in row["sides"].values():
            t1, tn = s["times_1_token_s"], s["times_n_tokens_s"]
            assert len(t1) == len(tn) == 2 and all(_positive(t) for t in t1 + tn)
            assert s["prefill_s"]["median"] == pytest.approx(float(np.median(t1)))
            per_token = [(b - a) / (N - 1) for a, b in zip(t1, tn, strict=True)]
            assert s["decode_s_per_token"]["median"] == pytest.approx(float(np.median(per_token)))
            if np.median(per_token) > 0:  # timing noise can exceed a tiny model's decode time
                assert s["decode_tokens_per_s"]["median"] == pytest.approx(row["batch"] / np.median(per_token))
            else:
                assert s["decode_tokens_per_s"] is None
            assert set(s["compile_s"]) == {"1_token", f"{N}_tokens"} and all(v >= 0 for v in s["compile_s"].values())
            assert s["peak_rss_mb"] is None or _positive(s["peak_rss_mb"])
            assert s["tokens_vs_flax"]["rows"] == row["batch"]
        assert row["sides"]["flax"]["tokens_vs_flax"]["equal"]
    assert result["results"][0]["sides"]["torch_ref"]["tokens_vs_flax"]["equal"]  # float32, one layer


def test_floor_and_its_shares(report):
    result, _, _ = report
    floor = result["floor"]
    assert set(floor["bandwidth"]) == {"jax", "torch"} and floor["bandwidth_bytes_per_s"] == max(
        floor["bandwidth"].values())
    assert floor["buffer_bytes"] == max(result["models"]["llama"]["weight_bytes"].values())
    for row in result["results"]:
        bytes_ = result["models"]["llama"]["weight_bytes"][row["dtype"]]
        assert row["floor_step_s"] == pytest.approx(bytes_ / floor["bandwidth_bytes_per_s"])
        assert row["floor_tokens_per_s"] == pytest.approx(row["batch"] / row["floor_step_s"])
        for s in row["sides"].values():
            if s["decode_tokens_per_s"] is not None:
                assert s["decode_floor_share"]["median"] == pytest.approx(
                    s["decode_tokens_per_s"]["median"] / row["floor_tokens_per_s"])


def test_peer_ratios_and_markdown(report, capsys):
    result, out, _ = report
    for row in result["results"]:
        s = row["sides"]
        rate = {k: s[k]["decode_tokens_per_s"]["median"] if s[k]["decode_tokens_per_s"] else 0.0 for k in s}
        assert row["peer"]["decode"] == max(("hf-eager", "hf-sdpa"), key=rate.get)
        prefill = {k: s[k]["prefill_s"]["median"] for k in s}
        assert row["peer"]["prefill"] == min(("hf-eager", "hf-sdpa"), key=prefill.get)
        assert row["ratios"]["prefill_vs_torch_ref"] == pytest.approx(prefill["torch_ref"] / prefill["flax"])
        for key, value in row["ratios"].items():
            if value is not None:
                assert row["targets_met"][key] == (value >= TARGETS["small"][key])
    assert main(["bench-decode", "--markdown", str(out / "d.json")]) == 0
    assert capsys.readouterr().out.count("| llama | bfloat16 | 2 | 8 |") == len(DEFAULT_SIDES)


def test_markdown_of_a_run_recorded_before_the_floor(capsys):
    assert main(["bench-decode", "--markdown", str(RECORDED)]) == 0
    text = capsys.readouterr().out
    assert "| llama | float32 | 8 | 512 | hf-sdpa | 689.7 (" in text and "floor:" not in text


def test_summarize_on_known_times():
    """Made-up times: the figures are the formulas of the method, the peer the faster transformers side."""
    tokens = np.zeros((2, 3), np.int32)
    raw = {}
    for side, t1, tn, first, out in (("flax", [0.1, 0.3], [0.5, 0.7], (2.0, 3.0), tokens),
                                     ("hf-eager", [0.2, 0.2], [1.2, 1.4], (0.3, 1.5), tokens),
                                     ("hf-sdpa", [0.4, 0.4], [1.0, 1.0], (0.5, 1.1), tokens + 1)):
        raw[f"{side}/1"] = dict(times=t1, first=first[0], output=None, peak_rss_mb=None, rss_step_mb=None)
        raw[f"{side}/3"] = dict(times=tn, first=first[1], output=out, peak_rss_mb=None, rss_step_mb=None)
    out = summarize(raw, ["flax", "hf-eager", "hf-sdpa"], B=2, N=3, size="small")
    flax = out["sides"]["flax"]
    assert flax["prefill_s"] == {"median": pytest.approx(0.2), "min": 0.1, "max": 0.3}
    assert flax["decode_s_per_token"]["median"] == pytest.approx(0.2)  # (0.5 - 0.1) / 2 and (0.7 - 0.3) / 2
    assert flax["decode_tokens_per_s"]["median"] == pytest.approx(10.0)
    assert flax["compile_s"] == {"1_token": pytest.approx(1.8), "3_tokens": pytest.approx(2.4)}
    assert out["peer"] == {"decode": "hf-sdpa", "prefill": "hf-eager"}  # sdpa 0.3 s/token vs eager 0.55
    assert out["ratios"]["decode_vs_hf"] == pytest.approx(0.3 / 0.2)
    assert out["ratios"]["prefill_vs_hf"] == pytest.approx(0.2 / 0.2)
    assert out["ratios"]["decode_vs_torch_ref"] is None and out["targets_met"]["decode_vs_hf"] is False
    assert out["sides"]["hf-sdpa"]["tokens_vs_flax"] == {"equal": False, "rows_equal": 0, "rows": 2,
                                                         "first_difference": 0}


def test_agreement_finds_the_first_difference():
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    other = ref.copy()
    other[1, 2] = 0
    assert agreement(ref, other) == {"equal": False, "rows_equal": 1, "rows": 2, "first_difference": 2}
    assert agreement(ref, ref)["equal"] and agreement(ref, ref)["first_difference"] is None


def _plan(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    return decode.make_plan(parser.parse_args(argv))


def test_real_size_options_and_model():
    """--size real: its defaults and the 135 M-parameter Llama-architecture model, counted without building it."""
    import jax
    from flax import nnx

    import flax_impl as fi

    plan = _plan(["--size", "real", "--dtype", "float32,bfloat16", "--torch-compile"])
    assert (plan["models"], plan["batches"], plan["prompts"], plan["new_tokens"]) == (["llama-135m"], [1, 8],
                                                                                       [128, 1024], 64)
    assert plan["dtypes"] == ["float32", "bfloat16"] and plan["sides"] == [*DEFAULT_SIDES, "hf-compile"]
    quick = _plan(["--size", "real", "--quick"])
    assert (quick["batches"], quick["prompts"], quick["new_tokens"]) == ([1], [128], 16)
    cfg = plan["configs"]["llama-135m"]
    model = nnx.eval_shape(lambda: fi.Transformer(cfg, rngs=nnx.Rngs(0)))
    D, F, V, K, H = 576, 1536, 49152, 3, 64
    per_layer = 2 * D * D + 2 * D * K * H + 3 * D * F + 2 * D  # q, o; k, v; gate, up, down; two RMSNorms
    expected = V * D + 30 * per_layer + D  # tied embedding and head, final norm
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == expected == 134515008
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.lm_head, cfg.max_len) == (9, 3, "tied", 2048)
    assert decode._weight_bytes(cfg, "float32") == 4 * expected  # 538 MB


@pytest.mark.parametrize("extra, needle", [
    (["--new-tokens", "1"], "--new-tokens=1"),
    (["--batches", "1,x"], "--batches"),
    (["--prompts", "0"], "--prompts"),
    (["--sides", "flax,jax"], "--sides"),
    (["--models", "bert"], "--models"),
    (["--size", "real", "--models", "gpt2"], "--models"),
    (["--size", "real", "--d-model", "64"], "--d-model: --size real"),
    (["--dtype", "float16"], "--dtype"),
    (["--repeats", "0"], "--repeats=0"),
    (["--kv-heads", "3"], "--kv-heads=3"),
    (["--seed", "-3"], "--seed=-3"),
    (["--seed", str(2**40)], "--seed"),
    (["--json", "/nonexistent/dir/x.json"], "--json"),
])
def test_bad_arguments_exit_2_before_work(capsys, extra, needle):
    assert main(["bench-decode", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err and len(err.strip().splitlines()) == 1


class _FakeSides:
    """Stands in for decode_sides.Sides: no model; Ctrl-C arrives during the second case."""

    calls = 0

    def __init__(self, cfg, model_type, dtype, sides, seed, folder):
        self.params = 10

    def generate(self, side, ids, n):
        type(self).calls += 1
        if ids.shape[0] == 2:
            raise KeyboardInterrupt
        return np.zeros((ids.shape[0], n), np.int32)


def test_ctrl_c_stops_with_a_summary_and_the_part_measured(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(decode_sides, "Sides", _FakeSides)
    path = tmp_path / "partial.json"
    argv = ["bench-decode", "--sides", "flax", "--batches", "1,2", "--prompts", "4", "--new-tokens", "2",
            "--repeats", "1", "--d-model", "32", "--heads", "4", "--layers", "1", "--vocab", "64", "--json", str(path)]
    assert main(argv) == 130
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # the progress lines
    assert len(lines) == 1 and re.fullmatch(
        rf"flax-impl bench-decode: interrupted after \d+ s, 1 of 4 rows measured; written to {re.escape(str(path))}",
        lines[0]), err
    assert "Traceback" not in err and out == ""
    result = json.loads(path.read_text())
    assert result["interrupted"] and [(r["model"], r["batch"]) for r in result["results"]] == [("gpt2", 1)]


def test_gpt2_sides_hold_the_same_weights(tmp_path):
    """The small gpt2 model through the same path (Flax -> save_pretrained -> transformers): the same tokens."""
    parser = argparse.ArgumentParser()
    decode.add_arguments(parser)
    args = parser.parse_args(["--d-model", "32", "--heads", "4", "--layers", "1", "--vocab", "64"])
    cfg = decode.model_config("gpt2", args, max_len=64)
    sides = decode_sides.Sides(cfg, "gpt2", "float32", ["flax", "hf-sdpa"], 0, str(tmp_path))
    ids = np.random.default_rng(0).integers(3, 64, (2, 6)).astype(np.int32)
    flax = sides.generate("flax", ids, 4)
    assert flax.shape == (2, 4)
    np.testing.assert_array_equal(sides.generate("hf-sdpa", ids, 4), flax)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.slow  # torch.compile's Inductor compile takes ~25 s on 2 cores
def test_static_cache_under_torch_compile_generates_flax_tokens(tmp_path):
    args = argparse.Namespace(d_model=32, n_heads=4, n_layers=1, d_ff=None, kv_heads=2, vocab=64)
    cfg = decode.model_config("llama", args, max_len=64)
    sides = decode_sides.Sides(cfg, "llama", "float32", ["flax", "hf-compile"], 0, str(tmp_path))
    ids = np.random.default_rng(1).integers(3, 64, (1, 8)).astype(np.int32)
    np.testing.assert_array_equal(sides.generate("hf-compile", ids, 4), sides.generate("flax", ids, 4))
    assert sides.models["hf-compile"]._compiled_call is not None  # the decode step ran compiled
    assert SIDES["hf-compile"].startswith("transformers generate")
