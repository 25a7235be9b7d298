"""Hugging Face model folders on disk: config.json, model.safetensors or a sharded
model.safetensors.index.json + shards. Local folders only: nothing is downloaded.

Headers (keys, shapes) are read without reading tensor data, so a mismatched checkpoint fails before any weight
is read. numpy has no bfloat16: bfloat16 tensors are read through safetensors' flax reader, one at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.checkpoint_dir import atomic_write

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's config.json as a dict.

    Raises:
        FileNotFoundError: the folder or its config.json does not exist.
        ValueError: config.json is not a JSON object.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a local folder (flax_impl.hf reads local folders only)")
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(folder)!r}; found {sorted(os.listdir(folder))}")
    with open(path, encoding="utf-8") as f:
        hf = json.load(f)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a JSON {type(hf).__name__}, not an object")
    return hf


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, or every shard the index names.

    Raises:
        FileNotFoundError: neither file exists (PyTorch pickles such as pytorch_model.bin are not read), or a
            shard named by the index is absent.
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
    with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' object")
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{index} names shards that are not in {str(folder)!r}: {absent}")
    return shards


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Checkpoint key -> (shape, file), from the safetensors headers only."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                if key in found:
                    raise ValueError(f"checkpoint key {key!r} is in both {found[key][1].name} and {path.name}")
                found[key] = (tuple(f.get_slice(key).get_shape()), path)
    return found


def read_tensor(path: Path, key: str) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 as ml_dtypes.bfloat16)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        if f.get_slice(key).get_dtype() != "BF16":
            return f.get_tensor(key)
    with safe_open(str(path), framework="flax") as f:
        return np.asarray(f.get_tensor(key))


def write_folder(folder: str | os.PathLike, hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
    """Write config.json and model.safetensors (metadata format "pt", as transformers writes) into `folder`,
    creating it; each file is written to a temporary name first and renamed, so a reader sees whole files."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(dict(tensors), tmp, metadata={"format": "pt"}))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(folder / CONFIG, write_json)
