"""benchmarks/finetune_bench.py at its tiny size, LoRA (the side with the most parts: our adapters, peft's): both
frameworks run the same step (their first losses agree: same weights, same batch), and the report holds
throughputs, per-round ratios and memory. The figures themselves are never asserted; the full side differs only
by its optimizer (every weight) and runs in the recorded benchmarks."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from flax_impl.tolerances import TRAIN_REL

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("finetune_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # both frameworks compiled and run, one memory run in a subprocess (~40 s of CPU)
def test_tiny_bench_runs_both_frameworks_on_the_same_step(tmp_path):
    bench = _bench()
    out = tmp_path / "bench.json"
    report = bench.main(["--size", "tiny", "--batch", "2", "--seq-len", "16", "--rounds", "1", "--sides", "lora",
                         "--lora-r", "4", "--no-memory", "--json", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"lora"}
    for side, r in report["results"].items():
        losses = r["first_loss"]
        flax, torch = losses[f"flax-{side}"], losses[f"torch-{side}"]
        assert abs(flax - torch) <= TRAIN_REL * torch, (side, flax, torch)
        assert all(len(v) == 1 and min(v) > 0 for v in r["tokens_per_s"].values())
        assert len(r["flax_over_torch"]["pairs"]) == 1
    assert report["machine"]["versions"]["peft"] and report["model"]["num_hidden_layers"] == 2
    folder = bench.make_folder(tmp_path / "llama", "tiny")
    args = argparse.Namespace(size="tiny", batch=2, seq_len=16, lora_r=4, lora_alpha=16.0,
                              lora_targets=bench.TARGETS)
    memory = bench.measure_memory(args, folder, "torch-lora")
    assert memory["rss_peak_mb"] > memory["rss_before_mb"] > 0
