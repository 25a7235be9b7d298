"""What `flax-impl bench` runs and pins, torch aside (`peers`): the Flax encoder's jitted forward and train step,
their compile time at any depth, the float32 matmul precision on both sides, the attention kernel that ran, the
device's nominal peak (MFU on GPU/TPU), and which PyTorch peers can hold an architecture.

The train step is the same on every side: a mean-squared loss of the hidden states against a fixed random target,
then plain SGD with learning rate `LR`, dropout on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from flax_impl.config import FlaxConfig, TransformerConfig

LR = 1e-4
EAGER_PEERS = ("torch_ref", "torch.nn", "torch_ref+sdpa")
PEERS = (*EAGER_PEERS, "torch.compile")
# Dense peak FLOP/s per compute kind from the vendors' datasheets, by a substring of the device name; the first
# match wins, so more specific names come first. "float32" is the non-tensor-core rate.
DEVICE_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"float32": 51.2e12, "tensorfloat32": 378e12, "bfloat16": 756e12}),
    ("H200", {"float32": 66.9e12, "tensorfloat32": 494.7e12, "bfloat16": 989.4e12}),
    ("H100", {"float32": 66.9e12, "tensorfloat32": 494.7e12, "bfloat16": 989.4e12}),
    ("A100", {"float32": 19.5e12, "tensorfloat32": 156e12, "bfloat16": 312e12}),
    ("L4", {"float32": 30.3e12, "tensorfloat32": 60e12, "bfloat16": 121e12}),
    ("TPU v6", {"bfloat16": 918e12}), ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5", {"bfloat16": 197e12}),  # v5e ("TPU v5 lite")
    ("TPU v4", {"bfloat16": 275e12}),
)


def device_peak(device_name: str, compute: str) -> float | None:
    """Nominal peak FLOP/s of `device_name` for `compute` ("float32", "tensorfloat32", "bfloat16"); None where
    the device or that kind is not in `DEVICE_PEAKS` (a CPU: the bench measures its matmul peak instead)."""
    return next((peaks.get(compute) for key, peaks in DEVICE_PEAKS if key.lower() in device_name.lower()), None)


def unsupported(peer: str, config: TransformerConfig) -> str | None:
    """Why PyTorch peer `peer` cannot hold this architecture, or None when it can."""
    c = config
    reasons = {"torch.nn": [(c.position in ("rope", "alibi"), f"position={c.position} acts inside attention"),
                            (c.n_kv_heads != c.n_heads, "grouped-query attention"),
                            (c.norm != "layernorm", f"norm={c.norm}"), (c.mlp != "plain", f"mlp={c.mlp}"),
                            (c.activation not in ("gelu", "relu"), f"activation={c.activation}"),
                            (c.parallel_residual, "parallel_residual"),
                            (c.causal or c.sliding_window is not None, "causal / sliding-window masks"),
                            (not (c.qkv_bias and c.out_bias and c.mlp_bias and c.norm_bias), "a bias switched off")],
               "torch_ref+sdpa": [(c.sliding_window is not None, "sliding_window")]}.get(peer, [])
    return "; ".join(why for bad, why in reasons if bad) or None


@contextlib.contextmanager
def pin_matmul_precision(precision: str, with_torch: bool) -> Iterator[dict[str, str]]:
    """Within the block float32 matmuls run at `precision` ("float32" or "tensorfloat32") on both sides (JAX's
    GPU default is TF32, torch's CUDA matmul default is not); yields what was set; torch's settings restored."""
    import jax

    if precision not in ("float32", "tensorfloat32"):
        raise ValueError(f"--matmul-precision {precision!r}: choose from float32, tensorfloat32")
    stated, restore, tf32 = {"jax": f"jax.default_matmul_precision({precision!r})"}, None, precision != "float32"
    if with_torch:
        import torch

        restore = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        stated["torch"] = f"torch.set_float32_matmul_precision({'high' if tf32 else 'highest'!r}), " \
                          f"cudnn.allow_tf32={tf32}"
    try:
        with jax.default_matmul_precision(precision):
            yield stated
    finally:
        if restore is not None:
            torch.set_float32_matmul_precision(restore[0])
            torch.backends.cudnn.allow_tf32 = restore[1]


def flax_attention(model: Any, compiled_text: str | None) -> str:
    """The attention kernel the model runs in its current mode (`FlaxConfig.attention_impl`'s choice); with the
    compiled program's text (GPU), whether XLA lowered `jax.nn.dot_product_attention` to cuDNN's fused kernel."""
    from flax import nnx

    from flax_impl.attention import MultiHeadAttention

    attn = next((m for _, m in nnx.iter_graph(model) if isinstance(m, MultiHeadAttention)), None)
    if attn is None:
        return "none"
    if not attn._use_dot_product_attention():
        dropout_on = not attn.dropout.deterministic and attn.dropout.rate > 0
        return "einsum (flax_impl._kernels.attention.chunked_attention)" + (
            "; auto: attention dropout is on, which jax.nn.dot_product_attention lacks"
            if attn.flax_config.attention_impl == "auto" and dropout_on else "")
    if compiled_text is None:
        return "jax.nn.dot_product_attention (lowering not inspected)"
    fused = "cudnn$fmha" in compiled_text
    return "jax.nn.dot_product_attention: " + ("cuDNN fused attention" if fused else "XLA (not cuDNN)")


def _program(model: Any, mode: str, ids: Any, target: Any, flax_jit: str = "split") -> tuple[Callable, tuple]:
    """(jitted step, its arguments), the model put in `mode`. "forward": the hidden states; "train": MSE + SGD,
    with "split" `(params, rest, ids, target) -> (params, rest, loss)`, weights donated; "nnx": graph-mode
    `nnx.jit`, which updates the model and also returns its whole state on every call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def train_step(m: Any, ids: Any, target: Any) -> Any:
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(ids).astype(jnp.float32) - target)))(m)
        params = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree.map(lambda p, g: p - jnp.asarray(LR, p.dtype) * g.astype(p.dtype), params, grads))
        return loss

    if mode == "train":
        model.train()
    else:
        model.eval()
    if flax_jit == "nnx":
        return (nnx.jit(train_step), (model, ids, target)) if mode == "train" else (nnx.jit(lambda m, x: m(x)),
                                                                                    (model, ids))
    if mode == "forward":
        gdef, state = nnx.split(model)
        return jax.jit(lambda state, ids: nnx.merge(gdef, state)(ids)), (state, ids)  # (B, L, D)
    gdef, params, rest = nnx.split(model, nnx.Param, ...)

    def split_step(params: Any, rest: Any, ids: Any, target: Any) -> tuple[Any, Any, Any]:
        m = nnx.merge(gdef, params, rest)
        loss = train_step(m, ids, target)
        return (*nnx.split(m, nnx.Param, ...)[1:], loss)  # updated weights and dropout counters

    return jax.jit(split_step, donate_argnums=(0, 1)), (params, rest, ids, target)


class FlaxSide:
    """The Flax encoder (`jax.random.key(seed, impl=rng_impl)` drives its dropout: no global JAX change), on
    `device` or sharded on a (data, model) `mesh`; `runner` hands out argument-less calls of one step."""

    def __init__(self, config: TransformerConfig, flax_config: FlaxConfig, *, device: Any, seed: int,
                 rng_impl: str, flax_jit: str = "split", mesh: Any = None):
        import jax
        from flax import nnx

        from flax_impl.distributed import create_sharded_model
        from flax_impl.transformer import Transformer

        self.device, self.flax_jit, self.mesh = device, flax_jit, mesh
        rngs = nnx.Rngs(params=seed, dropout=jax.random.key(seed, impl=rng_impl))
        self.model = Transformer(config, flax_config=flax_config, rngs=rngs) if mesh is None else \
            create_sharded_model(config, mesh, flax_config=flax_config, rngs=rngs)

    def _put(self, *arrays: Any) -> list[Any]:
        import jax

        from flax_impl.distributed import shard_batch

        return [jax.device_put(x, self.device) if self.mesh is None else shard_batch(x, self.mesh) for x in arrays]

    def compiled_text(self, mode: str, ids: Any, target: Any) -> str:
        """The compiled "forward" or "train" program (`jax.jit` over split state) as text: the kernels XLA chose."""
        fn, args = _program(self.model, mode, *self._put(ids, target))
        return fn.lower(*args).compile().as_text()

    def runner(self, mode: str, ids: Any, target: Any) -> Callable[[], None]:
        """One "forward" (eval mode) or "train" step on ids (B, L) and target (B, L, D), waited for."""
        import jax

        fn, args = _program(self.model, mode, *self._put(ids, target), self.flax_jit)
        donated, held = mode == "train" and self.flax_jit == "split", list(args)
        if donated:  # copies: the step consumes its weights and returns the updated ones
            held[:2] = [jax.tree.map(lambda a: a.copy(), x) for x in args[:2]]

        def step() -> None:
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                out = fn(*held)
            if donated:
                held[0], held[1], out = out
            jax.block_until_ready(out)

        return step


def compile_seconds(config: TransformerConfig, flax_config: FlaxConfig, n_layers: int, mode: str, batch: int,
                    length: int, rng_impl: str) -> float:
    """Trace + lower + compile time of the split-state step of an encoder of `n_layers` (`scan_unroll` capped at
    it), abstract weights from `nnx.eval_shape`: nothing is allocated or run."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl.transformer import Transformer

    cfg = config.replace(n_layers=n_layers)
    fcfg = flax_config.replace(scan_unroll=min(flax_config.scan_unroll, n_layers))
    model = nnx.eval_shape(lambda: Transformer(cfg, flax_config=fcfg, rngs=nnx.Rngs(
        params=0, dropout=jax.random.key(0, impl=rng_impl))))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    start = time.perf_counter()
    fn, args = _program(model, mode, ids, jax.ShapeDtypeStruct((batch, length, cfg.d_model), jnp.float32))
    fn.lower(*args).compile()
    return time.perf_counter() - start
