"""Run by test_distributed.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (so the
rest of the suite keeps one device). Prints one JSON object: for each (data, model) mesh, the sharded model's
parameter layout and its differences from the same model on one device (forward and one train step), plus the
errors raised for shapes the mesh cannot split. The assertions live in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from flax_impl import (  # noqa: E402
    distributed as dist,  # noqa: E402
    train as ftrain,  # noqa: E402
)
from flax_impl.apps.cli import main as cli_main  # noqa: E402
from flax_impl.checkpoint import checkpoint_info  # noqa: E402
from flax_impl.config import TransformerConfig  # noqa: E402
from flax_impl.tokenizer import PAD_ID  # noqa: E402
from flax_impl.transformer import Transformer  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
# Tiny, but every split is real on every mesh: 8 heads (model axis up to 8), d_ff and vocab divisible by 8.
# RoPE with base 10 so that the key third of in_proj's bias gets a real gradient (see test_train.py).
CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_heads=8, d_ff=64, n_layers=2, max_len=16, dropout=0.0,
                       position="rope", rope_base=10.0, padding_idx=PAD_ID)
B, L, LR = 8, 8, 0.5


def _spec(value: jax.Array) -> list:
    spec = value.sharding.spec if isinstance(value.sharding, NamedSharding) else ()
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def _layout(node: nnx.Module | nnx.Optimizer, filt) -> dict[str, dict]:
    """path -> spec, global shape, every device's shard shape and how many distinct device blocks there are."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(node, filt)):
        value = var[...]
        if not hasattr(value, "sharding") or value.ndim == 0:
            continue
        shards = value.addressable_shards
        out[".".join(map(str, path))] = {
            "spec": _spec(value),
            "shape": list(value.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "distinct_blocks": len({str(s.index) for s in shards}),
            "n_devices": len(shards),
        }
    return out


def _params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, CONFIG.vocab_size, size=(B, L))
    tokens[1, -3:] = PAD_ID
    tokens[6, -5:] = PAD_ID
    return ftrain.masked_token_batch(tokens, vocab_size=CONFIG.vocab_size, rng=rng, mask_prob=0.5)


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _cli_losses() -> dict[str, list[float]]:
    """`flax-impl train` for 4 steps without and with --mesh data=4,model=2 (dropout off): per-step losses."""
    args = ["train", "--steps", "4", "--warmup", "1", "--eval-every", "4", "--eval-batches", "1", "--batch-size",
            "8", "--seq-len", "16", "--d-model", "32", "--n-heads", "4", "--n-layers", "1", "--dropout", "0",
            "--corpus-mb", "0.05", "--plot", "none"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("single", []), ("mesh", ["--mesh", "data=4,model=2"])):
            code = cli_main([*args, "--out", os.path.join(tmp, name), *extra])
            assert code == 0, f"flax-impl train {extra} exited {code}"
            history = checkpoint_info(os.path.join(tmp, name, "checkpoint")).metadata["history"]
            out[name] = history["train_loss"] + history["eval_loss"]
    return out


def _cli_bench() -> dict:
    """`flax-impl bench --mesh data=4,model=2` on a tiny encoder, both frameworks: the JSON it writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        code = cli_main(["bench", "--mesh", "data=4,model=2", "--layers", "1", "--d-model", "32", "--heads", "4",
                         "--vocab", "64", "--shapes", "4x8", "--repeats", "2", "--warmup", "0", "--matmul-size", "64",
                         "--compile-layers", "1", "--json", path])
        assert code == 0, f"flax-impl bench --mesh exited {code}"
        with open(path) as fh:
            return json.load(fh)


def main() -> dict:
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"
    batch = _batch()
    ref = Transformer(CONFIG, rngs=nnx.Rngs(0))  # one device, no mesh
    ref.eval()
    ref_hidden = np.asarray(ref(jnp.asarray(batch["inputs"]), jnp.asarray(batch["attention_mask"])))
    ref_before = _params(ref)
    ref_opt = nnx.Optimizer(ref, optax.sgd(LR, momentum=0.9), wrt=nnx.Param)
    ref_metrics = ftrain.train_step(ref, ref_opt, batch)
    ref_update = {k: v - ref_before[k] for k, v in _params(ref).items()}

    out = {"meshes": {}, "ref_loss": float(ref_metrics["loss"]), "ref_grad_norm": float(ref_metrics["grad_norm"])}
    for data, model_size in MESHES:
        mesh = dist.make_mesh(data, model_size)
        model = dist.create_sharded_model(CONFIG, mesh, seed=0)
        model.eval()
        init = _params(model)
        hidden = dist.sharded_forward(model, batch["inputs"], batch["attention_mask"], mesh=mesh)
        opt = dist.create_sharded_optimizer(model, optax.sgd(LR, momentum=0.9), mesh)
        metrics = dist.sharded_train_step(model, opt, batch, mesh=mesh)
        update = {k: v - init[k] for k, v in _params(model).items()}
        out["meshes"][f"{data}x{model_size}"] = {
            "init_max_abs_diff": max(float(np.abs(init[k] - ref_before[k]).max()) for k in init),
            "forward_max_abs_diff": float(np.abs(np.asarray(hidden) - ref_hidden).max()),
            "forward_spec": _spec(hidden),
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "update_rel_err": {
                k: float(np.abs(update[k] - ref_update[k]).max() / np.abs(ref_update[k]).max()) for k in update
            },
            "params": _layout(model, nnx.Param),
            "optimizer": _layout(opt, nnx.optimizer.OptState),
        }

    mesh = dist.make_mesh(2, 4)
    out["errors"] = {
        "n_heads": _error(lambda: dist.create_sharded_model(CONFIG.replace(n_heads=2, d_model=32), mesh)),
        "d_ff": _error(lambda: dist.create_sharded_model(CONFIG.replace(d_ff=66), mesh)),
        "vocab_size": _error(lambda: dist.create_sharded_model(CONFIG.replace(vocab_size=66), mesh)),
        "mesh_size": _error(lambda: dist.make_mesh(3, 2)),
        "batch": _error(lambda: dist.shard_batch(np.zeros((3, L), np.int32), mesh)),
    }
    out["cli"] = _cli_losses()
    out["bench"] = _cli_bench()
    return out


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    print(json.dumps(main()))
