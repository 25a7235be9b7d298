"""Data + tensor parallel encoder on a device mesh, by annotation: JAX's SPMD partitioner does the splitting.

Mesh axes `data` (the batch B is split) and `model` (Megatron tensor parallelism); which axis each parameter is
split on is listed in `flax_impl.sharding`. The model code is the single-device code: parameters carry
`out_sharding` metadata, and the encoder constrains its (B, L, D) activations to `data` and the attention's
(B, L, 3, N, H) projections to `model` on N when a mesh is set. Without a mesh nothing changes.

Example (8 devices; on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8):
    >>> mesh = make_mesh(**parse_mesh("data=4,model=2"))
    >>> cfg = TransformerConfig(vocab_size=1024, d_model=64, n_heads=4, d_ff=256, n_layers=2, dropout=0.0)
    >>> model = create_sharded_model(cfg, mesh, seed=0)      # initialised shard by shard, under jit
    >>> model.blocks.attn.in_proj.kernel.sharding.spec       # (n_layers, D, 3D)
    PartitionSpec(None, None, 'model')
    >>> hidden = sharded_forward(model, ids, mesh=mesh)      # ids (B, L), B divisible by 4 -> (B, L, D)
    >>> opt = create_sharded_optimizer(model, optax.adamw(1e-3), mesh)
    >>> metrics = sharded_train_step(model, opt, batch, mesh=mesh)   # in place, like flax_impl.train.train_step
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.sharding import DATA, MODEL
from flax_impl.train import loss_fn as default_loss_fn
from flax_impl.transformer import Transformer

AXES = (DATA, MODEL)
LossFn = Callable[[nnx.Module, dict[str, Any]], jax.Array]


def parse_mesh(text: str) -> dict[str, int]:
    """"data=4,model=2" -> {"data": 4, "model": 2}; an axis left out has size 1 ("data=8" -> model=1).

    Args:
        text: comma-separated `axis=size` items, axes `data` and `model`.

    Returns:
        {"data": size, "model": size}, ready for `make_mesh(**...)`.

    Raises:
        ValueError: an unknown or repeated axis name, or a size that is not an integer >= 1, named.
    """
    sizes: dict[str, int] = {}
    for item in str(text).split(","):
        name, sep, value = item.strip().partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in AXES:
            raise ValueError(f"mesh item {item.strip()!r} must be data=<int> or model=<int>, e.g. 'data=4,model=2'")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} is given twice in {text!r}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis size {name}={value!r} must be an integer >= 1")
        sizes[name] = int(value)
    return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(data: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) Mesh over `devices`, both axes `AxisType.Auto`.

    Args:
        data: the size of the `data` axis (the batch B is split on it).
        model: the size of the `model` axis (tensor parallelism).
        devices: the devices, data * model of them; None: all of `jax.devices()`.

    Returns:
        The mesh, devices laid out row-major as (data, model).

    Raises:
        ValueError: a size that is not an integer >= 1, or data * model != the number of devices (naming both).
    """
    for name, size in ((DATA, data), (MODEL, model)):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis size {name}={size!r} must be an integer >= 1")
    devices = list(jax.devices() if devices is None else devices)
    if data * model != len(devices):
        raise ValueError(
            f"mesh data={data} x model={model} needs {data * model} devices, but {len(devices)} are available; "
            "choose sizes whose product is the device count (on CPU, XLA_FLAGS="
            "--xla_force_host_platform_device_count=<n> simulates n devices)"
        )
    grid = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def check_shardable(config: TransformerConfig, mesh: Mesh) -> None:
    """Check that `mesh` can split `config`'s model: whole heads, feed-forward columns and vocabulary rows.

    Args:
        config: reads n_heads (and so d_model = n_heads * head_dim: whole heads per device), d_ff and vocab_size
            (the vocab-parallel embedding).
        mesh: from `make_mesh`.

    Raises:
        ValueError: the mesh's axes are not (data, model), or one of those sizes is not divisible by the `model`
            axis size (naming it).
    """
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"the mesh must have axes {AXES} (see make_mesh), got {tuple(mesh.axis_names)}")
    m = mesh.shape[MODEL]
    for name in ("n_heads", "d_ff", "vocab_size"):
        value = getattr(config, name)
        if value % m:
            raise ValueError(f"{name}={value} is not divisible by the mesh's model axis size {m}")


def create_sharded_model(
    config: TransformerConfig,
    mesh: Mesh,
    *,
    flax_config: FlaxConfig | None = None,
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
) -> Transformer:
    """`Transformer(config, flax_config=flax_config, rngs=rngs or nnx.Rngs(seed))`, built sharded.

    Initialised under jit with every parameter constrained to its partition spec: each device computes only its
    own shards (no full copy on one device). The values equal the unsharded model's for the same rngs (threefry
    random bits do not depend on the sharding).

    Args:
        config: the architecture.
        mesh: from `make_mesh`.
        flax_config: the execution settings; None: `FlaxConfig()`.
        seed: for `nnx.Rngs(seed)` when `rngs` is None.
        rngs: the model's rngs; overrides `seed`.

    Returns:
        The encoder, parameters placed on the mesh.

    Raises:
        ValueError: shapes the mesh cannot split (`check_shardable`), before any work.
    """
    check_shardable(config, mesh)
    rngs = nnx.Rngs(seed) if rngs is None else rngs

    @nnx.jit
    def init(rngs: nnx.Rngs) -> Transformer:
        model = Transformer(config, flax_config=flax_config, rngs=rngs)
        _constrain_state(model)
        return model

    with jax.set_mesh(mesh):
        return init(rngs)


def create_sharded_optimizer(
    model: nnx.Module, tx: optax.GradientTransformation, mesh: Mesh, *, wrt: Any = nnx.Param
) -> nnx.Optimizer:
    """`nnx.Optimizer(model, tx, wrt=wrt)` built under jit, its state placed on the mesh.

    Each optimizer moment is sharded like its parameter (the moments inherit the parameters' partition metadata);
    step counters are replicated.

    Args:
        model: a sharded model, e.g. from `create_sharded_model`.
        tx: the optax transformation, e.g. `flax_impl.train.make_tx(tcfg)`.
        mesh: the model's mesh.
        wrt: the variables to optimise.

    Returns:
        The optimizer, for `sharded_train_step`.
    """

    @nnx.jit
    def init(model: nnx.Module) -> nnx.Optimizer:
        optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        _constrain_state(optimizer)
        return optimizer

    with jax.set_mesh(mesh):
        return init(model)


def reshard(node: nnx.Module | nnx.Optimizer, mesh: Mesh) -> None:
    """Move every variable of `node` to its partition spec on `mesh`, in place.

    For instance after loading a checkpoint into a sharded model, which writes plain single-device arrays.

    Args:
        node: a model or optimizer whose variables carry partition metadata.
        mesh: the mesh to place them on.
    """
    state = nnx.state(node)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), nnx.get_partition_spec(state))
    nnx.update(node, jax.device_put(state, shardings))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every array of `batch` on the mesh, split on `data` along B and replicated on `model`.

    Args:
        batch: an array or a pytree (e.g. a dict) of arrays, each with leading axis B.
        mesh: from `make_mesh`.

    Returns:
        The same structure of jax arrays, placed on the mesh.

    Raises:
        ValueError: a scalar, or B not divisible by the `data` axis size.
    """
    n = mesh.shape[DATA]

    def put(x: Any) -> jax.Array:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[:1]} (shape {x.shape}) is not divisible by the data axis size {n}")
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(DATA, *([None] * (x.ndim - 1)))))

    return jax.tree.map(put, batch)


def sharded_forward(
    model: Transformer, ids: Any, attention_mask: Any = None, *, mesh: Mesh
) -> jax.Array:
    """The encoder's forward pass on the mesh: ids (B, L) -> hidden (B, L, D), split on `data` along B.

    Call `model.eval()` first for inference (no dropout).

    Args:
        model: a sharded encoder, e.g. from `create_sharded_model`.
        ids: (B, L) integer ids, B divisible by the `data` axis size.
        attention_mask: as in Transformer: a (B, S) or (B, N|1, L, S) mask is split along B too, a
            (1, N|1, L, S) one replicated; None: every key.
        mesh: the model's mesh.

    Returns:
        (B, L, D), split on `data` along B.

    Raises:
        ValueError: B not divisible by the `data` axis size; a malformed mask (from Transformer).
    """
    ids = shard_batch(ids, mesh)
    if attention_mask is not None:
        if np.ndim(attention_mask) == 4 and np.shape(attention_mask)[0] == 1:
            attention_mask = jax.device_put(attention_mask, NamedSharding(mesh, PartitionSpec()))
        else:
            attention_mask = shard_batch(attention_mask, mesh)
    with jax.set_mesh(mesh):
        return _forward(model, ids, attention_mask)


@nnx.jit
def _forward(model: Transformer, ids: jax.Array, mask: jax.Array | None) -> jax.Array:
    return model(ids, mask)


def sharded_train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: dict[str, Any],
    *,
    mesh: Mesh,
    loss_fn: LossFn | None = None,
) -> dict[str, jax.Array]:
    """One optimizer update of `model` and `optimizer` in place on the mesh, as `flax_impl.train.train_step`.

    Parameters and optimizer state keep their partition specs.

    Args:
        model: a sharded model.
        optimizer: from `create_sharded_optimizer`.
        batch: flax_impl.train's dict (inputs, targets, weights, optional attention_mask, each (B, L)); split on
            `data` along B.
        mesh: the model's mesh.
        loss_fn: (model, batch) -> scalar loss; None: `flax_impl.train.loss_fn` (masked-token / next-token
            cross-entropy through the tied head).

    Returns:
        {"loss": the loss before the update, "grad_norm": the global gradient norm before clipping}.

    Raises:
        ValueError: B not divisible by the `data` axis size.
    """
    if loss_fn is None:
        loss_fn = default_loss_fn
    batch = shard_batch(batch, mesh)
    with jax.set_mesh(mesh):
        return _train_step(model, optimizer, batch, loss_fn)


@nnx.jit(static_argnums=3)
def _train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, Any], loss_fn: LossFn) -> dict:
    # Differentiate what the optimizer trains only (all nnx.Param, or LoRA adapters), as flax_impl.train.
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, batch)
    optimizer.update(model, grads)
    _constrain_state(model)
    _constrain_state(optimizer)
    return {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def _constrain_state(node: nnx.Module | nnx.Optimizer) -> None:
    """Inside jit under a mesh: constrain every variable of `node` to its partition spec (P() if unannotated)."""
    state = nnx.state(node)
    nnx.update(node, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))


def param_shardings(model: nnx.Module) -> dict[str, tuple[PartitionSpec, tuple[int, ...], tuple[int, ...]]]:
    """How each parameter is split: what `flax-impl bench --mesh` reports.

    Args:
        model: any module.

    Returns:
        {"blocks.attn.in_proj.kernel": (spec, global shape, shape of one device's shard), ...} for every
        nnx.Param; spec is PartitionSpec() for an array that is not NamedSharding-placed.
    """
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[...]
        spec = value.sharding.spec if isinstance(value.sharding, NamedSharding) else PartitionSpec()
        shard = value.addressable_shards[0].data.shape
        out[".".join(map(str, path))] = (spec, tuple(value.shape), tuple(shard))
    return out
