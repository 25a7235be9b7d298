"""The checkpoints of `flax-impl train`: one directory, replaced as a whole, never half-written.

Layout of OUT/checkpoint/:
  model.safetensors  parameters with torch_ref key names (flax_impl.save): `torch_ref.TransformerEncoder(cfg)`
                     + `safetensors.torch.load_file` + `load_state_dict` reads it;
  config.json        {"model": TransformerConfig dict, "train": TrainConfig dict, "step": ..., "seed": ...};
  train_state.npz    optimizer state (AdamW moments, counts), dropout rng keys/counts, step, loss history.

A save fills a temporary directory, then swaps it in with renames; OUT/checkpoint.old exists only between the two
renames, and `checkpoint_dir` finds it if a save was interrupted there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flax_impl.config import TrainConfig, TransformerConfig

CKPT, OLD = "checkpoint", "checkpoint.old"


def checkpoint_dir(out: str | os.PathLike) -> Path | None:
    """OUT/checkpoint, or OUT/checkpoint.old if a save was interrupted mid-swap, or None."""
    for name in (CKPT, OLD):
        if (Path(out) / name / "train_state.npz").is_file():
            return Path(out) / name
    return None


def check_resumable(ckpt: Path, cfg: TransformerConfig, tcfg: TrainConfig, seed: int) -> None:
    """ValueError unless the run described by (cfg, tcfg, seed) can continue the checkpoint in `ckpt`: the same
    model options, gradient clipping on or off as saved (the optimizer state differs), the same seed."""
    saved = json.loads((ckpt / "config.json").read_text())
    diff = {k: (v, cfg.to_dict()[k]) for k, v in saved["model"].items() if cfg.to_dict().get(k) != v}
    if diff:
        raise ValueError(f"--resume with other model options than the checkpoint: {diff} (saved, given)")
    if (saved["train"]["clip_norm"] is None) != (tcfg.clip_norm is None):
        raise ValueError("--resume cannot switch gradient clipping on or off (the optimizer state differs)")
    if saved["seed"] != seed:
        raise ValueError(f"--resume with --seed={seed}, the checkpoint used --seed={saved['seed']}")


def _flat(state: Any) -> dict[str, Any]:
    from flax import nnx

    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def save_state(path: Path, model: Any, optimizer: Any, history: dict[str, list[float]]) -> None:
    """train_state.npz: optimizer state ("opt/..."), dropout rng state ("rng/..."), loss history ("history/...")."""
    import jax
    from flax import nnx

    arrays = {}
    for key, var in _flat(nnx.state(optimizer)).items():
        arrays["opt/" + key] = np.asarray(var[...])
    for key, var in _flat(nnx.state(model, nnx.RngState)).items():
        value = var[...]
        arrays["rng/" + key] = np.asarray(jax.random.key_data(value) if isinstance(var, nnx.RngKey) else value)
    for key, values in history.items():
        arrays["history/" + key] = np.asarray(values, dtype=np.float64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_state(path: Path, model: Any, optimizer: Any) -> dict[str, list[float]]:
    """Read `save_state`'s file into `optimizer` and `model`'s rng state; returns the loss history.

    Raises:
        ValueError: an entry the model needs is missing or has another shape (a different model wrote it).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    with np.load(path) as data:
        saved = {k: data[k] for k in data.files}
    for prefix, obj, filt in (("opt/", optimizer, ...), ("rng/", model, nnx.RngState)):
        state = nnx.state(obj) if filt is ... else nnx.state(obj, filt)
        for key, var in _flat(state).items():
            if prefix + key not in saved:
                raise ValueError(f"{path} has no entry {prefix + key}: it was written by a different model")
            value = saved[prefix + key]
            if isinstance(var, nnx.RngKey):
                var[...] = jax.random.wrap_key_data(value, impl=jax.random.key_impl(var[...]))
            else:
                if value.shape != var[...].shape:
                    raise ValueError(f"{path}: {prefix + key} has shape {value.shape}, the model {var[...].shape}")
                var[...] = jnp.asarray(value, var[...].dtype)
        nnx.update(obj, state)
    return {k[len("history/") :]: saved[k].tolist() for k in saved if k.startswith("history/")}


def save_checkpoint(out: Path, model: Any, optimizer: Any, meta: dict, history: dict[str, list[float]]) -> Path:
    """Write OUT/checkpoint atomically: fill a temporary directory, then swap it in with renames."""
    from flax_impl.interop import save

    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".checkpoint-tmp-"))
    try:
        save(model, tmp / "model.safetensors")
        save_state(tmp / "train_state.npz", model, optimizer, history)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        final, old = out / CKPT, out / OLD
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
