"""The machine as it describes itself, for the benchmark reports, and torch's thread policy.

Everything is read, never inferred: the CPU model is /proc/cpuinfo's `model name` (else `platform.processor()`,
and the report names which); ISA flags come only from its `flags` line (None: unknown). Nothing here imports
torch at module level: torch's OpenMP runtime reads OMP_WAIT_POLICY once, when it loads.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Any

import numpy as np

CPUINFO = "/proc/cpuinfo"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # decide XLA's and oneDNN's x86 kernels
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "XLA_FLAGS")
OMP_POLICIES = ("passive", "active", "unset")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """{"cpu_model", "isa": {flag: bool}} of the first processor of /proc/cpuinfo's text; None where the field is
    absent (ARM kernels write no `model name`). Read, never inferred."""
    model = flags = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and model is None:
            model = value.strip() or None
        elif sep and key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return {"cpu_model": model, "isa": None if flags is None else {f: f in flags for f in ISA_FLAGS}}


def read_cpu(path: str = CPUINFO) -> dict[str, Any]:
    """`parse_cpuinfo(path)` plus `cpu_model_source`; without a model name there, `platform.processor()`."""
    try:
        with open(path) as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"cpu_model": None, "isa": None}
    if info["cpu_model"] is not None:
        return {**info, "cpu_model_source": f"{path} model name"}
    return {**info, "cpu_model": platform.processor() or None, "cpu_model_source": "platform.processor()"}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def detect_machine(*, with_torch: bool, packages: tuple[str, ...] = (), cpuinfo: str = CPUINFO) -> dict[str, Any]:
    """The machine record at the start of a run (`describe` reads it; the end's load is added later).

    Args:
        with_torch: also record torch's version and thread counts (imports torch).
        packages: more packages whose versions to record (e.g. "transformers").
        cpuinfo: the file to read (a parameter for tests).
    """
    import flax
    import jax

    versions = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                "numpy": np.__version__}
    threads = (None, None)
    for name in (("torch",) if with_torch else ()) + packages:
        versions[name] = importlib.import_module(name).__version__
    if with_torch:
        import torch

        threads = (torch.get_num_threads(), torch.get_num_interop_threads())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {**read_cpu(cpuinfo), "arch": platform.machine(), "os": platform.platform(), "cores": os.cpu_count(),
            "usable_cores": usable, "load_average_start": load_average(), "xla_flags": os.environ.get("XLA_FLAGS"),
            "torch_threads": threads[0], "torch_interop_threads": threads[1],
            "thread_env": {k: os.environ.get(k) for k in THREAD_ENV}, "versions": versions, "gpu": None}


def detect_gpu(jax_device: Any, torch_device: str | None) -> dict[str, Any] | None:
    """Name, platform, memory (JAX's allocator limit, else torch's total), nvidia-smi's driver and torch's CUDA
    version of a GPU/TPU run; None for a CPU device."""
    import subprocess

    if jax_device is None or jax_device.platform == "cpu":
        return None
    try:
        memory = (jax_device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends do not implement memory_stats
        memory = None
    cuda = torch_device is not None and torch_device.startswith("cuda")
    if cuda:
        import torch

        memory = memory or torch.cuda.get_device_properties(0).total_memory
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    return {"name": jax_device.device_kind, "platform": jax_device.platform, "memory_bytes": memory,
            "driver": driver, "torch_cuda": torch.version.cuda if cuda else None}


def describe(m: dict[str, Any], *, load: bool = True) -> str:
    """One line: CPU model (and its source); ISA flags ("-" = absent); cores; load at start -> end; threads; GPU."""
    flags = "isa flags unknown" if m["isa"] is None else " ".join(k if v else f"-{k}" for k, v in m["isa"].items())
    first = [("?" if x is None else f"{x[0]:.2f}") for x in (m["load_average_start"], m.get("load_average_end"))]
    text = f"{m['cpu_model'] or 'unknown CPU'} ({m['cpu_model_source']}); {flags}; {m['cores']} cores " \
           f"({m['usable_cores']} usable); "
    if load:
        text += f"load(1 min) {first[0]}" + (f" -> {first[1]}" if "load_average_end" in m else "") + "; "
    text += f"XLA_FLAGS={m['xla_flags'] or 'unset'}"
    text += "" if m["torch_threads"] is None else f"; torch threads {m['torch_threads']}"
    text += f"; OMP_WAIT_POLICY={m['thread_env'].get('OMP_WAIT_POLICY') or 'unset'}"
    gpu = m.get("gpu")
    if gpu:
        memory = "?" if gpu["memory_bytes"] is None else f"{gpu['memory_bytes'] / 2**30:.0f} GiB"
        text += f"; {gpu['platform']} {gpu['name']} ({memory}, driver {gpu['driver'] or '?'})"
    return text


def set_omp_wait_policy(policy: str) -> dict[str, Any]:
    """Set OMP_WAIT_POLICY (PASSIVE: torch's idle workers sleep at once; ACTIVE: they spin; unset: as installed)
    unless the user exported one. Returns {"requested", "value", "effective": False when torch was loaded before,
    so the value cannot have reached its runtime}."""
    if policy not in OMP_POLICIES:
        raise ValueError(f"--omp-wait-policy {policy!r}: choose from {', '.join(OMP_POLICIES)}")
    loaded = "torch" in sys.modules
    if policy != "unset" and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return {"requested": policy, "value": os.environ.get("OMP_WAIT_POLICY"), "effective": not loaded}


def omp_text(omp: dict[str, Any]) -> str:
    """The thread policy as both reports state it (`set_omp_wait_policy`'s record)."""
    return f"torch OpenMP wait policy {omp['value'] or 'unset'}" + (
        "" if omp["effective"] else " (torch was loaded before the bench: not applied)")
