"""The fine-tuning step: the loss of a padded or packed batch, gradients accumulated over micro-batches, one
AdamW update; on one device or a (data, model) mesh, optionally with parameters and optimizer state fully sharded
over `data` (FSDP).

Loss: the mean cross-entropy (nats) over the trained targets of all A micro-batches of a step,
sum(weights * CE) / sum(weights), logits in float32. The gradient is that of the whole step's loss: each
micro-batch's gradient of its sum is added up (float32) and divided once by the step's trained-token count, which
is what one batch of A x B rows would give, whatever the split. A packed batch (`segment_ids`, `positions`) gets a
(B, 1, L, L) mask letting each token see only its own segment (`document_mask`; the model adds the causal rule)
and positions restarting per segment.

Only the variables the optimizer trains (`optimizer.wrt`: every nnx.Param for full fine-tuning, the adapters for
LoRA) are differentiated; dropout's rng streams advance once per micro-batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_impl.sharding import DATA
from flax_impl.validation import IGNORE_INDEX

Batch = dict[str, Any]


def document_mask(segment_ids: jax.Array) -> jax.Array:
    """(B, L) segment ids (0 = padding) -> (B, 1, L, L) bool: query i may attend to key j when both are in the
    same segment and j is not padding. A padding query attends to nothing (its output is zeros, its weight 0)."""
    seg = jnp.asarray(segment_ids)
    return ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0))[:, None]


def loss_sums(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of weights x CE, sum of weights) of one (B, L) batch.

    Args:
        model: a causal Transformer.
        batch: inputs, targets (IGNORE_INDEX = not counted), weights; attention_mask (padded) or segment_ids and
            positions (packed), each (B, L).

    Returns:
        Two float32 scalars.
    """
    mask = batch.get("attention_mask")
    if "segment_ids" in batch:
        mask = document_mask(batch["segment_ids"])
    hidden = model(batch["inputs"], mask, positions=batch.get("positions"))  # (B, L, D)
    logits = model.logits(hidden).astype(jnp.float32)  # (B, L, V)
    targets = jnp.asarray(batch["targets"])
    ignore = targets == IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ignore, 0, targets))  # (B, L)
    w = jnp.where(ignore, 0.0, jnp.asarray(batch["weights"], jnp.float32))
    return jnp.sum(jnp.where(w > 0, ce * w, 0.0)), jnp.sum(w)


def _sums_over(model: nnx.Module, micro: Batch, wrt: Any, grads: bool) -> tuple:
    """Scan over the A micro-batches of `micro` ((A, B, L) leaves): (total, count, summed gradient or None)."""
    graphdef, trained, rest = nnx.split(model, wrt, ...)

    def sums(trained: nnx.State, rest: nnx.State, batch: Batch) -> tuple:
        rest = jax.tree.map(lambda x: x, rest)  # fresh Variables at this trace level (LoRA: the frozen weights)
        m = nnx.merge(graphdef, trained, rest)
        total, count = loss_sums(m, batch)
        return total, (count, nnx.state(m, nnx.Not(wrt)))

    def body(carry: tuple, batch: Batch) -> tuple:  # the weights ride in the carry: one trace level for NNX
        trained, rest, acc, total, count = carry
        if grads:
            (t, (c, rest)), g = jax.value_and_grad(sums, has_aux=True)(trained, rest, batch)
            acc = jax.tree.map(jnp.add, acc, g)
        else:
            t, (c, rest) = sums(trained, rest, batch)
        return (trained, rest, acc, total + t, count + c), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained) if grads else None
    init = (trained, rest, zeros, jnp.float32(0.0), jnp.float32(0.0))
    (_, rest, acc, total, count), _ = jax.lax.scan(body, init, micro)
    nnx.update(model, rest)
    return total, count, acc


@nnx.jit(static_argnames="constrain")
def _train(model: nnx.Module, optimizer: nnx.Optimizer, micro: Batch, constrain: bool) -> dict[str, jax.Array]:
    total, count, acc = _sums_over(model, micro, optimizer.wrt, True)
    n = jnp.maximum(count, 1.0)
    trained = nnx.state(model, optimizer.wrt)
    grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), acc, trained)
    optimizer.update(model, grads)
    if constrain:
        constrain_state(model)
        constrain_state(optimizer)
    return {"loss": total / n, "grad_norm": optax.tree.norm(acc) / n, "tokens": count}


@nnx.jit
def _eval(model: nnx.Module, micro: Batch) -> tuple[jax.Array, jax.Array]:
    total, count, _ = _sums_over(model, micro, nnx.Param, False)
    return total, count


def constrain_state(node: nnx.Module | nnx.Optimizer) -> None:
    """Inside jit under a mesh: every variable of `node` constrained to its partition spec (P() if none)."""
    state = nnx.state(node)
    nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))


def place_batch(micro: Batch, mesh: Mesh | None) -> Batch:
    """(A, B, L) numpy leaves -> jax arrays; under a mesh split along B on `data` (every process passes the whole
    batch and keeps its devices' rows)."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in micro.items()}
    sharding = NamedSharding(mesh, PartitionSpec(None, DATA, None))
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index]) for k, v in micro.items()}


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, micro: Batch, *, mesh: Mesh | None = None) -> dict:
    """One optimizer update from A micro-batches, in place.

    Args:
        model: the model (train mode for dropout).
        optimizer: an nnx.Optimizer over the variables to train (`wrt`).
        micro: numpy leaves (A, B, L): inputs, targets, weights and attention_mask or segment_ids + positions.
        mesh: the mesh the model and optimizer are placed on, or None.

    Returns:
        {"loss": the step's loss before the update, "grad_norm": its gradient's global norm before clipping,
        "tokens": the trained targets counted}, jax scalars.
    """
    batch = place_batch(micro, mesh)
    if mesh is None:
        return _train(model, optimizer, batch, False)
    with jax.set_mesh(mesh):
        return _train(model, optimizer, batch, True)


def eval_sums(model: nnx.Module, micro: Batch, *, mesh: Mesh | None = None) -> tuple[float, float]:
    """(sum of weights x CE, sum of weights) over (A, B, L) batches, as Python floats (call model.eval() first)."""
    batch = place_batch(micro, mesh)
    if mesh is None:
        total, count = _eval(model, batch)
    else:
        with jax.set_mesh(mesh):
            total, count = _eval(model, batch)
    return float(total), float(count)


# --------------------------------------------------------------------------------------------------------- mesh
def fsdp_shard(model: nnx.Module, data_size: int) -> None:
    """Mark every parameter to be split over `data` too (fully sharded data parallel), in place (metadata only:
    place the arrays with `place_state` afterwards).

    Each parameter gets `data` on its largest axis that is not split already, not a scanned stack's layer axis,
    and divisible by `data_size`; one without such an axis stays as it was. The optimizer's moments, built after,
    inherit the specs.
    """
    stacked = bool(getattr(getattr(model, "flax_config", None), "scan_layers", False))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        spec = list(var.get_metadata().get("out_sharding") or (None,) * len(shape))
        first = 1 if stacked and path and path[0] == "blocks" else 0
        free = [a for a in range(first, len(shape)) if spec[a] is None and shape[a] % data_size == 0]
        if data_size > 1 and free:
            spec[max(free, key=lambda a: shape[a])] = DATA
            var.set_metadata("out_sharding", tuple(spec))


def place_state(node: nnx.Module | nnx.Optimizer, mesh: Mesh) -> None:
    """Put every variable of `node` on `mesh` by its partition spec, in place; from host values, so that it works
    with several processes (each holds the whole value and keeps its devices' shards)."""
    state = nnx.state(node)
    specs = nnx.get_partition_spec(state)

    def put(x: Any, spec: PartitionSpec) -> Any:
        if not hasattr(x, "shape"):
            return x
        sharding = NamedSharding(mesh, spec)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            impl = jax.random.key_impl(x)
            data = np.asarray(jax.random.key_data(x))
            spec_data = PartitionSpec(*spec, *([None] * (data.ndim - x.ndim)))
            placed = jax.make_array_from_callback(data.shape, NamedSharding(mesh, spec_data), lambda i: data[i])
            return jax.random.wrap_key_data(placed, impl=impl)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    nnx.update(node, jax.tree.map(put, state, specs))
