"""Sharding annotations for the SPMD partitioner: which mesh axis each parameter and activation is split on.

Mesh axes: `data` (batch, data parallel) and `model` (Megatron-style tensor parallel, Shoeybi et al., 2019), of
size M.

Parameters (the spec of each array axis, `None` = replicated along it; Lmax = max_len):

    input.embed.weight        (V, D)   ("model", None)  vocab-parallel: each device holds V/M token rows
    input.pos.weight          (Lmax, D) (None, None)    replicated (small; added to every batch row)
    attn.in_proj.kernel       (D, 3D)  (None, "model")  column-parallel (output features)
    attn.in_proj.bias         (3D,)    ("model",)
    attn.out_proj.kernel      (D, D)   ("model", None)  row-parallel (input features)
    ff.0.kernel / ff.0.bias   (D, F) / (F,)  (None, "model") / ("model",)   column-parallel
    ff.3.kernel               (F, D)   ("model", None)  row-parallel
    out_proj / ff.3 biases, LayerNorm scales and biases: replicated.
    A scanned stack prepends the layer axis, never sharded: blocks.attn.in_proj.kernel (n_layers, D, 3D) is
    (None, None, "model").

The packed `in_proj` kernel keeps torch's column order [q | k | v] (checkpoints unchanged). Its contiguous
column chunks do not hold whole heads of q, k and v (with M = 2, device 0 holds q and half of k), so the
attention constrains the projected (B, L, 3, N, H) activations to be split on the head axis N: every device
then runs the softmax of whole heads, and the partitioner inserts one re-layout of those activations per
layer. Activations at block boundaries (B, L, D) are split on `data` along B.

The annotations are `out_sharding` metadata on each nnx.Param, with `eager_sharding=False`: nothing is placed
at construction (without a mesh a model behaves exactly as an unannotated one). `flax_impl.distributed`
applies them under a mesh; `constrain` is a no-op unless a mesh with the named axes is set (`jax.set_mesh`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from flax_impl._kernels.matmul import dot_general

DATA = "data"
MODEL = "model"

# One spec per parameter role; the modules cite these names.
COLUMN_KERNEL = (None, MODEL)  # (in, out): split the output features
COLUMN_BIAS = (MODEL,)
ROW_KERNEL = (MODEL, None)  # (in, out): split the input features
REPLICATED_VECTOR = (None,)  # row-parallel biases, LayerNorm scale / bias
VOCAB_ROWS = (MODEL, None)  # (V, D) token embedding
REPLICATED_MATRIX = (None, None)  # (Lmax, D) learned positions
BATCH_ACTIVATION = (DATA, None, None)  # (B, L, D)
QKV_ACTIVATION = (DATA, None, None, MODEL, None)  # (B, L, 3, N, H)


def param_metadata(spec: tuple[str | None, ...]) -> dict[str, Any]:
    """Variable metadata for a parameter split as `spec`.

    Args:
        spec: one mesh axis name (or None) per array axis, e.g. `COLUMN_KERNEL`.

    Returns:
        Keyword arguments for `kernel_metadata=`, `bias_metadata=`, `scale_metadata=` of nnx layers, or for
        `nnx.Param(value, **param_metadata(spec))`.
    """
    return {"out_sharding": tuple(spec), "eager_sharding": False}


def constrain(x: jax.Array, spec: tuple[str | None, ...]) -> jax.Array:
    """`jax.lax.with_sharding_constraint(x, P(*spec))` under a mesh (`jax.set_mesh`), else x unchanged.

    Axis names the current mesh does not have are treated as None (replicated), so a mesh with only a
    `data` axis still works.

    Args:
        x: any array, e.g. (B, L, D).
        spec: one mesh axis name (or None) per axis of x, e.g. `BATCH_ACTIVATION`.

    Returns:
        x, constrained under a mesh.

    Raises:
        ValueError: under a mesh, `spec` does not have one entry per axis of x.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(spec) != x.ndim:
        raise ValueError(f"sharding spec {spec} has {len(spec)} entries for an array of shape {x.shape}")
    names = set(mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*(a if a in names else None for a in spec)))


def parallel_linear(
    flax_config: Any, d_in: int, d_out: int, style: str, *, use_bias: bool, rngs: nnx.Rngs
) -> nnx.Linear:
    """nnx.Linear(d_in, d_out) with or without bias and the FlaxConfig's dtypes, annotated Megatron-style; its
    matmul accumulates in float32 below float32 (`flax_impl._kernels.matmul.dot_general`).

    Args:
        flax_config: a FlaxConfig (reads `dtype`, `param_dtype`).
        d_in: input features.
        d_out: output features.
        style: "column" splits the output features (kernel (None, model), bias (model,)); "row" the input
            features (kernel (model, None), bias replicated).
        use_bias: whether the layer has a bias (the architecture's switch for its group).
        rngs: initialises the kernel.

    Returns:
        The annotated layer.

    Raises:
        ValueError: `style` is not "column" or "row".
    """
    styles = {"column": (COLUMN_KERNEL, COLUMN_BIAS), "row": (ROW_KERNEL, REPLICATED_VECTOR)}
    if style not in styles:
        raise ValueError(f"style={style!r} must be 'column' or 'row'")
    kernel, bias = styles[style]
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=jnp.dtype(flax_config.dtype),
        param_dtype=jnp.dtype(flax_config.param_dtype),
        dot_general=dot_general,
        kernel_metadata=param_metadata(kernel),
        bias_metadata=param_metadata(bias),
        rngs=rngs,
    )
