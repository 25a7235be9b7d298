"""benchmarks/gpu.sh runs here too: on a machine without a GPU it installs nothing, checks that the bench refuses
`--device gpu` before any work (exit 2), says what it skipped and exits 0. On a GPU machine it would run the GPU
bench and the parity suite (minutes): this test then only checks the script's syntax."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None or _has_gpu(), reason="needs bash and no GPU")
def test_gpu_script_skips_cleanly_without_a_gpu(tmp_path):
    root = str(SCRIPT.parents[1])
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no install" in out.stdout  # the checkout is importable: pip is not run
    assert "no GPU visible to JAX: the GPU bench and the GPU parity run are skipped" in out.stdout
    assert "refused before any work (exit 2)" in out.stdout
    assert "--device gpu" in (tmp_path / "out" / "no-gpu.log").read_text()
    assert not list((tmp_path / "out").glob("*.json"))  # nothing measured
