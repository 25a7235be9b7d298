"""What the machine says about itself, for benchmark reports: CPU model, ISA flags, cores, load, versions.

Everything here is read, never inferred: the CPU model is /proc/cpuinfo's `model name` (or the operating system's
`platform.processor()` where there is no /proc/cpuinfo, and the report names which one it was); ISA flags come only
from /proc/cpuinfo's `flags` line and are None (unknown) where that line is missing. A report must never state an
architecture the machine did not state.
"""

from __future__ import annotations

import os
import platform
from typing import Any

CPUINFO = "/proc/cpuinfo"
# Instruction-set extensions that decide which matmul kernels XLA and oneDNN can use on x86 CPUs.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
# Environment variables that change how either framework uses the cores.
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "XLA_FLAGS")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """The first processor's `model name` and which of `ISA_FLAGS` its `flags` line lists.

    Args:
        text: the contents of /proc/cpuinfo.
    Returns:
        {"cpu_model": str or None, "isa": {flag: bool} or None}; None where the field is absent (ARM kernels, for
        one, write no `model name`).
    """
    model, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key == "flags" and flags is None:
            flags = set(value.split())
    isa = None if flags is None else {name: name in flags for name in ISA_FLAGS}
    return {"cpu_model": model, "isa": isa}


def read_cpu(path: str = CPUINFO) -> dict[str, Any]:
    """`parse_cpuinfo` of `path`, plus where the model name came from.

    Returns:
        {"cpu_model", "cpu_model_source", "isa"}: `cpu_model_source` is "/proc/cpuinfo model name", or
        "platform.processor()" when `path` cannot be read or has no model name (then `cpu_model` is what the
        operating system reports, None if it reports nothing), and `isa` is None unless `path` lists flags.
    """
    try:
        with open(path) as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"cpu_model": None, "isa": None}
    if info["cpu_model"] is not None:
        return {**info, "cpu_model_source": f"{path} model name"}
    return {**info, "cpu_model": platform.processor() or None, "cpu_model_source": "platform.processor()"}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def usable_cores() -> int | None:
    """Cores this process may run on (its affinity mask), or None where the OS does not say."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def versions(with_torch: bool) -> dict[str, str]:
    """python, jax, flax, numpy (and torch when `with_torch`) versions of this process."""
    import flax
    import jax
    import numpy as np

    out = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__}
    out["numpy"] = np.__version__
    if with_torch:
        import torch

        out["torch"] = torch.__version__
    return out


def detect_machine(*, with_torch: bool, cpuinfo: str = CPUINFO) -> dict[str, Any]:
    """The machine record of a benchmark, taken at its start (`finish_machine` adds the end's load average).

    Args:
        with_torch: also record torch's version and intra-op thread count (imports torch).
        cpuinfo: the cpuinfo file to read (a parameter for tests).
    Returns:
        {"cpu_model", "cpu_model_source", "isa", "arch", "os", "cores", "usable_cores", "load_average_start",
        "xla_flags", "torch_threads", "torch_interop_threads", "thread_env", "versions"}; `cores` is
        os.cpu_count(), `xla_flags` the XLA_FLAGS environment variable (None when unset), the torch thread
        counts None without torch, `thread_env` each of `THREAD_ENV` (None when unset).
    """
    torch_threads = torch_interop_threads = None
    if with_torch:
        import torch

        torch_threads, torch_interop_threads = torch.get_num_threads(), torch.get_num_interop_threads()
    return {
        **read_cpu(cpuinfo),
        "arch": platform.machine(),
        "os": platform.platform(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_start": load_average(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "torch_threads": torch_threads,
        "torch_interop_threads": torch_interop_threads,
        "thread_env": {name: os.environ.get(name) for name in THREAD_ENV},
        "versions": versions(with_torch),
    }


def detect_gpu(jax_device: Any, torch_device: str | None) -> dict[str, Any] | None:
    """The accelerator of a GPU/TPU run: name, memory and driver as the frameworks and the driver report them.

    Args:
        jax_device: the JAX device measured; None is returned for a CPU device.
        torch_device: "cuda" when torch runs on the GPU too, else None.
    Returns:
        {"name", "platform", "memory_bytes" (JAX's allocator limit, or torch's total memory; None if neither
        says), "driver" (nvidia-smi's driver_version; None without nvidia-smi), "torch_cuda" (torch's CUDA
        version or None)}, or None on CPU.
    """
    if jax_device is None or jax_device.platform == "cpu":
        return None
    memory = None
    try:
        memory = (jax_device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends do not implement memory_stats
        memory = None
    torch_cuda = None
    if torch_device is not None and torch_device.startswith("cuda"):
        import torch

        torch_cuda = torch.version.cuda
        if memory is None:
            memory = torch.cuda.get_device_properties(0).total_memory
    return {
        "name": jax_device.device_kind,
        "platform": jax_device.platform,
        "memory_bytes": memory,
        "driver": _nvidia_driver(),
        "torch_cuda": torch_cuda,
    }


def _nvidia_driver() -> str | None:
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def finish_machine(machine: dict[str, Any]) -> dict[str, Any]:
    """`machine` with the load average at the end of the run added (`load_average_end`)."""
    return {**machine, "load_average_end": load_average()}


def describe(machine: dict[str, Any], *, load: bool = True) -> str:
    """One line for a report, e.g. "Intel(R) Xeon(R) Processor (/proc/cpuinfo model name); avx2 avx512f; ...".

    ISA flags the CPU lacks are written with a leading "-", unknown ones as "isa flags unknown". With `load`, the
    1-minute load average at the start (and the end, once `finish_machine` added it) is included.
    """
    isa = machine["isa"]
    if isa is None:
        flags = "isa flags unknown"
    else:
        flags = " ".join(name if has else f"-{name}" for name, has in isa.items())
    load_text = ""
    if load:
        load_text = f"load(1 min) {_first(machine['load_average_start'])}"
        if "load_average_end" in machine:
            load_text += f" -> {_first(machine['load_average_end'])}"
        load_text += "; "
    threads = machine["torch_threads"]
    return (
        f"{machine['cpu_model'] or 'unknown CPU'} ({machine['cpu_model_source']}); {flags}; "
        f"{machine['cores']} cores ({machine['usable_cores']} usable); {load_text}"
        f"XLA_FLAGS={machine['xla_flags'] or 'unset'}" + ("" if threads is None else f"; torch threads {threads}")
        + _omp_text(machine) + _gpu_text(machine)
    )


def _omp_text(machine: dict[str, Any]) -> str:
    env = machine.get("thread_env")
    return "" if env is None else f"; OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY') or 'unset'}"


def _gpu_text(machine: dict[str, Any]) -> str:
    gpu = machine.get("gpu")
    if not gpu:
        return ""
    memory = "?" if gpu["memory_bytes"] is None else f"{gpu['memory_bytes'] / 2**30:.0f} GiB"
    return f"; {gpu['platform']} {gpu['name']} ({memory}, driver {gpu['driver'] or '?'})"


def _first(load: list[float] | None) -> str:
    return "?" if load is None else f"{load[0]:.2f}"
