"""Hugging Face model folders on disk: config.json, model.safetensors or a sharded
model.safetensors.index.json + shards. Local folders only: nothing is downloaded.

Headers (keys, shapes, dtypes) are read without reading tensor data, so a mismatched, truncated or corrupt
checkpoint fails before any weight is read. numpy has no bfloat16: bfloat16 tensors are read through safetensors'
flax reader, one at a time.

Faults name the file: a file that is not JSON or not safetensors raises ValueError, a file that cannot be read or
written OSError; a tensor holding NaN or inf is loaded with a `NonFiniteWeightWarning` naming it. Writes replace
the folder's files only once every new file is written whole (a full disk leaves the previous folder as it was).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.checkpoint_dir import TMP_PREFIX

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Dtypes of safetensors headers, by how many bits of mantissa / exponent they keep (for `cast_warning`).
_FLOAT_BITS = {"F64": (52, 11), "F32": (23, 8), "BF16": (7, 8), "F16": (10, 5)}
_NUMPY_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class NonFiniteWeightWarning(UserWarning):
    """A checkpoint tensor holds NaN or infinite values (loaded as they are)."""


class LossyCastWarning(UserWarning):
    """Checkpoint tensors are cast to a parameter dtype that cannot hold every value they hold."""


def read_json(path: Path) -> Any:
    """A JSON file's value.

    Raises:
        OSError: the file cannot be read (its path in the message).
        ValueError: it is not UTF-8 JSON, naming the file and where the JSON breaks.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file: {err}") from None


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's config.json as a dict, every value its family's table reads checked for its kind.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: config.json is not JSON or not a JSON object; a value the family's table reads is of another
            kind than it declares, e.g. "false" where a bool belongs (`ArgumentTypeError`, naming the file, the
            key, the value and what is allowed); any other refusal of `config_from_hf`, naming the file.
    """
    from flax_impl.hf.convert import config_from_hf

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a local folder (flax_impl.hf reads local folders only)")
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(folder)!r}; found {sorted(os.listdir(folder))}")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not an object")
    config_from_hf(hf, source=str(path))
    return hf


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, or every shard the index names.

    Raises:
        FileNotFoundError: neither file exists (PyTorch pickles such as pytorch_model.bin are not read), or a
            shard named by the index is absent.
        ValueError: the index is not JSON, has no 'weight_map' object, or maps a key to anything but a file name
            in the folder (a path such as "../x" included), naming the index.
    """
    folder = Path(folder)
    single, index = folder / WEIGHTS, folder / INDEX
    if single.is_file():
        return [single]
    if not index.is_file():
        raise FileNotFoundError(
            f"no {WEIGHTS} or {INDEX} in {str(folder)!r}; found {sorted(os.listdir(folder))} "
            "(only safetensors checkpoints are read)"
        )
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' object (checkpoint key -> shard file name)")
    bad = [name for name in weight_map.values() if not isinstance(name, str) or Path(name).name != name]
    if bad:
        raise ValueError(f"{index} maps keys to {bad[:3]!r}: shards must be file names in {str(folder)!r}")
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{index} names shards that are not in {str(folder)!r}: {absent}")
    return shards


def _unreadable(path: Path, err: Exception) -> Exception:
    """safetensors' own error (a bare Exception) as a ValueError naming the file; an OSError kept, named."""
    if isinstance(err, OSError):
        return OSError(err.errno, f"cannot read {path}: {err.strerror or err}")
    return ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}")


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path, str]]:
    """Checkpoint key -> (shape, file, safetensors dtype such as "F32" or "BF16"), from the headers only.

    safetensors checks that a header is whole and that its tensors cover the file exactly, so a truncated or
    padded file fails here, before any tensor is read.

    Raises:
        ValueError: a file that is not safetensors (truncated, corrupt header), or a key in two files.
        OSError: a file that cannot be read.
    """
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], Path, str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                entries = [(key, f.get_slice(key)) for key in f.keys()]
                entries = [(key, tuple(s.get_shape()), s.get_dtype()) for key, s in entries]
        except Exception as err:  # safetensors raises SafetensorError, a bare Exception
            raise _unreadable(path, err) from None
        for key, shape, dtype in entries:
            if key in found:
                raise ValueError(f"checkpoint key {key!r} is in both {found[key][1].name} and {path.name}")
            found[key] = (shape, path, dtype)
    return found


def read_tensor(path: Path, key: str) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16).

    Warns:
        NonFiniteWeightWarning: the tensor holds NaN or infinite values, naming the file, the key and how many.
    Raises:
        ValueError / OSError: the file cannot be read as safetensors, naming it.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            tensor = f.get_tensor(key) if f.get_slice(key).get_dtype() != "BF16" else None
        if tensor is None:
            with safe_open(str(path), framework="flax") as f:
                tensor = np.asarray(f.get_tensor(key))
    except Exception as err:
        raise _unreadable(path, err) from None
    check_finite(tensor, f"{path}: tensor {key!r}")
    return tensor


def check_finite(tensor: np.ndarray, where: str) -> None:
    """Warn (`NonFiniteWeightWarning`) if a floating tensor holds NaN or infinite values, counting them."""
    if tensor.dtype.kind not in "fV":  # "V": ml_dtypes' bfloat16
        return
    finite = np.isfinite(tensor)
    if not finite.all():
        nan = int(np.isnan(tensor).sum())
        warnings.warn(
            f"{where} holds {nan} NaN and {int((~finite).sum()) - nan} infinite values of {tensor.size}; "
            "loaded as they are",
            NonFiniteWeightWarning,
            stacklevel=3,
        )


def cast_warning(dtypes: Mapping[str, str], param_dtype: str, source: str) -> str | None:
    """What casting the checkpoint's tensors to `param_dtype` loses, or None when every value is kept.

    Widening (bfloat16 or float16 into float32) keeps every value exactly: None. Narrowing loses precision
    (float32 into bfloat16 or float16; float16 into bfloat16) or range (float32 or bfloat16 into float16: a value
    beyond +-65504 becomes inf).

    Args:
        dtypes: checkpoint key -> safetensors dtype ("F32", "BF16", ...), as `read_headers` gives.
        param_dtype: the parameters' dtype name ("float32", "bfloat16", "float16").
        source: how the message names the checkpoint (its folder).
    Returns:
        One line naming the source, the checkpoint dtypes, param_dtype and what is lost; or None.
    """
    if param_dtype not in _NUMPY_DTYPES:
        return None
    mantissa, exponent = _FLOAT_BITS[_NUMPY_DTYPES[param_dtype]]
    stored = [d for d in dtypes.values() if d in _FLOAT_BITS]
    less_precision = sorted({d for d in stored if _FLOAT_BITS[d][0] > mantissa})
    less_range = sorted({d for d in stored if _FLOAT_BITS[d][1] > exponent})
    lossy = sorted(set(less_precision) | set(less_range))
    if not lossy:
        return None
    lost = [what for what, dts in (("precision", less_precision), ("range (beyond it a value becomes inf)", less_range))
            if dts]  # fmt: skip
    n = sum(d in lossy for d in stored)
    return f"{source}: {n} tensor(s) stored as {'/'.join(lossy)} are cast to {param_dtype}, losing {' and '.join(lost)}"


def warn_lossy_cast(header: Mapping[str, tuple[Any, ...]], param_dtype: str, source: str) -> None:
    """Warn once (`LossyCastWarning`) when the checkpoint's tensors lose values on their cast to param_dtype.

    Args:
        header: `read_headers`' result (its third item, the dtype, is read).
        param_dtype: the parameters' dtype name.
        source: the folder, as the message names it.
    """
    message = cast_warning({k: v[2] for k, v in header.items()}, param_dtype, source)
    if message is not None:
        warnings.warn(message, LossyCastWarning, stacklevel=3)


def write_folder(folder: str | os.PathLike, hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write config.json and model.safetensors (metadata format "pt", as transformers writes) into `folder`,
    creating it. Both files are written whole under temporary names first, then renamed over the old ones: a
    failure while writing (a full disk) leaves the folder's previous files as they were, and no temporary file.

    Raises:
        OSError: a file could not be written, naming it and the reason (its errno kept where known).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_all(
        folder,
        {WEIGHTS: lambda tmp: save_file(dict(tensors), tmp, metadata={"format": "pt"}), CONFIG: write_json},
    )


def _atomic_all(folder: Path, writers: Mapping[str, Callable[[str], Any]]) -> None:
    """Write every file to a temporary name in `folder`, then rename each over its name; on any failure remove
    the temporaries and change nothing."""
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=Path(name).suffix)
            os.close(fd)
            temps[name] = tmp
            try:
                write(tmp)
            except Exception as err:
                raise _write_error(folder / name, err) from None
        for name, tmp in temps.items():
            os.chmod(tmp, 0o644)  # mkstemp (and some writers) make it 0600
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def _write_error(path: Path, err: Exception) -> OSError:
    """An OSError naming the file that could not be written (safetensors reports I/O errors as its own
    exception, with the OS error number in the text)."""
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", str(err))):
        code = int(m.group(1))
    reason = os.strerror(code) if code else str(err)
    return OSError(code, f"cannot write {path} ({reason}); the folder keeps its previous files")
