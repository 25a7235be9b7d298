"""The two sides of `flax-impl bench`: the Flax encoder under `jax.jit` (or `nnx.jit`) and torch_ref's encoder
with the same weights, with its PyTorch peers (`bench_peers`: nn.TransformerEncoderLayer, SDPA, torch.compile).
Each side hands out runners: argument-less callables that do one forward or one train step and return only once
the device is done.

The train step is the same on both sides: a mean-squared loss of the hidden states against a fixed random
target, then plain SGD with learning rate `LR` (torch: torch.optim.SGD), dropout on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flax_impl.config import FlaxConfig, TransformerConfig

LR = 1e-4  # SGD learning rate of the benchmark's train step (both sides)
Runner = Callable[[], None]


# ----------------------------------------------------------------------------------------------- Flax side
def _flax_forward_fn(gdef: Any) -> Callable:
    from flax import nnx

    def forward(state: Any, ids: Any) -> Any:
        return nnx.merge(gdef, state)(ids)  # (B, L, D)

    return forward


def _nnx_train_step(model: Any, ids: Any, target: Any) -> Any:
    """One MSE + SGD step on `model` in place; returns the loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(model: Any) -> Any:
        return jnp.mean(jnp.square(model(ids).astype(jnp.float32) - target))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - jnp.asarray(LR, p.dtype) * g.astype(p.dtype), params, grads))
    return loss


def _flax_train_fn(gdef: Any) -> Callable:
    """(params, rest, ids, target) -> (params, rest, loss): MSE of the hidden states, plain SGD."""
    from flax import nnx

    def train_step(params: Any, rest: Any, ids: Any, target: Any) -> tuple[Any, Any, Any]:
        model = nnx.merge(gdef, params, rest)
        loss = _nnx_train_step(model, ids, target)
        _, params, rest = nnx.split(model, nnx.Param, ...)  # updated weights and dropout counters
        return params, rest, loss

    return train_step


class FlaxSide:
    """The Flax encoder and its jitted forward / train step.

    Args:
        config, flax_config: the encoder.
        device: the JAX device of the inputs (ignored with a mesh).
        seed: parameter seed; the dropout key is `jax.random.key(seed, impl=rng_impl)`, chosen here so that no
            global JAX config changes.
        rng_impl: the JAX PRNG implementation of the dropout stream.
        flax_jit: "split": `jax.jit` over the `nnx.split` state (the train step donates its weights); "nnx":
            graph-mode `nnx.jit`, which also returns the model state on every call.
        mesh: a (data, model) Mesh to shard the model and the batch on, or None.
    """

    def __init__(
        self,
        config: TransformerConfig,
        flax_config: FlaxConfig,
        *,
        device: Any,
        seed: int,
        rng_impl: str,
        flax_jit: str = "split",
        mesh: Any = None,
    ):
        import jax
        from flax import nnx

        from flax_impl.distributed import create_sharded_model
        from flax_impl.transformer import Transformer

        self.jax, self.nnx, self.device, self.flax_jit, self.mesh = jax, nnx, device, flax_jit, mesh
        rngs = nnx.Rngs(params=seed, dropout=jax.random.key(seed, impl=rng_impl))
        if mesh is None:
            self.model = Transformer(config, flax_config=flax_config, rngs=rngs)
        else:  # every parameter on its partition spec, initialised shard by shard
            self.model = create_sharded_model(config, mesh, flax_config=flax_config, rngs=rngs)
        self._fns: dict[str, Callable] = {}

    def compiled_text(self, mode: str, ids: np.ndarray, target: np.ndarray) -> str:
        """The compiled program of the "forward" or "train" step (`jax.jit` over the split state) as text, to
        see which kernels XLA chose; leaves the model in `mode`."""
        jax, nnx = self.jax, self.nnx
        ids_j = jax.device_put(ids, self.device)
        if mode == "forward":
            self.model.eval()
            gdef, state = nnx.split(self.model)
            return jax.jit(_flax_forward_fn(gdef)).lower(state, ids_j).compile().as_text()
        self.model.train()
        gdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        target_j = jax.device_put(target, self.device)
        return jax.jit(_flax_train_fn(gdef)).lower(params, rest, ids_j, target_j).compile().as_text()

    def runner(self, mode: str, ids: np.ndarray, target: np.ndarray) -> Runner:
        """One "forward" (eval mode) or "train" step on ids (B, L) and target (B, L, D)."""
        step = self._runner(mode, ids, target)
        if self.mesh is None:
            return step
        mesh = self.mesh

        def on_mesh() -> None:  # the mesh is set while tracing, so activation constraints apply
            with self.jax.set_mesh(mesh):
                step()

        return on_mesh

    def _runner(self, mode: str, ids: np.ndarray, target: np.ndarray) -> Runner:
        jax, nnx = self.jax, self.nnx
        if self.mesh is None:
            ids_j = jax.device_put(ids, self.device)
            target_j = jax.device_put(target, self.device)
        else:
            from flax_impl.distributed import shard_batch

            ids_j, target_j = shard_batch(ids, self.mesh), shard_batch(target, self.mesh)
        if mode == "forward":
            self.model.eval()
            if self.flax_jit == "nnx":
                fn = self._fns.setdefault("nnx_forward", nnx.jit(lambda m, x: m(x)))
                return lambda: fn(self.model, ids_j).block_until_ready()
            gdef, state = nnx.split(self.model)
            fn = self._fns.setdefault("forward", jax.jit(_flax_forward_fn(gdef)))
            return lambda: fn(state, ids_j).block_until_ready()
        self.model.train()
        if self.flax_jit == "nnx":
            fn = self._fns.setdefault("nnx_train", nnx.jit(_nnx_train_step))
            return lambda: fn(self.model, ids_j, target_j).block_until_ready()
        gdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        holder = [jax.tree.map(lambda a: a.copy(), params), jax.tree.map(lambda a: a.copy(), rest)]  # donated
        fn = self._fns.setdefault("train", jax.jit(_flax_train_fn(gdef), donate_argnums=(0, 1)))

        def step() -> None:
            holder[0], holder[1], loss = fn(holder[0], holder[1], ids_j, target_j)
            loss.block_until_ready()

        return step


def flax_compile_seconds(
    config: TransformerConfig, flax_config: FlaxConfig, n_layers: int, mode: str, batch: int, length: int, rng_impl: str
) -> float:
    """Trace + lower + compile time of the Flax forward or train step for an encoder of `n_layers` with
    `flax_config`'s layer handling (`scan_unroll` capped at `n_layers`; abstract weights from nnx.eval_shape:
    nothing is allocated or run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl.transformer import Transformer

    cfg = config.replace(n_layers=n_layers)
    fcfg = flax_config.replace(scan_unroll=min(flax_config.scan_unroll, n_layers))
    model = nnx.eval_shape(
        lambda: Transformer(
            cfg, flax_config=fcfg, rngs=nnx.Rngs(params=0, dropout=jax.random.key(0, impl=rng_impl))
        )
    )
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    start = time.perf_counter()
    if mode == "forward":
        model.eval()
        gdef, state = nnx.split(model)
        jax.jit(_flax_forward_fn(gdef)).lower(state, ids).compile()
    else:
        model.train()
        gdef, params, rest = nnx.split(model, nnx.Param, ...)
        target = jax.ShapeDtypeStruct((batch, length, cfg.d_model), jnp.float32)
        jax.jit(_flax_train_fn(gdef), donate_argnums=(0, 1)).lower(params, rest, ids, target).compile()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- torch side
class TorchSide:
    """torch_ref's encoder with the Flax weights copied in, and its peers (`bench_peers`) holding the same weights.

    Args:
        config: the encoder.
        flax_model: the Flax side's model whose weights are copied in, or None (torch's own init).
        device: "cpu" or "cuda".
        seed: torch.manual_seed before building.
        peers: names from `bench_peers.PEERS`.
        precision: "fp32", or "bf16" for bfloat16 autocast.
    """

    def __init__(
        self,
        config: TransformerConfig,
        flax_model: Any,
        *,
        device: str,
        seed: int,
        peers: tuple[str, ...] = ("torch_ref",),
        precision: str = "fp32",
    ):
        import torch

        import torch_ref
        from flax_impl.apps.bench_peers import build_peers

        self.torch, self.device = torch, device
        torch.manual_seed(seed)
        self.twin = torch_ref.Transformer(config)
        if flax_model is not None:  # same weights as the Flax side
            from flax_impl.interop import to_numpy_state_dict

            self.twin.load_state_dict(torch_ref.from_numpy_state_dict(to_numpy_state_dict(flax_model)))
        self.models = build_peers(self.twin, list(peers), device)
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        bf16 = precision == "bf16"
        self.autocast = (lambda: torch.autocast(dev_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def runner(self, name: str, mode: str, ids: np.ndarray, target: np.ndarray) -> Runner:
        """Peer `name`'s "forward" (eval mode, under torch.inference_mode) or "train" step on ids (B, L) and
        target (B, L, D)."""
        torch = self.torch
        model = self.models[name]
        trainable = self.twin if name == "torch.compile" else model  # torch.compile shares the twin's weights
        ids_t = torch.from_numpy(ids).to(self.device)
        target_t = torch.from_numpy(target).to(self.device)
        if mode == "forward":
            trainable.eval()

            def forward() -> None:
                with torch.inference_mode(), self.autocast():
                    model(ids_t)
                self.sync()

            return forward
        trainable.train()
        opt = torch.optim.SGD(trainable.parameters(), lr=LR)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            with self.autocast():
                h = model(ids_t)  # (B, L, D)
            loss = (h.float() - target_t).square().mean()
            loss.backward()
            opt.step()
            self.sync()

        return train_step
