"""The package's Requires-Dist admits the releases JAX users have today, and keeps pip on torch's CPU wheel; every
install the README offers runs what it makes available.

The metadata is built the way pip builds it (setuptools' PEP 517 `prepare_metadata_for_build_wheel`, offline, in
a subprocess run in the repository root), then read with `packaging`: what is asserted is what pip would read.

The slow tests install into fresh virtual environments, with .ci/constraints.txt (the versions CI tests; the wheels
come from the local indexes and pip's cache, torch as its local 2.13.0 CPU wheel): the core, then `[torch]`, then
`[hf]`, then `[test]`, one venv growing step by step; and the README's `--no-deps` line on a copy of the venv as it
was after `[torch]` (an image that already has jax, flax and torch). After each step every `flax-impl` command
either runs (its cheapest invocation, or `--help` where a real run is the other tests' business) or exits 2 before
any work with a message naming the package to install.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
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
        extra = next((e for e in ("torch", "hf", "test") if req.marker and req.marker.evaluate({"extra": e})), "")
        by_extra.setdefault(extra, []).append(req)
    return by_extra


def _one(reqs: list[Requirement], name: str) -> Requirement:
    found = [r for r in reqs if r.name == name]
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def test_core_dependencies_are_jax_flax_optax_orbax_numpy_safetensors(requires):
    assert {r.name for r in requires[""]} == {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "safetensors"}
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


def test_this_environment_satisfies_the_ranges(requires):
    """The interpreter running the tests is an install the metadata allows (the versions CI tests)."""
    for req in requires[""] + requires["torch"] + requires["hf"]:
        if req.name == "flax-impl":
            continue
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name}=={installed} not in {req}"


# ------------------------------------------------------------------------------------------- constraints
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
TOOLS = ROOT / ".ci" / "tools.txt"


def _pins(path: Path) -> dict[str, str]:
    """{name: version} of a constraints file's `name==version` lines (names normalised as pip does)."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith(("#", "-")):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[re.sub(r"[-_.]+", "-", req.name).lower()] = spec.version
    return pins


def test_constraints_pin_every_requirement_within_its_range(requires):
    """CI's constraints satisfy the package's own ranges (else pip refuses them), pin torch to the local CPU
    wheel's version, and the tools of the README's --no-deps line are the same versions."""
    pins = _pins(CONSTRAINTS)
    for extra in ("", "torch", "hf", "test"):
        for req in requires[extra]:
            if req.name == "flax-impl":
                continue
            name = re.sub(r"[-_.]+", "-", req.name).lower()
            assert name in pins, f"{req} is not pinned in {CONSTRAINTS.name}"
            assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {req}"
    assert pins["torch"] == "2.13.0"
    tools = _pins(TOOLS)
    assert tools and all(pins[name] == version for name, version in tools.items()), tools


# ------------------------------------------------------------------------------------------- fresh installs
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_line(start: str) -> str:
    """The README's one code line that starts with `start`."""
    lines = [line for line in README.splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"README lines starting {start!r}: {lines}"
    return lines[0]


class Venv:
    """A fresh virtual environment; commands run without this interpreter's PYTHONPATH (nothing leaks in)."""

    def __init__(self, path: Path):
        self.path = path
        self.python = path / "bin" / "python"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env["PATH"] = f"{path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

    def shell(self, line: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """A README shell line, run in the repository root, `pip` meaning this venv's pip."""
        line = re.sub(r"\bpip install\b", f"{self.python} -m pip install -q", line)
        proc = subprocess.run(["bash", "-c", line], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def install(self, target: str) -> None:
        self.shell(f'pip install -c {CONSTRAINTS} -e "{target}"')

    def command(self, args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.path / "bin" / "flax-impl"), *args], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _works_or_names(proc: subprocess.CompletedProcess, packages: tuple[str, ...], what: str) -> None:
    """Exit 0, or exit 2 with a message naming one of `packages` and how to install it (no traceback)."""
    if proc.returncode == 0:
        return
    err = proc.stderr
    named = proc.returncode == 2 and "pip install" in err and any(p in err for p in packages)
    assert named and "Traceback" not in err, f"{what}: exit {proc.returncode}\n{err[-3000:]}"


def _names(proc: subprocess.CompletedProcess, package: str, what: str) -> None:
    """Exit 2 before any work, one line naming `package` and how to install it."""
    lines = proc.stderr.strip().splitlines()
    ok = proc.returncode == 2 and len(lines) == 1 and package in lines[0] and "pip install" in lines[0]
    assert ok, f"{what}: exit {proc.returncode}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2 folder with its own tokenizer.json (built here with transformers and tokenizers)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["Position is information.", "Every install runs what it installs."], trainer)
    folder = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=16, n_head=2, n_layer=1, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


TINY = ["--d-model", "16", "--heads", "2", "--layers", "1"]
TINY_TRAIN = ["train", "--steps", "2", "--batch-size", "2", "--seq-len", "16", *TINY, "--warmup", "1",
              "--eval-every", "2", "--eval-batches", "1", "--corpus-mb", "0.1", "--plot", "none"]  # fmt: skip
TINY_BENCH = ["bench", "--frameworks", "flax", "--shapes", "1x8", "--modes", "forward", "--repeats", "1", *TINY,
              "--vocab", "50", "--compile-layers", "1"]  # fmt: skip
TINY_DECODE = ["bench-decode", "--models", "gpt2", "--batches", "1", "--prompts", "4", "--new-tokens", "2",
               "--repeats", "1", *TINY, "--vocab", "50"]  # fmt: skip


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Venv:
    path = tmp_path_factory.mktemp("venvs") / "a"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    return Venv(path)


# The venv's states, each built on the previous one (module fixtures: built once, in this order).
@pytest.fixture(scope="module")
def core(venv) -> Venv:
    start = time.perf_counter()
    venv.install(".")
    assert time.perf_counter() - start < 900  # minutes, not a CUDA download
    return venv


@pytest.fixture(scope="module")
def with_torch(core) -> Venv:
    core.install(".[torch]")
    return core


@pytest.fixture(scope="module")
def image(with_torch, tmp_path_factory) -> Venv:
    """A copy of the venv as it is after [torch]: an image that already has jax, flax and torch."""
    path = tmp_path_factory.mktemp("venvs") / "b"
    shutil.copytree(with_torch.path, path, symlinks=True)
    return Venv(path)


@pytest.fixture(scope="module")
def with_hf(with_torch, image) -> Venv:
    with_torch.install(".[hf]")
    return with_torch


@pytest.mark.slow  # ~1.5 min: the core's wheels into a fresh venv, then a 2-step training run
def test_the_core_install_runs_train_and_names_what_the_rest_needs(core, hf_folder, tmp_path):
    for command in ("parity", "bench", "train", "generate", "bench-decode"):
        proc = core.command([command, "--help"], tmp_path)
        assert proc.returncode == 0, f"{command} --help\n{proc.stderr[-3000:]}"
    proc = core.command([*TINY_TRAIN, "--out", str(tmp_path / "run")], tmp_path)
    assert proc.returncode == 0 and (tmp_path / "run" / "checkpoint").is_dir(), proc.stderr[-3000:]
    _names(core.command(["parity"], tmp_path), "torch", "parity")
    _names(core.command(["parity", "--hf", str(hf_folder)], tmp_path), "transformers", "parity --hf")
    _names(core.command(["generate", str(hf_folder), "--prompt", "a"], tmp_path), "tokenizers", "generate")


@pytest.mark.slow  # tiny runs of both benchmarks on the core install
def test_the_core_install_runs_the_benchmarks_or_names_torch(core, tmp_path):
    _works_or_names(core.command(TINY_BENCH, tmp_path), ("torch",), "bench --frameworks flax")
    _works_or_names(core.command(TINY_DECODE, tmp_path), ("torch", "transformers"), "bench-decode")


@pytest.mark.slow  # ~1 min: torch's local CPU wheel, a tiny parity run
def test_the_torch_extra_runs_parity(with_torch, hf_folder, tmp_path):
    proc = with_torch.command(["parity", *TINY, "--d-ff", "32", "--batch", "1", "--length", "8", "--table-length",
                               "16"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    _names(with_torch.command(["parity", "--hf", str(hf_folder)], tmp_path), "transformers", "parity --hf")
    _names(with_torch.command(["generate", str(hf_folder), "--prompt", "a"], tmp_path), "tokenizers", "generate")


@pytest.mark.slow  # a tiny bench-decode run on the [torch] install
def test_the_torch_extra_runs_bench_decode_or_names_transformers(with_torch, tmp_path):
    _works_or_names(with_torch.command(TINY_DECODE, tmp_path), ("transformers",), "bench-decode")


@pytest.mark.slow  # ~40 s: the tools of the README's --no-deps line, then pytest on two workers
def test_the_readme_no_deps_line_runs_the_suite(image, tmp_path):
    line = _readme_line("pip install --no-deps -e .")
    image.shell(line)
    proc = subprocess.run([str(image.python), "-m", "pytest", "-q", "-m", "not slow", "tests/test_install.py"],
                          cwd=ROOT, env=image.env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.slow  # ~1 min: transformers and tokenizers, generate and parity --hf on a tiny folder
def test_the_hf_extra_runs_generate_and_parity_hf(with_hf, hf_folder, tmp_path):
    proc = with_hf.command(["generate", str(hf_folder), "--prompt", "Position", "--max-new-tokens", "2"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("Position"), proc.stderr[-3000:]
    proc = with_hf.command(["parity", "--hf", str(hf_folder), "--batch", "1", "--length", "4"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert with_hf.command(["bench-decode", "--help"], tmp_path).returncode == 0


@pytest.mark.slow  # ~30 s: the README's test command's install, then its metadata tests on two workers
def test_the_test_extra_runs_pytest_on_two_workers(with_hf, tmp_path):
    line = _readme_line('pip install -e ".[test]"')
    assert "-c .ci/constraints.txt" in line
    with_hf.shell(line)
    proc = subprocess.run([str(with_hf.python), "-m", "pytest", "-q", "-m", "not slow", "tests/test_install.py"],
                          cwd=ROOT, env=with_hf.env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0 and "passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert subprocess.run([str(with_hf.path / "bin" / "ruff"), "--version"], capture_output=True).returncode == 0

def _proof():
    sys.path.insert(0, str(ROOT))
    try:
        from conftest import PROOF, proof_entry_matches
    finally:
        sys.path.remove(str(ROOT))
    return PROOF, proof_entry_matches


def test_every_proof_entry_names_a_test_function():
    """The README's quick proof run (`-m proof`) runs what conftest.PROOF lists: each entry's function exists (a
    renamed test would silently thin the proof). The parameters are checked by the collection below."""
    proof, _ = _proof()
    for path, entries in proof.items():
        source = (ROOT / path).read_text(encoding="utf-8")
        for entry in entries:
            assert re.search(rf"^def {re.escape(entry.split('[')[0])}\(", source, re.M), f"{path}: no {entry}"


@pytest.mark.slow  # collects the proof's test files (imports transformers and every parity module): 15-100 s
def test_every_proof_entry_selects_a_test():
    proof, matches = _proof()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:xdist", "-m", "proof", *proof],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    selected = [line.split("::") for line in proc.stdout.splitlines() if "::" in line]
    for path, entries in proof.items():
        names = [name for file, name in selected if file == path]
        for entry in entries:
            assert any(matches(entry, name) for name in names), f"{path}: {entry} selects no test"
