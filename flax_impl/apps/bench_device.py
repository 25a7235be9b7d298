"""What `flax-impl bench` pins and states per device, so that the two frameworks compute the same thing:

- the float32 matmul precision on both sides (`pin_matmul_precision`): JAX's default on GPU lets XLA use
  TensorFloat-32 for float32 matmuls while torch's CUDA default does not (and torch's cuDNN default does), so an
  unpinned comparison is float32 against tf32. "float32" pins full float32 on both, "tensorfloat32" tf32 on both;
  with `--precision bf16` both compute in bfloat16 anyway;
- torch's OpenMP wait policy, set before torch loads (`set_omp_wait_policy`; why: docs/benchmarks.md#isolation);
- which attention kernel the Flax side ran (`flax_attention`): the einsum path or `jax.nn.dot_product_attention`,
  and on GPU whether XLA lowered the latter to cuDNN's fused kernel (read from the compiled program);
- the device's nominal peak (`device_peak`), the denominator of the model-FLOPs utilisation (MFU) on GPU/TPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

MATMUL_PRECISIONS = ("float32", "tensorfloat32")
OMP_POLICIES = ("passive", "active", "unset")

# Dense (no sparsity) peak FLOP/s per compute dtype from the vendors' datasheets, by a substring of the device
# name; the first match wins, so more specific names come first. "float32" is the non-tensor-core float32 rate.
DEVICE_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"float32": 51.2e12, "tensorfloat32": 378e12, "bfloat16": 756e12}),
    ("H200", {"float32": 66.9e12, "tensorfloat32": 494.7e12, "bfloat16": 989.4e12}),
    ("H100", {"float32": 66.9e12, "tensorfloat32": 494.7e12, "bfloat16": 989.4e12}),
    ("A100", {"float32": 19.5e12, "tensorfloat32": 156e12, "bfloat16": 312e12}),
    ("L4", {"float32": 30.3e12, "tensorfloat32": 60e12, "bfloat16": 121e12}),
    ("TPU v6", {"bfloat16": 918e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5", {"bfloat16": 197e12}),  # v5e ("TPU v5 lite")
    ("TPU v4", {"bfloat16": 275e12}),
)


def device_peak(device_name: str, compute: str) -> float | None:
    """Nominal peak FLOP/s of `device_name` for `compute` ("float32", "tensorfloat32", "bfloat16"), or None when
    the device or that dtype is not in `DEVICE_PEAKS` (CPUs: the bench measures its matmul peak instead)."""
    for key, peaks in DEVICE_PEAKS:
        if key.lower() in device_name.lower():
            return peaks.get(compute)
    return None


def compute_kind(precision: str, matmul_precision: str) -> str:
    """The matmul arithmetic both sides run: "bfloat16" for `--precision bf16`, else the pinned float32 kind."""
    return "bfloat16" if precision == "bf16" else matmul_precision


def set_omp_wait_policy(policy: str) -> dict[str, Any]:
    """Set OMP_WAIT_POLICY for torch's OpenMP runtime, which reads it once, when torch loads.

    Args:
        policy: "passive" (workers sleep as soon as a parallel region ends), "active" (they spin), or "unset"
            (leave the environment as it is). A value the user already exported is kept.
    Returns:
        {"requested", "value" (OMP_WAIT_POLICY now, None if unset), "effective" (False when torch was already
        imported, so the value cannot have reached its runtime)}.
    """
    if policy not in OMP_POLICIES:
        raise ValueError(f"--omp-wait-policy {policy!r}: choose from {', '.join(OMP_POLICIES)}")
    loaded = "torch" in sys.modules
    if policy != "unset" and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return {"requested": policy, "value": os.environ.get("OMP_WAIT_POLICY"), "effective": not loaded}


@contextlib.contextmanager
def pin_matmul_precision(matmul_precision: str, with_torch: bool) -> Iterator[dict[str, str]]:
    """Within the block, float32 matmuls use `matmul_precision` on both sides; yields what was set.

    JAX: `jax.default_matmul_precision` (a context, no global change). torch: `torch.set_float32_matmul_precision`
    ("highest" / "high") and `torch.backends.cudnn.allow_tf32`, restored on exit.
    """
    import jax

    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"--matmul-precision {matmul_precision!r}: choose from {', '.join(MATMUL_PRECISIONS)}")
    stated = {"jax": f"jax.default_matmul_precision({matmul_precision!r})"}
    restore = None
    if with_torch:
        import torch

        restore = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        tf32 = matmul_precision == "tensorfloat32"
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        stated["torch"] = (
            f"torch.set_float32_matmul_precision({'high' if tf32 else 'highest'!r}), cudnn.allow_tf32={tf32}"
        )
    try:
        with jax.default_matmul_precision(matmul_precision):
            yield stated
    finally:
        if restore is not None:
            torch.set_float32_matmul_precision(restore[0])
            torch.backends.cudnn.allow_tf32 = restore[1]


def flax_attention(model: Any, compiled_text: str | None) -> str:
    """The attention kernel the Flax model runs in its current mode (its first attention module's own choice,
    `FlaxConfig.attention_impl`), e.g. "einsum (flax_impl._kernels.attention.chunked_attention)".

    Args:
        model: the Flax encoder, in the mode measured (eval for "forward", train for "train").
        compiled_text: the compiled forward/train program's text (`jax.stages.Compiled.as_text()`), searched for
            cuDNN's fused attention call; None where it was not inspected (CPU).
    """
    from flax import nnx

    from flax_impl.attention import MultiHeadAttention

    attn = next((m for _, m in nnx.iter_graph(model) if isinstance(m, MultiHeadAttention)), None)
    if attn is None:
        return "none"
    dropout_on = not attn.dropout.deterministic and attn.dropout.rate > 0
    if not attn._use_dot_product_attention():
        name = "einsum (flax_impl._kernels.attention.chunked_attention)"
        if attn.flax_config.attention_impl == "auto" and dropout_on:
            name += "; auto: attention dropout is on, which jax.nn.dot_product_attention lacks"
        return name
    if compiled_text is None:
        return "jax.nn.dot_product_attention (lowering not inspected)"
    fused = "cudnn$fmha" in compiled_text or "__cudnn$fmha" in compiled_text
    return "jax.nn.dot_product_attention: " + ("cuDNN fused attention" if fused else "XLA (not cuDNN)")
