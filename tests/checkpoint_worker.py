"""Run by test_checkpoint.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8. Prints one
JSON object; the assertions live in test_checkpoint.py.

A sharded encoder and its AdamW optimizer (mesh data=4 x model=2) take one training step with dropout on, are
saved with Orbax and restored onto another mesh (data=2 x model=4): into abstract modules (`abstract`) and into a
concrete sharded model. The same model is written as safetensors and loaded onto that mesh. Reported per array:
shardings, shard shapes and differences; and what each device was handed while restoring, recorded by wrapping
the JAX calls that build arrays from per-device pieces (`jax.make_array_from_single_device_arrays`, which Orbax's
restore calls, with the host blocks `jax.device_put` sends to devices; `jax.make_array_from_callback`, which
`interop.load` calls).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from flax_impl import (  # noqa: E402
    distributed as dist,  # noqa: E402
    interop,  # noqa: E402
    train as ftrain,  # noqa: E402
)
from flax_impl.checkpoint import abstract, restore_checkpoint, save_checkpoint  # noqa: E402
from flax_impl.config import TransformerConfig  # noqa: E402
from flax_impl.transformer import Transformer  # noqa: E402

# Tiny, every split real on both meshes (heads, d_ff and vocab divisible by 4); dropout on, so the rng streams
# matter for resuming.
CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_heads=8, d_ff=64, n_layers=2, max_len=16, dropout=0.1,
                           position="rope", rope_base=10.0)
B, L = 8, 8


def _tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2)


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, CONFIG.vocab_size, size=(B, L))
    return ftrain.masked_token_batch(tokens, vocab_size=CONFIG.vocab_size, rng=rng, mask_prob=0.5)


def _arrays(node: nnx.Module | nnx.Optimizer, only=...) -> dict[str, jax.Array]:
    """path -> array of the variables `only` selects; typed PRNG keys as their key data."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(node, only)):
        value = var.get_value()
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out["/".join(map(str, path))] = value
    return out


def _spec(value: jax.Array) -> list:
    spec = value.sharding.spec if isinstance(value.sharding, NamedSharding) else ()
    spec = list(spec) + [None] * (value.ndim - len(spec))
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _compare(got: nnx.Module | nnx.Optimizer, want_values, want_layout, only=...) -> dict[str, dict]:
    """For every array of `got` (that `only` selects): its spec and shard shapes against `want_layout`'s, its
    values against `want_values`'s (max |difference|, 0 = bit for bit)."""
    got, values, layout = (_arrays(n, only) for n in (got, want_values, want_layout))
    out = {}
    for path, value in got.items():
        out[path] = {
            "spec": _spec(value),
            "want_spec": _spec(layout[path]),
            "shard_shapes": sorted({tuple(s.data.shape) for s in value.addressable_shards}),
            "want_shard_shapes": sorted({tuple(s.data.shape) for s in layout[path].addressable_shards}),
            "shape": list(value.shape),
            "n_devices": len(value.addressable_shards),
            "max_abs_diff": float(np.abs(np.asarray(value, np.float64) - np.asarray(values[path], np.float64)).max(
                initial=0.0)),
        }
    return out


class Recorder:
    """Wraps the JAX calls that assemble arrays from per-device pieces; records what each device was handed."""

    def __init__(self) -> None:
        self.assembled: list[dict] = []  # make_array_from_single_device_arrays: global shape, piece shapes
        self.callbacks: list[dict] = []  # make_array_from_callback: global shape, shapes the callback returned
        self.host_puts: list[list[int]] = []  # shapes of host (numpy) arrays given to jax.device_put
        self._saved = (jax.make_array_from_single_device_arrays, jax.make_array_from_callback, jax.device_put)

    def __enter__(self) -> Recorder:
        assemble, from_callback, device_put = self._saved

        def assemble_rec(shape, sharding, arrays, *args, **kwargs):
            self.assembled.append({"shape": list(shape), "shard_shape": list(sharding.shard_shape(tuple(shape))),
                                   "pieces": sorted({tuple(a.shape) for a in arrays})})
            return assemble(shape, sharding, arrays, *args, **kwargs)

        def from_callback_rec(shape, sharding, callback, *args, **kwargs):
            entry = {"shape": list(shape), "shard_shape": list(sharding.shard_shape(tuple(shape))), "blocks": set()}
            self.callbacks.append(entry)

            def wrapped(index):
                block = callback(index)
                entry["blocks"].add(tuple(np.shape(block)))
                return block

            return from_callback(shape, sharding, wrapped, *args, **kwargs)

        def device_put_rec(x, *args, **kwargs):
            if isinstance(x, np.ndarray):
                self.host_puts.append(list(x.shape))
            return device_put(x, *args, **kwargs)

        jax.make_array_from_single_device_arrays = assemble_rec
        jax.make_array_from_callback = from_callback_rec
        jax.device_put = device_put_rec
        return self

    def __exit__(self, *exc) -> None:
        jax.make_array_from_single_device_arrays, jax.make_array_from_callback, jax.device_put = self._saved

    def report(self) -> dict:
        callbacks = [dict(c, blocks=sorted(c["blocks"])) for c in self.callbacks]
        return {"assembled": self.assembled, "callbacks": callbacks, "host_puts": self.host_puts}


def main() -> dict:
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
    mesh_a, mesh_b = dist.make_mesh(4, 2), dist.make_mesh(2, 4)
    model = dist.create_sharded_model(CONFIG, mesh_a, seed=0)
    opt = dist.create_sharded_optimizer(model, _tx(), mesh_a)
    dist.sharded_train_step(model, opt, _batch(1), mesh=mesh_a)  # moments, counts and rng streams move
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "orbax")
        save_checkpoint(ckpt, model, opt, step=1)

        # The layout a model built on mesh_b has: what a restore onto mesh_b must reproduce.
        layout = dist.create_sharded_model(CONFIG, mesh_b, seed=5)
        layout_opt = dist.create_sharded_optimizer(layout, _tx(), mesh_b)

        target = abstract(lambda: Transformer(CONFIG, rngs=nnx.Rngs(1)), mesh=mesh_b)
        target_opt = abstract(lambda: nnx.Optimizer(Transformer(CONFIG, rngs=nnx.Rngs(1)), _tx(),
                                                    wrt=nnx.Param), mesh=mesh_b)
        with Recorder() as rec:
            out["step"] = restore_checkpoint(ckpt, target, target_opt)
        out["orbax_record"] = rec.report()
        out["orbax_model"] = _compare(target, model, layout)
        out["orbax_optimizer"] = _compare(target_opt, opt, layout_opt)

        # Resume: the next step from the saved state and from the restored one (another mesh) agree.
        batch = _batch(2)
        out["resume_loss"] = [float(dist.sharded_train_step(model, opt, batch, mesh=mesh_a)["loss"]),
                              float(dist.sharded_train_step(target, target_opt, batch, mesh=mesh_b)["loss"])]

        # Into a concrete sharded model (other seed): its shardings kept, values replaced.
        concrete = dist.create_sharded_model(CONFIG, mesh_b, seed=7)
        restore_checkpoint(ckpt, concrete, step=1)
        saved_model = abstract(lambda: Transformer(CONFIG, rngs=nnx.Rngs(1)), mesh=mesh_b)
        restore_checkpoint(ckpt, saved_model)  # the step-1 values again (model and target moved on since)
        out["orbax_concrete"] = _compare(concrete, saved_model, layout)

        # safetensors (torch key names), loaded onto mesh_b as each array is read.
        path = os.path.join(tmp, "model.safetensors")
        interop.save(saved_model, path)
        st_target = abstract(lambda: Transformer(CONFIG, rngs=nnx.Rngs(1)), mesh=mesh_b)
        with Recorder() as rec:
            interop.load(st_target, path)
        out["safetensors_record"] = rec.report()
        out["safetensors_abstract"] = _compare(st_target, saved_model, layout, nnx.Param)  # parameters only
        st_concrete = dist.create_sharded_model(CONFIG, mesh_b, seed=9)
        interop.load(st_concrete, path)
        out["safetensors_concrete"] = _compare(st_concrete, saved_model, layout, nnx.Param)
    return out


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    print(json.dumps(main()))
