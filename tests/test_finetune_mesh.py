"""`flax-impl finetune --mesh` computes what one device computes: 8 simulated CPU devices in a subprocess
(finetune_mesh_worker.py), data + tensor parallel and fully sharded (FSDP) runs of the same tiny Llama folder, the
same training loss at every step and the same held-out loss of the final weights within TRAIN_REL; under FSDP
every parameter and AdamW moment is split over `data`. The expected layouts are written out here, not read from the
code under test.

Final weights are not compared element by element here: a mesh sums the gradient in another order, and an element
whose gradient is roundoff-sized gets an AdamW step of ~lr and either sign (m / sqrt(v) normalises noise; the proof
is parity_tests/test_train.py::test_key_bias_gradient_is_roundoff_unless_rope). The held-out loss after the last
step is a function of every final weight; tests/test_distributed.py compares sharded parameters element by element
after an SGD step, and tests/test_finetune_parity.py after 10 AdamW steps on one device against torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flax_impl.tolerances import TRAIN_REL

WORKER = Path(__file__).with_name("finetune_mesh_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def worker(work: Path, *extra: str, devices: int = 8, timeout: int = 1500) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, str(WORKER), str(work), *extra], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return worker(tmp_path_factory.mktemp("ft-mesh"))


@pytest.mark.slow  # four whole runs on 8 simulated devices (minutes on 2 cores)
@pytest.mark.parametrize("name", ["4x2", "fsdp8", "fsdp2x4"])
def test_mesh_and_fsdp_runs_equal_one_device(report, name):
    one, run = report["one"], report[name]
    assert report["devices"] == 8
    for key in ("train_loss", "eval_loss"):
        assert len(run[key]) == len(one[key]) > 0
        for got, want in zip(run[key], one[key], strict=True):
            assert abs(got - want) <= TRAIN_REL * want, (key, got, want)
    assert run["moved"] > 1e3 * TRAIN_REL  # every tensor moved: the steps did something


@pytest.mark.slow
def test_fsdp_splits_every_parameter_and_moment_over_data(report):
    """data=2, model=4: Megatron's model splits, plus `data` on the largest other axis (never the layer axis)."""
    params = report["fsdp_params"]
    want = {
        "input/embed/weight": ["model", "data"],  # (V, D): vocab-parallel, D over data
        "blocks/attn/in_proj/kernel": [None, "data", "model"],  # (layers, D, (N + 2K) H)
        "blocks/attn/out_proj/kernel": [None, "model", "data"],  # (layers, D, D): row-parallel
        "lm_head/kernel": ["data", "model"],  # (D, V): column-parallel
    }
    for path, spec in want.items():
        assert params[path] == spec, (path, params[path])
    assert all("data" in spec for spec in params.values()), params
    moments = {k: v for k, v in report["fsdp_opt"].items() if "/mu/" in k or "/nu/" in k}
    assert moments and all("data" in spec for spec in moments.values()), moments
