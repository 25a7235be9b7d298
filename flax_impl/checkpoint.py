"""Orbax checkpoints of a model and its optimizer: the Flax way, sharded, with the training state, kill-safe.

Beside `flax_impl.interop.save` / `load` (one safetensors file with torch_ref's key names, parameters only, which
both frameworks read) and `flax_impl.hf.save_pretrained` (a Hugging Face folder), an Orbax checkpoint keeps
everything needed to resume training, in JAX's own layout:

    directory/<step>/model           nnx.state(model): parameters and the rng streams (each Dropout's key, count)
    directory/<step>/optimizer       nnx.state(optimizer): its step counter and optax's state (AdamW: count, mu, nu)
    directory/<step>/config          the model's TransformerConfig (JSON), for a model that keeps one (Transformer)
    directory/<step>/metadata        the caller's JSON (`metadata=`), e.g. a training run's options and losses
    directory/<step>/checksums.json  the size and sha256 of every file of the step, written last

Each step is written under a temporary name, fsynced, listed in checksums.json and renamed (`flax_impl.
checkpoint_dir`): a kill at any instant leaves every step that a finished save wrote, and a <step> folder is
complete unless damaged from outside. A restore first reads every file against checksums.json, so a truncated or
corrupt file (one flipped byte) is a `CheckpointError` naming it, never different values. Typed PRNG keys
(`jax.random.key`) are stored by Orbax as their key data (uint32, e.g. (2,) keys as (2, 2)) and rebuilt as keys.

Restoring reads into the module's own variables, so the target decides placement: a concrete array keeps its
sharding; an abstract one (from `abstract`, or `nnx.eval_shape`) the sharding of its ShapeDtypeStruct, or the
default device if it has none. Orbax then reads from each array file only the index of each device's shard
(TensorStore) and puts it on that device, so a sharded restore never holds a whole sharded array on one device;
the mesh at restore time may differ from the one at save time. The saved config (`flax_impl.saved_config`: a
model of another architecture is refused, listing every field that differs; a step without a config restores
with a warning), shapes and dtypes are checked before any array is read. One run writes a directory at a time
(a save deletes the leftovers of killed saves). Several JAX processes (`jax.distributed`) save together: each
calls `save_checkpoint` with the same arguments, process 0 makes the temporary folder and sends its name to the
others, every process writes its own shards into it (Orbax), and process 0 lists and renames it once all are done;
the directory must be on a filesystem every process sees.

Example:
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    >>> save_checkpoint("ckpt", model, optimizer, step=100)
    >>> model = abstract(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh=mesh)  # nothing allocated
    >>> restore_checkpoint("ckpt", model)          # parameters and rng streams, placed on the mesh
    100
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from flax_impl.checkpoint_dir import CheckpointError, step_folders, verify_step, write_step
from flax_impl.saved_config import config_mismatches, saved_config

__all__ = ["CheckpointError", "CheckpointInfo", "abstract", "checkpoint_info", "checkpoint_steps", "restore_checkpoint",
           "save_checkpoint"]
T = TypeVar("T")
MODEL, OPTIMIZER, CONFIG, METADATA = "model", "optimizer", "config", "metadata"


class CheckpointInfo(NamedTuple):
    """What a step carries besides its arrays (`checkpoint_info`)."""

    step: int
    path: Path  # the step's folder
    config: dict[str, Any] | None  # the model's TransformerConfig as a dict; None if the model kept none
    metadata: dict[str, Any] | None  # the `metadata=` given to save_checkpoint; None if none was


def abstract(factory: Callable[[], T], *, mesh: Mesh | None = None) -> T:
    """`factory()` without allocating any array: every variable holds a `jax.ShapeDtypeStruct`.

    With a mesh, each ShapeDtypeStruct carries the NamedSharding of its variable's partition metadata
    (flax_impl.sharding; unannotated variables such as rng keys are replicated), so that `restore_checkpoint`
    places every array on the mesh, shard by shard.

    Args:
        factory: builds the module, e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(0))` or
            `lambda: nnx.Optimizer(Transformer(cfg, rngs=nnx.Rngs(0)), tx, wrt=nnx.Param)`.
        mesh: the device mesh to place the restored arrays on; None: the default device.

    Returns:
        The abstract module (an nnx.Optimizer too), ready for `restore_checkpoint`.
    """
    if mesh is None:
        return nnx.eval_shape(factory)
    graphdef, state = nnx.get_abstract_model(factory, mesh)
    return nnx.merge(graphdef, state)


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved in `directory`, in increasing order ([] if there are none or no such folder).

    Args:
        directory: the folder given to `save_checkpoint`.

    Returns:
        The installed steps (a step still being written, or left by a killed save, is not listed; whether a
        listed step's files are intact is checked when it is read).
    """
    return sorted(step_folders(directory))


def save_checkpoint(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int,
    max_to_keep: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Write `model` (and `optimizer`) as step `step` of the checkpoint folder `directory`, kill-safe.

    The step is written under a temporary name (Orbax, each array shard by shard), every file fsynced and listed
    with its sha256 in checksums.json, then renamed; older steps beyond `max_to_keep` are deleted after that.
    Leftovers of killed saves are deleted first.

    Args:
        directory: the checkpoint folder, created if missing.
        model: any nnx.Module: all its variables are saved (parameters, rng streams, statistics), and its
            TransformerConfig when it keeps one (`model.config`), which `restore_checkpoint` checks.
        optimizer: an nnx.Optimizer, or None to save the model only.
        step: a new step number >= 0 (e.g. the training step).
        max_to_keep: keep only the newest this many steps; None: all.
        metadata: a JSON object saved with the step (`checkpoint_info` reads it back), or None.

    Returns:
        The step's folder.

    Raises:
        TypeError: `model` is not an nnx.Module or `optimizer` not an nnx.Optimizer.
        ValueError: `step` is not an integer >= 0 or is already in `directory`; `max_to_keep` is not an
            integer >= 1; `metadata` is not a JSON object.
        OSError: the step could not be written (a full disk: errno ENOSPC); nothing of it is left behind and
            the steps already saved are intact.
    """
    _check_nodes(model, optimizer)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step={step!r} must be an integer >= 0")
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, (int, np.integer)) or max_to_keep < 1
    ):
        raise ValueError(f"max_to_keep={max_to_keep!r} must be an integer >= 1 or None")
    if metadata is not None:
        try:
            if not isinstance(metadata, dict) or json.loads(json.dumps(metadata, allow_nan=False)) != metadata:
                raise TypeError("not a dict of JSON values")
        except (TypeError, ValueError) as err:
            raise ValueError(f"metadata must be a JSON object (str keys; no NaN, no tuples): {err}") from None
    if int(step) in checkpoint_steps(directory):
        raise ValueError(f"step={step} is already saved in {os.fspath(directory)!r}: choose a new step")
    items = {MODEL: ocp.args.StandardSave(nnx.state(model))}
    if optimizer is not None:
        items[OPTIMIZER] = ocp.args.StandardSave(nnx.state(optimizer))
    config = saved_config(model)
    if config is not None:
        items[CONFIG] = ocp.args.JsonSave(config)
    if metadata is not None:
        items[METADATA] = ocp.args.JsonSave(metadata)

    def save(folder: Path) -> None:
        with _checkpointer() as checkpointer:  # Orbax writes `folder` atomically itself: force replaces it
            checkpointer.save(folder.absolute(), args=ocp.args.Composite(**items), force=True)

    def write(folder: Path) -> None:
        if jax.process_count() > 1:  # the other processes learn the folder, then all write their shards into it
            _broadcast_name(folder)
        save(folder)

    try:
        if jax.process_index() > 0:
            save(Path(_broadcast_name(None)))
            _barrier(f"flax_impl.checkpoint step {step}")  # process 0 checks, lists and renames the folder
            return os.fspath(Path(directory) / str(int(step)))
        folder = os.fspath(write_step(directory, int(step), write, keep=max_to_keep))
        if jax.process_count() > 1:
            _barrier(f"flax_impl.checkpoint step {step}")
        return folder
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), os.fspath(directory)) from err
    except ValueError as err:  # TensorStore reports a failed write as ValueError("... [os_error_code='28']")
        code = re.search(r"os_error_code='?(\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), os.fspath(directory)) from err


def _broadcast_name(folder: Path | None) -> str:
    """Process 0's `folder` path, on every process (the others pass None)."""
    from jax.experimental import multihost_utils

    data = np.zeros(4096, np.uint8)
    if folder is not None:
        raw = os.fspath(folder.absolute()).encode()
        data[: len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(data))
    return bytes(out[out != 0].tolist()).decode()


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def checkpoint_info(directory: str | os.PathLike, *, step: int | None = None, verify: bool = True) -> CheckpointInfo:
    """The step, folder, config and metadata of step `step` of `directory`, without reading any array.

    Args:
        directory: a folder written by `save_checkpoint`.
        step: the step to read; None: the newest.
        verify: first check every file of the step against its checksums.json.

    Returns:
        A CheckpointInfo.

    Raises:
        FileNotFoundError: no checkpoint in `directory`.
        ValueError: `step` is not in `directory` (listing those that are).
        CheckpointError: (a ValueError) a file of the step is missing, truncated or corrupt, named.
    """
    step, folder = _step(directory, step, verify)
    with _checkpointer() as checkpointer:
        saved = checkpointer.metadata(folder.absolute()).item_metadata.keys()
        items = {name: ocp.args.JsonRestore() for name in (CONFIG, METADATA) if name in saved}
        values = checkpointer.restore(folder.absolute(), args=ocp.args.Composite(**items)) if items else {}
    return CheckpointInfo(step, folder, values.get(CONFIG), values.get(METADATA))


def restore_checkpoint(
    directory: str | os.PathLike,
    model: nnx.Module,
    optimizer: nnx.Optimizer | None = None,
    *,
    step: int | None = None,
    verify: bool = True,
) -> int:
    """Read step `step` of `directory` into `model` (and `optimizer`), in place, each array on its target sharding.

    The targets are the modules' own variables: concrete arrays keep their shardings, abstract ones (`abstract`)
    become arrays with the ShapeDtypeStruct's sharding. Every file of the step is checked against its
    checksums.json, then the saved config (for a model that keeps one), every shape and every dtype against the
    modules, before any array is read; a step saved without a config restores with a UserWarning.

    Args:
        directory: a folder written by `save_checkpoint`.
        model: a module of the saved architecture, concrete or abstract.
        optimizer: an nnx.Optimizer with the saved transformation (concrete or abstract), or None to restore the
            model only (also from a checkpoint that has optimizer state).
        step: the step to read; None: the newest.
        verify: check the files against checksums.json first; False only for a step written without one (by an
            older flax_impl), whose damage then goes unnoticed.

    Returns:
        The step read.

    Raises:
        TypeError: `model` is not an nnx.Module or `optimizer` not an nnx.Optimizer.
        FileNotFoundError: no checkpoint in `directory`.
        CheckpointError: (a ValueError) a file of the step is missing, truncated or corrupt: its path and what is
            wrong; nothing was written into the modules.
        ValueError: `step` is not in `directory` (listing those that are); `optimizer` given but the step has
            no optimizer state; the step was saved from a model of another config (every field that differs is
            listed); the modules do not match the checkpoint: one message listing every array path whose shape
            or dtype differs (expected and found), is missing or is unexpected.
    """
    _check_nodes(model, optimizer)
    step, folder = _step(directory, step, verify)
    folder = folder.absolute()  # Orbax (TensorStore) takes absolute paths only
    nodes = {MODEL: model} if optimizer is None else {MODEL: model, OPTIMIZER: optimizer}
    targets = {name: _target(node) for name, node in nodes.items()}
    with _checkpointer() as checkpointer:
        metadata = checkpointer.metadata(folder).item_metadata
        if optimizer is not None and metadata.get(OPTIMIZER) is None:
            raise ValueError(f"step {step} in {os.fspath(directory)!r} has no optimizer state; pass optimizer=None")
        problems = []
        if saved_config(model) is not None:
            config = None
            if CONFIG in metadata.keys():
                config = checkpointer.restore(folder, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
                config = config[CONFIG]
            problems += [f"  {line}" for line in config_mismatches(model, config, f"step {step} of {directory}")]
        problems += [line for name in nodes for line in _mismatches(name, targets[name], metadata[name])]
        if problems:
            raise ValueError(
                f"cannot restore step {step} of {os.fspath(directory)!r} into "
                f"{', '.join(type(n).__name__ for n in nodes.values())}:\n" + "\n".join(problems)
            )
        args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
        restored = checkpointer.restore(folder, args=ocp.args.Composite(**args))
    for name, node in nodes.items():
        nnx.update(node, restored[name])
    return int(step)


def _step(directory: str | os.PathLike, step: int | None, verify: bool) -> tuple[int, Path]:
    """(step, folder) of the asked step (None: the newest), its files checked if `verify`."""
    folders = step_folders(directory)
    if not folders:
        raise FileNotFoundError(f"no checkpoint in {os.fspath(directory)!r}")
    step = max(folders) if step is None else step
    if step not in folders:
        raise ValueError(f"step={step!r} is not in {os.fspath(directory)!r}; saved steps: {sorted(folders)}")
    if verify:
        verify_step(folders[step])
    return int(step), folders[step]


def _check_nodes(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(f"optimizer must be an nnx.Optimizer or None, got {type(optimizer).__name__}")


def _checkpointer() -> ocp.Checkpointer:
    handlers = {
        MODEL: ocp.StandardCheckpointHandler(),
        OPTIMIZER: ocp.StandardCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        METADATA: ocp.JsonCheckpointHandler(),
    }
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def _target(node: nnx.Module | nnx.Optimizer) -> nnx.State:
    """nnx.state(node) with every array replaced by a ShapeDtypeStruct carrying its placement."""
    default = SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, nnx.state(node))


def _path(keys: tuple[Any, ...]) -> str:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)  # drop the Variable's own field


def _stored(x: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) as Orbax stores the array: a typed PRNG key array as its uint32 key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return tuple(x.shape), str(np.dtype(x.dtype))


def _mismatches(name: str, target: nnx.State, metadata: Any) -> list[str]:
    """One line per array whose shape or dtype differs from the checkpoint, or that only one side has."""
    flat = jax.tree_util.tree_flatten_with_path
    want = {_path(p): _stored(x) for p, x in flat(target)[0]}
    have = {_path(p): (tuple(m.shape), str(np.dtype(m.dtype))) for p, m in flat(metadata)[0]}
    lines = []
    for path in sorted(set(want) | set(have)):
        where = f"  {name}/{path}"
        if path not in have:
            lines.append(f"{where}: not in the checkpoint (expected {_show(want[path])})")
        elif path not in want:
            lines.append(f"{where}: in the checkpoint ({_show(have[path])}), not in the {name}")
        elif want[path] != have[path]:
            lines.append(f"{where}: expected {_show(want[path])}, found {_show(have[path])}")
    return lines


def _show(shape_dtype: tuple[tuple[int, ...], str]) -> str:
    return f"{shape_dtype[0]} {shape_dtype[1]}"
