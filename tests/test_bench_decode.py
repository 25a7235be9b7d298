"""`flax-impl bench-decode --quick` runs end to end on a tiny model and writes well-formed JSON, a markdown table
and a PNG. Speed is never asserted: only that every measurement is present, finite and consistent with the
method (prefill = time of 1 token, decode = (time(N) - time(1)) / (N - 1)), that the peer is transformers' faster
implementation, that the ratios are the ones of the medians, and that the machine is the detected one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flax_impl.apps import machine
from flax_impl.apps.bench_decode import TARGETS, llama_d_ff, summarize
from flax_impl.apps.bench_decode_report import markdown_table
from flax_impl.apps.bench_decode_sides import SIDES, agreement
from flax_impl.apps.cli import main

N = 5
TINY = ["--quick", "--models", "llama", "--d-model", "32", "--heads", "4", "--kv-heads", "2", "--layers", "1",
        "--vocab", "64", "--batches", "1,2", "--prompts", "8", "--new-tokens", str(N), "--repeats", "2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-decode")
    status = main(["bench-decode", *TINY, "--json", str(out / "d.json"), "--plot", str(out / "d.png")])
    assert status == 0
    return json.loads((out / "d.json").read_text()), out


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_top_level_and_machine(report):
    result, out = report
    assert result["command"].startswith("flax-impl bench-decode --quick --models llama")
    assert (result["batches"], result["prompts"], result["new_tokens"], result["repeats"]) == ([1, 2], [8], N, 2)
    assert result["sides"] == list(SIDES) and result["targets"] == TARGETS
    m = result["machine"]
    assert {k: m[k] for k in ("cpu_model", "cpu_model_source", "isa")} == machine.read_cpu()
    assert set(m["versions"]) == {"python", "jax", "flax", "numpy", "torch"} and "load_average_end" in m
    cfg = result["models"]["llama"]["config"]
    assert (cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["n_layers"], cfg["causal"]) == (32, 4, 2, 1, True)
    assert cfg["position"] == "rope" and cfg["d_ff"] == llama_d_ff(32) == 128
    assert (out / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_side_measured_as_the_method_says(report):
    result, _ = report
    assert [(r["model"], r["batch"], r["prompt"]) for r in result["results"]] == [("llama", 1, 8), ("llama", 2, 8)]
    for row in result["results"]:
        assert list(row["sides"]) == list(SIDES)
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
            a = s["tokens_vs_flax"]
            assert a["rows"] == row["batch"] and 0 <= a["rows_equal"] <= a["rows"]
        assert row["sides"]["flax"]["tokens_vs_flax"]["equal"]


def test_peer_and_ratios_follow_the_medians(report):
    result, _ = report
    for row in result["results"]:
        s = row["sides"]
        rate = {k: s[k]["decode_tokens_per_s"]["median"] if s[k]["decode_tokens_per_s"] else 0.0 for k in s}
        assert row["peer"]["decode"] == max(("hf-eager", "hf-sdpa"), key=rate.get)
        prefill = {k: s[k]["prefill_s"]["median"] for k in s}
        assert row["peer"]["prefill"] == min(("hf-eager", "hf-sdpa"), key=prefill.get)
        assert row["ratios"]["prefill_vs_torch_ref"] == pytest.approx(prefill["torch_ref"] / prefill["flax"])
        assert row["ratios"]["prefill_vs_hf"] == pytest.approx(prefill[row["peer"]["prefill"]] / prefill["flax"])
        for key, value in row["ratios"].items():
            if value is not None:
                assert row["targets_met"][key] == (value >= TARGETS[key])
    table = markdown_table(result)
    assert table.count("| llama |") == 2 * len(SIDES) + 2


def test_summarize_on_known_times():
    """Made-up times: the figures are the formulas of the method, the peer the faster transformers side."""
    tokens = np.zeros((2, 3), np.int32)
    raw = {
        "flax": dict(t1=[0.1, 0.3], tn=[0.5, 0.7], first_1=2.0, first_n=3.0, tokens=tokens),
        "hf-eager": dict(t1=[0.2, 0.2], tn=[1.2, 1.4], first_1=0.3, first_n=1.5, tokens=tokens),
        "hf-sdpa": dict(t1=[0.4, 0.4], tn=[1.0, 1.0], first_1=0.5, first_n=1.1, tokens=tokens + 1),
    }
    out = summarize(raw, B=2, N=3)
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


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--new-tokens", "1"], "--new-tokens=1"),
        (["--batches", "1,x"], "--batches"),
        (["--prompts", "0"], "--prompts"),
        (["--sides", "flax,jax"], "--sides"),
        (["--models", "bert"], "--models"),
        (["--repeats", "0"], "--repeats=0"),
        (["--kv-heads", "3"], "--kv-heads=3"),
        (["--json", "/nonexistent/dir/x.json"], "--json"),
    ],
)
def test_bad_arguments_exit_2_before_work(capsys, extra, needle):
    assert main(["bench-decode", *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err
