"""The package's Requires-Dist admits the releases JAX users have today, and keeps pip on torch's CPU wheel.

The metadata is built the way pip builds it (setuptools' PEP 517 `prepare_metadata_for_build_wheel`, offline, in
a subprocess run in the repository root), then read with `packaging`: what is asserted is what pip would read.
"""

from __future__ import annotations

import email
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

# Releases the ranges must admit: the oldest CI tests and the newest a JAX image may already hold.
ADMITTED = {
    "jax": ["0.10.2", "0.11.0", "0.12.0", "0.12.5"],
    "flax": ["0.12.8", "0.12.12", "0.13.0"],
    "optax": ["0.2.5", "0.2.8", "0.2.9"],
    "orbax-checkpoint": ["0.12.8", "0.13.0"],
}


@pytest.fixture(scope="module")
def requires(tmp_path_factory) -> dict[str, list[Requirement]]:
    """{extra or "": [Requirement, ...]} from the built METADATA's Requires-Dist lines."""
    out = tmp_path_factory.mktemp("metadata")
    code = "import sys, setuptools.build_meta as b; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dist_info = out / proc.stdout.strip().splitlines()[-1]
    metadata = email.message_from_string((dist_info / "METADATA").read_text(encoding="utf-8"))
    by_extra: dict[str, list[Requirement]] = {}
    for line in metadata.get_all("Requires-Dist"):
        req = Requirement(line)
        extra = next((e for e in ("torch", "test") if req.marker and req.marker.evaluate({"extra": e})), "")
        by_extra.setdefault(extra, []).append(req)
    return by_extra


def _one(reqs: list[Requirement], name: str) -> Requirement:
    found = [r for r in reqs if r.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_core_dependencies_are_jax_flax_optax_orbax_numpy(requires):
    assert {r.name for r in requires[""]} == {"jax", "flax", "optax", "orbax-checkpoint", "numpy"}
    assert all(r.marker is None for r in requires[""])


@pytest.mark.parametrize("name", sorted(ADMITTED))
def test_ranges_admit_todays_releases(requires, name):
    spec = _one(requires[""], name).specifier
    for version in ADMITTED[name]:
        assert spec.contains(version), f"{name}{spec} must admit {version}"
    assert not spec.contains("0.0.1"), f"{name}{spec} needs a lower bound (the oldest release CI tests)"


def test_torch_extra_keeps_pip_on_the_cpu_wheel_found_here(requires):
    spec = _one(requires["torch"], "torch").specifier
    assert spec.contains("2.13.0") and spec.contains("2.4.0")
    assert not spec.contains("2.14.0") and not spec.contains("2.3.1")
    assert _one(requires["torch"], "safetensors").specifier.contains("0.8.0")


def test_this_environment_satisfies_the_ranges(requires):
    """The interpreter running the tests is an install the metadata allows (the versions CI tests)."""
    for req in requires[""] + requires["torch"]:
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name}=={installed} not in {req}"
