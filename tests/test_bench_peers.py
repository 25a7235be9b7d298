"""The bench's PyTorch peers compute what torch_ref computes with the same weights; the per-pair ratios and the
targets are the formulas they claim; what the bench pins and states per device (precision, OpenMP policy, the
attention kernel, the device peak). Nothing here measures speed."""

import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import flax_impl as fi
import torch_ref as tr
from flax_impl.apps.bench import encoder_sides, machine
from flax_impl.apps.bench.common import pair_ratios, rounds
from flax_impl.apps.bench.encoder import EAGER_PEERS, check_targets, make_records
from flax_impl.apps.bench.encoder_sides import unsupported
from flax_impl.apps.bench.peers import build_peers, sdpa_backend
from flax_impl.tolerances import BLOCK

CFG = fi.TransformerConfig(vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_layers=2, dropout=0.0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_peers_compute_the_twins_output(norm_first):
    cfg = CFG.replace(norm_first=norm_first)
    twin = tr.Transformer(cfg)
    flax_model = fi.Transformer(cfg, rngs=nnx.Rngs(3))
    twin.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(flax_model)))
    peers = build_peers(twin, list(EAGER_PEERS), "cpu")
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 50, (2, 9)))
    ref = twin.eval()(ids).detach().numpy()
    for name, module in peers.items():
        module.eval()
        with torch.inference_mode():  # torch.nn: the fused fast path
            fast = module(ids).numpy()
        np.testing.assert_allclose(fast, ref, rtol=0, atol=BLOCK, err_msg=name)
        module.train()  # dropout 0: the training path gives the same output
        np.testing.assert_allclose(module(ids).detach().numpy(), ref, rtol=0, atol=BLOCK, err_msg=name)


def test_sdpa_peer_keeps_rope_and_causality():
    cfg = CFG.replace(position="rope", causal=True)
    twin = tr.Transformer(cfg).eval()
    sdpa = build_peers(twin, ["torch_ref+sdpa"], "cpu")["torch_ref+sdpa"].eval()
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 50, (2, 7)))
    with torch.no_grad():
        np.testing.assert_allclose(sdpa(ids).numpy(), twin(ids).numpy(), rtol=0, atol=BLOCK)


def test_torch_nn_refuses_what_it_cannot_hold():
    assert unsupported("torch.nn", CFG) is None
    assert "position=alibi" in unsupported("torch.nn", CFG.replace(position="alibi"))
    assert "grouped-query" in unsupported("torch.nn", CFG.replace(n_kv_heads=2))
    with pytest.raises(ValueError, match="torch.nn"):
        build_peers(tr.Transformer(CFG.replace(norm="rmsnorm")), ["torch.nn"], "cpu")
    with pytest.raises(ValueError, match="choose from"):
        build_peers(tr.Transformer(CFG), ["torch.jit"], "cpu")


def test_sdpa_backend_is_the_dispatchers_choice():
    names = {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH", "unknown"}
    assert sdpa_backend("cpu", 2, 16, CFG, torch.float32, train=False) in names
    # attention dropout with gradients: torch's CPU flash kernel has no dropout, so the math backend runs
    assert sdpa_backend("cpu", 2, 16, CFG.replace(dropout=0.1), torch.float32, train=True) == "MATH"


def test_pair_ratios_are_round_by_round():
    r = pair_ratios([1.0, 2.0, 1.0, 4.0], [2.0, 2.0, 3.0, 2.0])  # other / reference per round
    assert r["pairs"] == [2.0, 1.0, 3.0, 0.5]
    assert (r["median"], r["min"], r["max"]) == (1.5, 0.5, 3.0)
    assert r["q1"] == pytest.approx(0.875) and r["q3"] == pytest.approx(2.25)
    with pytest.raises(ValueError, match="equal"):
        pair_ratios([1.0], [1.0, 2.0])


def test_rounds_alternate_the_order():
    assert list(rounds(["a", "b", "c"], 3)) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"),
                                                (2, "a"), (2, "b"), (2, "c")]


def _raw(times: dict[str, list[float]]) -> dict:
    return {k: {"first": 2 * max(t), "times": t, "peak_rss_mb": None, "rss_step_mb": None} for k, t in times.items()}


def test_records_and_targets():
    cfg = fi.TransformerConfig(vocab_size=50)
    runs = {}
    times = {"flax": [1.0, 1.0, 1.0], "torch_ref": [1.2, 1.3, 1.1], "torch.nn": [1.0, 1.1, 1.04],
             "torch_ref+sdpa": [1.2, 1.2, 1.2]}
    for mode, scale in (("forward", 1.0), ("train", 3.0)):
        raw = _raw({k: [scale * x for x in t] for k, t in times.items()})
        runs[mode] = make_records(raw, cfg, 8, 128, mode, "fp32", 3, {"flax": "einsum"})
    records = runs["forward"] + runs["train"]
    nn_row = next(r for r in runs["forward"] if r["framework"] == "torch.nn")
    assert nn_row["fastest_peer"] and nn_row["flax_speedup"]["median"] == pytest.approx(1.04)
    assert sum(r["fastest_peer"] for r in records) == 2  # one per (B, L, mode)
    assert runs["forward"][0]["attention"] == "einsum" and runs["forward"][1]["attention"] is None
    for r in records:
        r["peak_fraction"] = 0.9 if r["mode"] == "forward" else 0.5
    targets = {(t["mode"], t["what"]): t for t in check_targets(records)}
    assert set(targets) == {("forward", "torch_ref"), ("forward", "fastest"), ("forward", "peak"), ("train", "fastest")}
    ref = targets[("forward", "torch_ref")]
    assert (ref["value"], ref["spread"], ref["met"]) == (pytest.approx(1.2), [pytest.approx(1.1), pytest.approx(1.3)],
                                                          True)
    assert targets[("forward", "fastest")]["against"] == "torch.nn" and not targets[("forward", "fastest")]["met"]
    assert targets[("forward", "peak")]["met"] and targets[("train", "fastest")]["met"]


def test_device_peaks():
    assert encoder_sides.device_peak("NVIDIA H200", "float32") == pytest.approx(66.9e12)
    assert encoder_sides.device_peak("NVIDIA H100 PCIe", "bfloat16") == pytest.approx(756e12)  # PCIe before H100
    assert encoder_sides.device_peak("TPU v5 lite", "float32") is None  # no such entry: no MFU, not a guess
    assert encoder_sides.device_peak("Intel(R) Xeon(R) Processor", "float32") is None


def test_matmul_precision_is_pinned_and_restored():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with encoder_sides.pin_matmul_precision("tensorfloat32", with_torch=True) as stated:
        assert jax.config.jax_default_matmul_precision == "tensorfloat32"
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 is True
        assert set(stated) == {"jax", "torch"}
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(ValueError, match="--matmul-precision"):
        with encoder_sides.pin_matmul_precision("fp64", with_torch=False):
            pass


def test_omp_policy_is_reported_as_not_applied_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    state = machine.set_omp_wait_policy("passive")
    assert state == {"requested": "passive", "value": "PASSIVE", "effective": False}  # torch is imported here
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own setting wins
    assert machine.set_omp_wait_policy("passive")["value"] == "ACTIVE"
    with pytest.raises(ValueError, match="--omp-wait-policy"):
        machine.set_omp_wait_policy("sleepy")


def test_flax_attention_names_the_kernel_that_runs():
    model = fi.Transformer(CFG.replace(dropout=0.1), rngs=nnx.Rngs(0))
    model.eval()
    assert encoder_sides.flax_attention(model, None).startswith("einsum")  # CPU, "auto"
    model.train()
    assert "dropout" in encoder_sides.flax_attention(model, None)
    dpa = fi.Transformer(CFG, flax_config=fi.FlaxConfig(attention_impl="dot_product_attention"),
                                rngs=nnx.Rngs(0))
    dpa.eval()
    assert encoder_sides.flax_attention(dpa, None) == "jax.nn.dot_product_attention (lowering not inspected)"
    fused = encoder_sides.flax_attention(dpa, "custom_call_target=\"__cudnn$fmhaSoftmax\"")
    assert fused.endswith("cuDNN fused attention")
    assert encoder_sides.flax_attention(dpa, "fusion dot").endswith("XLA (not cuDNN)")


def test_compiled_program_text_is_the_steps_own():
    """The text the bench searches for cuDNN's kernel on a GPU (read here on the CPU): the jitted forward."""
    side = encoder_sides.FlaxSide(CFG, fi.FlaxConfig(), device=jax.devices("cpu")[0], seed=0, rng_impl="philox4x32")
    ids = np.random.default_rng(0).integers(0, 50, (2, 8)).astype(np.int32)
    text = side.compiled_text("forward", ids, np.zeros((2, 8, 32), np.float32))
    assert "ENTRY" in text and "s32[2,8]" in text and "f32[2,8,32]" in text


def test_gpu_is_none_on_cpu_and_described_when_present():
    assert machine.detect_gpu(jax.devices("cpu")[0], None) is None
    m = machine.detect_machine(with_torch=False)
    m["gpu"] = {"name": "NVIDIA H200", "platform": "gpu", "memory_bytes": 141 * 2**30, "driver": "570.1",
                "torch_cuda": "12.8"}
    assert machine.describe(m).endswith("; gpu NVIDIA H200 (141 GiB, driver 570.1)")
    assert f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'unset'}" in machine.describe(m)


def test_torch_nn_peer_takes_pytorchs_fused_fast_path(monkeypatch):
    calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a, **k: calls.append(1) or fused(*a, **k))
    peer = build_peers(tr.Transformer(CFG), ["torch.nn"], "cpu")["torch.nn"].eval()
    with torch.inference_mode():
        peer(torch.zeros(2, 8, dtype=torch.long))
    assert len(calls) == CFG.n_layers  # one fused call per layer: the peer a PyTorch user gets in inference
