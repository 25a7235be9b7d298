"""Weights both ways between flax_impl modules and their torch_ref twins, and safetensors files with torch key names.

Torch keys are the twin's `state_dict()` keys. The only rules are layout rules:
- nnx.Linear `kernel` (in, out) <-> torch `weight` (out, in): transposed;
- the attention's `in_proj.kernel` / `in_proj.bias` <-> `in_proj_weight` (3D, D) / `in_proj_bias` (3D,), packed
  [q; k; v] as nn.MultiheadAttention;
- LayerNorm `scale` <-> `weight`;
- a scanned encoder's stacked `blocks.*` (n_layers, ...) <-> per-layer `blocks.{i}.*`.
Values are copied exactly (transposes and stacking only): flax -> torch -> flax is bit-exact.

A file written by `save` from a module that keeps its config (`Transformer.config`) carries that
TransformerConfig as JSON in its safetensors metadata (`CONFIG_KEY`); `load` into a model of another config is a
ValueError listing every field that differs, because two configs can share every key and shape (n_heads 2 vs 4,
another position scheme) and still compute different things. Files without it (written by torch, or by an older
`save`) still load, with a warning that the architecture could not be checked.

Example:
    >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
    >>> twin = torch_ref.Transformer(cfg)
    >>> twin.load_state_dict(tr.from_numpy_state_dict(to_numpy_state_dict(model)))  # strict: all keys, shapes
    >>> load_torch_state_dict(model, twin.state_dict())       # and back
    >>> save(model, "model.safetensors"); load(model, "model.safetensors")
    >>> model = load_model("model.safetensors")               # built abstractly from the file's config
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from flax_impl.checkpoint_dir import atomic_write
from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.saved_config import CONFIG_KEY, config_mismatches, saved_config

if TYPE_CHECKING:
    from flax_impl.transformer import Transformer

Path = tuple[Any, ...]



@dataclass(frozen=True)
class _Entry:
    torch_key: str
    flax_path: Path
    layer: int | None  # index into the leading layer axis of a scanned stack, or None
    transpose: bool  # Linear kernel (in, out) <-> weight (out, in)
    torch_shape: tuple[int, ...]


def _stacked_prefixes(module: nnx.Module) -> dict[Path, int]:
    """Path prefixes whose parameters carry a leading layer axis (scanned encoders), with the layer count."""
    from flax_impl.transformer import Transformer

    found = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, Transformer) and node.flax_config.scan_layers:
            found[tuple(path) + ("blocks",)] = node.config.n_layers
    return found


def _torch_tail(path: Path) -> tuple[tuple[str, ...], bool]:
    """Rename the end of a flax path to torch's; also say whether the array is transposed."""
    names = tuple(str(p) for p in path)
    if len(names) >= 2 and names[-2] == "in_proj":
        return names[:-2] + ("in_proj_" + ("weight" if names[-1] == "kernel" else names[-1]),), names[-1] == "kernel"
    if names[-1] == "kernel":
        return names[:-1] + ("weight",), True
    if names[-1] == "scale":
        return names[:-1] + ("weight",), False
    return names, False


def _entries(module: nnx.Module) -> list[_Entry]:
    stacked = _stacked_prefixes(module)
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        path = tuple(path)
        shape = tuple(var.get_value().shape)
        prefix = next((p for p in stacked if path[: len(p)] == p), None)
        if prefix is None:
            names, transpose = _torch_tail(path)
            tshape = shape[::-1] if transpose else shape
            entries.append(_Entry(".".join(names), path, None, transpose, tshape))
            continue
        names, transpose = _torch_tail(path[len(prefix) :])
        layer_shape = shape[1:][::-1] if transpose else shape[1:]
        for i in range(stacked[prefix]):
            key = ".".join((*map(str, prefix), str(i), *names))
            entries.append(_Entry(key, path, i, transpose, layer_shape))
    return entries


def to_numpy_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """The module's parameters as numpy arrays keyed like its torch twin's state_dict().

    Args:
        module: any flax_impl module (a scanned encoder's stacked layers come out per layer).

    Returns:
        {torch key: array in torch's layout}, e.g. "blocks.0.attn.in_proj_weight": (3D, D).
    """
    values = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    out = {}
    for e in _entries(module):
        a = values[e.flax_path]
        a = a[e.layer] if e.layer is not None else a
        out[e.torch_key] = np.ascontiguousarray(a.T if e.transpose else a)
    return out


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen those losslessly
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _check_shapes(
    module: nnx.Module, entries: list[_Entry], shapes: dict[str, tuple[int, ...]], strict: bool, config: list[str]
) -> None:
    """Raise one ValueError listing the `config` mismatches, every shape mismatch and, if `strict`, every missing
    and unexpected key."""
    expected = {e.torch_key: e for e in entries}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = []
    for key in sorted(set(expected) & set(shapes)):
        if shapes[key] != expected[key].torch_shape:
            mismatched.append(f"{key}: checkpoint {shapes[key]} vs model {expected[key].torch_shape}")
    if config or mismatched or (strict and (missing or unexpected)):
        lines = [f"cannot load state dict into {type(module).__name__}:"] + [f"  {c}" for c in config]
        lines += [f"  missing key: {k}" for k in missing] if strict else []
        lines += [f"  unexpected key: {k}" for k in unexpected] if strict else []
        lines += [f"  shape mismatch: {m}" for m in mismatched]
        raise ValueError("\n".join(lines))


def state_dict_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """The torch-layout shape of every key of `to_numpy_state_dict(module)`, without reading any array (the
    module may be abstract)."""
    return {e.torch_key: e.torch_shape for e in _entries(module)}


def load_torch_state_dict(module: nnx.Module, state_dict: dict[str, Any], *, strict: bool = True) -> None:
    """Copy a torch-keyed state dict into `module`, in place, cast to each parameter's dtype.

    Nothing is written unless every check passes.

    Args:
        module: any flax_impl module, concrete or abstract (`build_abstract`): each parameter is placed once, on
            its current sharding (or its ShapeDtypeStruct's, or the default device).
        state_dict: {torch key: torch tensor or numpy array}, e.g. a twin's `state_dict()`; bfloat16 tensors are
            widened losslessly.
        strict: True: every key of the module must be present and nothing else. False: load what matches by key
            and leave the rest untouched (the module must then be concrete).

    Raises:
        ValueError: one message listing every shape mismatch and, if `strict`, every missing and unexpected key.
    """
    shapes = {k: tuple(np.shape(_as_numpy(v))) for k, v in state_dict.items()}
    place_torch_tensors(module, shapes, lambda key: _as_numpy(state_dict[key]), strict=strict)


def place_torch_tensors(
    module: nnx.Module,
    shapes: dict[str, tuple[int, ...]],
    fetch: Callable[[str], np.ndarray],
    *,
    strict: bool = True,
) -> None:
    """Build each parameter of `module` once from torch-keyed tensors read on demand, in place.

    The keys and shapes are checked first (from `shapes` alone); then, one parameter at a time, its tensors are
    fetched, transposed and stacked by the layout rules above into one host array in the parameter's dtype, and
    put on the parameter's sharding. So loading holds the model plus one parameter's host copy, never a second
    model (`hf.from_pretrained` reads a checkpoint this way into an abstract model).

    Args:
        module: concrete or abstract (its ShapeDtypeStructs give dtypes and shardings).
        shapes: {torch key: torch-layout shape} of what `fetch` can give.
        fetch: torch key -> array (torch layout).
        strict: as in `load_torch_state_dict`.

    Raises:
        ValueError: as `load_torch_state_dict`; or `strict=False` leaves an abstract parameter without a value.
    """
    entries = _entries(module)
    _check_shapes(module, entries, shapes, strict, [])
    groups: dict[Path, list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.flax_path, []).append(e)
    state = nnx.state(module, nnx.Param)
    current = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    for path, group in groups.items():
        present = [e for e in group if e.torch_key in shapes]
        old = current[path].get_value()
        if len(present) < len(group) and not isinstance(old, jax.Array):
            raise ValueError(f"strict=False: the abstract parameter {'.'.join(map(str, path))} has no value")
        if not present:
            continue
        if group[0].layer is None:
            a = fetch(present[0].torch_key)
            value = np.asarray(a.T if present[0].transpose else a, dtype=old.dtype)
        else:  # a scanned stack: every layer's tensor into one (n_layers, ...) array
            value = np.array(old) if len(present) < len(group) else np.empty(old.shape, old.dtype)
            for e in present:
                a = fetch(e.torch_key)
                value[e.layer] = a.T if e.transpose else a
        sharding = getattr(old, "sharding", None) or SingleDeviceSharding(jax.local_devices()[0])
        current[path].set_value(jax.device_put(value, sharding))
    nnx.update(module, state)


def build_abstract(factory: Callable[[], nnx.Module]) -> nnx.Module:
    """`factory()` with its parameters abstract (ShapeDtypeStructs: no weight initialised or allocated) and every other
    variable concrete (rng streams as `factory()` gives them), for `place_torch_tensors` / `load` to fill.

    Args:
        factory: builds the module, e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(0))`.
    Returns:
        The module.
    """
    module = nnx.eval_shape(factory)
    rest = jax.jit(lambda: nnx.state(factory(), nnx.Not(nnx.Param)))()  # the parameters' init is dead code there
    nnx.update(module, rest)
    return module


def safetensors_metadata(module: nnx.Module) -> dict[str, str]:
    """The metadata `save` writes: {"format": "pt"} (what transformers expects of a torch-keyed file) and, for a
    module that keeps a TransformerConfig as `.config`, `CONFIG_KEY`: that config as JSON."""
    metadata = {"format": "pt"}
    config = saved_config(module)
    if config is not None:
        metadata[CONFIG_KEY] = json.dumps(config, sort_keys=True)
    return metadata


def save(module: nnx.Module, path: str | os.PathLike) -> None:
    """Write the module's parameters to a safetensors file with torch_ref's key names, atomically.

    The torch side reads it with `safetensors.torch.load_file(path)` + `twin.load_state_dict(...)`. Readers see
    the old file or the new one, never half of one. The metadata holds the module's config
    (`safetensors_metadata`), which `load` checks.

    Args:
        module: any flax_impl module.
        path: the file to write; its folder must exist.
    """
    from safetensors.numpy import save_file

    state, metadata = to_numpy_state_dict(module), safetensors_metadata(module)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load(module: nnx.Module, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a safetensors checkpoint (torch_ref key names) into `module`, in place, placing each array as it is read.

    Every parameter is rebuilt with `jax.make_array_from_callback` on its target sharding: that of the module's
    current array, of its ShapeDtypeStruct if the module is abstract (`flax_impl.checkpoint.abstract`), or the
    default device. The callback reads from the file only the slice of one device's shard (`safe_open(...)
    .get_slice`), transposed and stacked by the layout rules above and cast to the parameter's dtype, so a
    sharded model never holds a whole sharded parameter (nor the whole model) on one device. The config in the
    file's metadata (`save` writes it) and every key and shape are checked from the file's header before any array
    is read.

    Args:
        module: any flax_impl module, concrete or abstract (sharded or not).
        path: a file written by `save` or by `safetensors.torch.save_file(twin.state_dict(), path)` (bfloat16
            tensors are read through ml_dtypes and cast).
        strict: as in `load_torch_state_dict`, and the file's config must describe the module's architecture
            (`flax_impl.saved_config`; a file without one loads with a UserWarning). False: parameters absent
            from the file keep their values (the module must then be concrete); the config is not compared.

    Raises:
        ValueError: one message listing every config field that differs from the file's (`config n_heads:
            checkpoint 2 vs model 4`) and, as in `load_torch_state_dict`, every key and shape problem; or
            `strict=False` leaves an abstract parameter without a value.
    """
    from safetensors import safe_open

    entries = _entries(module)
    with safe_open(os.fspath(path), framework="numpy") as file:
        saved = (file.metadata() or {}).get(CONFIG_KEY)
        config = config_mismatches(module, saved, os.fspath(path)) if strict else []
        shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
        _check_shapes(module, entries, shapes, strict, config)
        groups: dict[Path, list[_Entry]] = {}
        for e in entries:
            groups.setdefault(e.flax_path, []).append(e)
        state = nnx.state(module, nnx.Param)
        current = {tuple(p): v for p, v in nnx.to_flat_state(state)}
        found = {p: {e.layer: e for e in group if e.torch_key in shapes} for p, group in groups.items()}
        for flax_path, group in groups.items():
            if len(found[flax_path]) < len(group) and not isinstance(current[flax_path].get_value(), jax.Array):
                name = ".".join(map(str, flax_path))
                raise ValueError(f"strict=False: the abstract parameter {name} is not (wholly) in {os.fspath(path)}")
        for flax_path, layers in found.items():
            if not layers:
                continue
            old = current[flax_path].get_value()
            sharding = getattr(old, "sharding", None) or SingleDeviceSharding(jax.local_devices()[0])

            def read(index: tuple[slice, ...], old=old, layers=layers) -> np.ndarray:
                return _read_shard(file, layers, old, index)

            current[flax_path].set_value(jax.make_array_from_callback(old.shape, sharding, read))
    nnx.update(module, state)


def load_model(path: str | os.PathLike, *, flax_config: FlaxConfig | None = None, seed: int = 0) -> Transformer:
    """The Transformer a file written by `save` describes, built abstractly and filled from the file: no weight is
    initialised, each array is placed once (`build_abstract` + `load`), in eval mode.

    Args:
        path: a safetensors file written by `save` from a Transformer (its metadata holds the config).
        flax_config: how the Flax model computes (a FlaxConfig; None: the defaults); the weights are cast to its
            param_dtype.
        seed: seeds the model's rng streams (dropout in train mode).
    Returns:
        The Transformer.
    Raises:
        ValueError: the file carries no flax_impl config (load into a model you build: `load(model, path)`),
            or its config or keys do not fit (as `load`).
    """
    from safetensors import safe_open

    from flax_impl.transformer import Transformer

    with safe_open(os.fspath(path), framework="numpy") as file:
        saved = (file.metadata() or {}).get(CONFIG_KEY)
    if saved is None:
        raise ValueError(f"{os.fspath(path)} carries no flax_impl config: build the model and use load(model, path)")
    config = TransformerConfig.from_dict(json.loads(saved))
    model = build_abstract(lambda: Transformer(config, flax_config=flax_config, rngs=nnx.Rngs(seed)))
    load(model, path)
    model.eval()
    return model


def _read_shard(file: Any, layers: dict[int | None, _Entry], old: Any, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of one flax parameter, in the parameter's layout and dtype, read from the file's slices.

    `layers` maps a stacked parameter's layer numbers (or None for an unstacked one) to the file's entries; a layer
    missing from it (strict=False) keeps `old`'s values."""
    dtype = old.dtype

    def one(entry: _Entry, idx: tuple[slice, ...]) -> np.ndarray:
        if not idx:  # a scalar
            return np.asarray(file.get_tensor(entry.torch_key))
        block = file.get_slice(entry.torch_key)[idx[::-1] if entry.transpose else idx]  # the block in torch's layout
        return block.T if entry.transpose else block

    if None in layers:
        return np.asarray(one(layers[None], index), dtype=dtype)
    rows = [
        one(layers[i], index[1:]) if i in layers else np.asarray(old[i][index[1:]])
        for i in range(*index[0].indices(old.shape[0]))
    ]  # each (...) of one layer
    return np.asarray(np.stack(rows), dtype=dtype)  # (layers in the block, ...)
