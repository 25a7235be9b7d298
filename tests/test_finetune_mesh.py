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
import socket
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
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ft-mesh")


@pytest.fixture(scope="module")
def report(work) -> dict:
    return worker(work)


# `flax-impl finetune` in a process of its own with the suite's matmul precision.
LAUNCH = """
import sys, jax
jax.config.update("jax_default_matmul_precision", "highest")
from flax_impl.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # four whole runs on 8 simulated devices (minutes on 2 cores)
@pytest.mark.parametrize("name", ["4x2", "fsdp8", "fsdp2x4"])
def test_mesh_and_fsdp_runs_equal_one_device(report, name):
    one, run = report["one"], report[name]
    assert report["devices"] == 8
    for key in ("train_loss", "eval_loss"):
        assert len(run[key]) == len(one[key]) > 0
        for got, want in zip(run[key], one[key], strict=True):
            assert abs(got - want) <= TRAIN_REL * want, (key, got, want)
    assert one["train_loss"][-1] < one["train_loss"][0] - 0.1  # the steps did something


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


@pytest.mark.slow  # two processes train, then one restores (minutes on 2 cores)
def test_two_processes_equal_one_and_their_checkpoint_restores_onto_another_mesh(report, work):
    """JAX's multi-controller runtime: two processes of 4 CPU devices each (jax.distributed on localhost), one
    (data=4, model=2) mesh over both: the losses of one process; the Orbax checkpoint both wrote restores onto a
    (data=2, model=4) mesh of one process with the weights of the folder process 0 wrote, bit for bit."""
    from finetune_mesh_worker import RUNS, argv

    from flax_impl.checkpoint import checkpoint_info

    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    args = argv(work, work / "processes", *RUNS["4x2"], "--coordinator", f"localhost:{port}", "--num-processes", "2")
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCH, *args, "--process-id", str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    outs = [p.communicate(timeout=1500) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "mesh data=4 x model=2" in outs[0][0] and "flax-impl" not in outs[1][0]  # process 0 speaks for both
    history = checkpoint_info(work / "processes" / "checkpoint").metadata["history"]
    for key in ("train_loss", "eval_loss"):
        for got, want in zip(history[key], report["one"][key], strict=True):
            assert abs(got - want) <= TRAIN_REL * want, (key, got, want)
    restored = worker(work, "--restore")
    assert restored["step"] == 3 and restored["n_devices"] == 8
    assert restored["in_proj_spec"] == [None, None, "model"]
    assert restored["max_abs_diff_to_saved_folder"] == 0.0
