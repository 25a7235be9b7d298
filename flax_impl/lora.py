"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for Transformers, as peft computes it.

A targeted Linear (D_in -> D_out) becomes a `LoraLinear`: the same kernel and bias (frozen by the optimizer's
filter), plus for each targeted part (a span [start, stop) of its output columns, `flax_impl.lora_targets`) an
adapter A (D_in, r), B (r, stop - start) adding

    y[..., start:stop] += (dropout(x) @ A) @ B * s,    s = alpha / r   (rsLoRA, `use_rslora`: alpha / sqrt(r))

which is peft's `lora_B(lora_A(dropout(x))) * scaling` with A = lora_A.weight.T, B = lora_B.weight.T. Each part has
its own dropout (peft's one per adapted module), in float32 like peft's adapters (the input is cast to float32,
the sum back to the compute dtype). A starts kaiming-uniform as peft's (U(-1/sqrt(D_in), 1/sqrt(D_in)), torch's
kaiming_uniform_(a=sqrt(5))), B at zero, so a fresh adapter changes nothing. The adapters are `nnx.LoRAParam`s, a
subclass of nnx.Param: `make_lora_optimizer` (or `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`) holds state for them
only, and `flax_impl.train.train_step` then differentiates them only. With scanned layers each adapter is stacked
on the layer axis like the kernel it adapts; the KV cache and `generate` see an ordinary Linear.

`merge_lora` adds s A B into the kernel (one float32 rounding per element: the merged forward equals the adapted
one to roundoff, not bit for bit) and the forward then skips the adapters; `unmerge_lora` subtracts the same
product (the kernel comes back within one rounding of the sum, |error| <= ulp(|W| + |s A B|)). `merged_model`
gives a plain Transformer with the adapters folded in, for `flax_impl.hf.save_pretrained`. PEFT adapter folders:
`flax_impl.hf.peft`.

Example:
    >>> cfg = LoraConfig(r=8, alpha=16, targets=("q_proj", "v_proj"), model_type="llama")
    >>> apply_lora(model, cfg, rngs=nnx.Rngs(0))                 # model: a llama-family Transformer
    >>> optimizer = make_lora_optimizer(model, tcfg)              # AdamW state for the adapters only
    >>> train_step(model, optimizer, batch)
    >>> save_pretrained(merged_model(model), "out/", model_type="llama")
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flax_impl.config import TrainConfig
from flax_impl.dropout import Dropout
from flax_impl.lora_targets import ALL_LINEAR, Site, all_sites, select
from flax_impl.sharding import REPLICATED_MATRIX, param_metadata
from flax_impl.train import default_decay, make_tx
from flax_impl.transformer import Transformer
from flax_impl.validation import ArgumentTypeError

LoraParam = nnx.LoRAParam  # the filter of the trainable adapters: nnx.Optimizer(model, tx, wrt=LoraParam)
_LAYER_AXIS = {nnx.PARTITION_NAME: None}  # as the stacked blocks: the layer axis is never sharded


@dataclass(frozen=True)
class LoraConfig:
    """What `apply_lora` adds (the fields of peft's LoraConfig it reads).

    Attributes:
        r: the rank, >= 1 (peft's `r`).
        alpha: the scale numerator, > 0 (peft's `lora_alpha`).
        dropout: the dropout rate on each adapter's input, in [0, 1) (peft's `lora_dropout`).
        targets: peft's `target_modules`: module names (a module matches a name it equals or ends with after a
            "."), one regular expression matched against whole names, or "all-linear" (every Linear of the blocks).
            Names are the family's (`q_proj`, `c_attn`, ...) with `model_type`, else ours (`in_proj`, `out_proj`,
            `gate`, `up`, `down`, `ff.0`, `ff.3`).
        model_type: the Hugging Face family whose names `targets` uses and whose keys a PEFT adapter gets; None:
            our names (no PEFT export then).
        use_rslora: scale by alpha / sqrt(r) (Kalajdzievski, 2023) instead of alpha / r.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR
    model_type: str | None = None
    use_rslora: bool = False

    def __post_init__(self):
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be an int >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be a number > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be a number in [0, 1)")
        names = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(names, tuple) or not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(f"targets={self.targets!r} must be a non-empty string or tuple of non-empty strings")
        if self.model_type is not None and not isinstance(self.model_type, str):
            raise ArgumentTypeError(f"model_type={self.model_type!r} must be a string or None")
        if not isinstance(self.use_rslora, bool):
            raise ArgumentTypeError(f"use_rslora={self.use_rslora!r} must be a bool")

    @property
    def scaling(self) -> float:
        """s: alpha / r, or alpha / sqrt(r) with use_rslora (peft's `scaling`)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraPart(nnx.Module):
    """One adapter: x (..., D_in) -> (dropout(x) @ a) @ b * scaling (..., D_out), float32.

    Args:
        d_in, d_out: the span's input and output widths.
        config: r, dropout, scaling.
        deterministic: the dropout's initial mode (the model's).
        rngs: `params` draws a, `dropout` seeds the dropout stream.
    """

    def __init__(self, d_in: int, d_out: int, config: LoraConfig, *, deterministic: bool, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(d_in)  # torch's kaiming_uniform_(a=sqrt(5)) on lora_A.weight (r, D_in)
        a = jax.random.uniform(rngs.params(), (d_in, config.r), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a, **param_metadata(REPLICATED_MATRIX))  # (D_in, r)
        self.b = nnx.LoRAParam(jnp.zeros((config.r, d_out), jnp.float32), **param_metadata(REPLICATED_MATRIX))
        self.dropout = Dropout(float(config.dropout), deterministic=deterministic, rngs=rngs)
        self.scaling = config.scaling

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dropout(x.astype(self.a.get_value().dtype))  # (..., D_in)
        return (h @ self.a[...]) @ self.b[...] * self.scaling  # (..., r) -> (..., D_out)

    def delta(self) -> jax.Array:
        """s A B: (D_in, D_out), or (n_layers, D_in, D_out) stacked: what merging adds to the kernel's span."""
        return (self.a[...] @ self.b[...]) * self.scaling


class LoraLinear(nnx.Linear):
    """An nnx.Linear with adapters on spans of its output columns (module docstring): the base layer's own
    kernel and bias (the same Variables, at the same paths), plus `lora` {part key: LoraPart}.

    Args:
        base: the Linear to adapt (its kernel (D_in, D_out), or (n_layers, D_in, D_out) stacked).
        spans: (part key, start, stop) per adapter, disjoint.
        config: the LoraConfig (kept: `save_peft_adapter` reads it).
        layers: n_layers for a stacked kernel (each adapter stacked alike, its own draws per layer), else None.
        deterministic: the adapters' dropout mode.
        rngs: as LoraPart's.
    """

    def __init__(
        self, base: nnx.Linear, spans: tuple[tuple[str, int, int], ...], config: LoraConfig, *,
        layers: int | None, deterministic: bool, rngs: nnx.Rngs,
    ):  # fmt: skip
        for name, value in vars(base).items():  # the base layer as it is: no kernel drawn, none copied
            if not name.startswith("_"):
                setattr(self, name, value)
        d_in = self.kernel.get_value().shape[-2]
        self.lora_config, self.spans, self.merged = config, tuple(spans), False

        def make(width: int) -> LoraPart:
            def one(rngs: nnx.Rngs) -> LoraPart:
                return LoraPart(d_in, width, config, deterministic=deterministic, rngs=rngs)

            if layers is None:
                return one(rngs)
            stacked = nnx.vmap(one, in_axes=(0,), out_axes=0, transform_metadata=_LAYER_AXIS)
            return nnx.split_rngs(splits=layers)(stacked)(rngs)

        self.lora = nnx.Dict({key: make(stop - start) for key, start, stop in self.spans})

    def __call__(self, x: jax.Array, out_sharding: object = None) -> jax.Array:
        """x (..., D_in) -> (..., D_out): the base layer's output plus every adapter's on its span."""
        y = super().__call__(x, out_sharding=out_sharding)
        if self.merged:
            return y
        pieces, at = [], 0
        for key, start, stop in sorted(self.spans, key=lambda s: s[1]):
            if start > at:  # columns no adapter covers (k of q_proj + v_proj)
                pieces.append(jnp.zeros((*y.shape[:-1], start - at), jnp.float32))
            pieces.append(self.lora[key](x))
            at = stop
        if at < y.shape[-1]:
            pieces.append(jnp.zeros((*y.shape[:-1], y.shape[-1] - at), jnp.float32))
        return y + jnp.concatenate(pieces, axis=-1).astype(y.dtype)

    def fold(self, sign: int) -> None:
        """kernel[..., start:stop] += sign * s A B for every adapter (merge: +1, unmerge: -1)."""
        kernel = self.kernel[...]
        for key, start, stop in self.spans:
            kernel = kernel.at[..., start:stop].add((sign * self.lora[key].delta()).astype(kernel.dtype))
        self.kernel[...] = kernel


def lora_layers(model: nnx.Module) -> list[tuple[tuple, LoraLinear]]:
    """(path, LoraLinear) of every adapted layer of `model`."""
    return [(tuple(p), node) for p, node in nnx.iter_graph(model) if isinstance(node, LoraLinear)]


def lora_config(model: nnx.Module) -> LoraConfig | None:
    """The LoraConfig `model` was adapted with, or None when it carries no adapter."""
    configs = {layer.lora_config for _, layer in lora_layers(model)}
    if len(configs) > 1:
        raise ValueError(f"the model carries adapters of {len(configs)} LoraConfigs; one is supported")
    return configs.pop() if configs else None


def target_sites(model: Transformer, config: LoraConfig) -> list[Site]:
    """The sites and parts `config.targets` names in `model` (`flax_impl.lora_targets`).

    Raises:
        ValueError: as `flax_impl.lora_targets.select`, or an unsupported model_type.
    """
    return select(all_sites(model, config.model_type), config.targets, model.config.n_layers)


def _mode(model: nnx.Module) -> bool:
    """The model's dropout mode (its Dropout layers' `deterministic`; train mode if it has none)."""
    return next((node.deterministic for _, node in nnx.iter_graph(model) if isinstance(node, Dropout)), False)


def _child(node: nnx.Module, name: str | int) -> nnx.Module:
    return node[name] if isinstance(node, nnx.List) else getattr(node, name)


def _replace(parent: nnx.Module, name: str | int, new: nnx.Module) -> None:
    if isinstance(parent, nnx.List):
        parent[name] = new
    else:
        setattr(parent, name, new)


def apply_lora(model: Transformer, config: LoraConfig, *, rngs: nnx.Rngs) -> None:
    """Adapt `model` in place: every targeted Linear of every block becomes a LoraLinear (fresh adapters: A
    kaiming-uniform, B zero, so the outputs are unchanged). Under a mesh the adapters are replicated on the
    kernels' mesh.

    Args:
        model: a Transformer without adapters (scanned or not).
        config: the LoraConfig.
        rngs: `params` draws A, `dropout` seeds each adapter's dropout stream.
    Raises:
        TypeError: `model` is not a Transformer, or `config` not a LoraConfig.
        ValueError: the model carries adapters already; a target that names nothing (see `target_sites`).
    """
    if not isinstance(model, Transformer):
        raise ArgumentTypeError(f"model must be a Transformer, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise ArgumentTypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if lora_layers(model):
        raise ValueError("the model carries LoRA adapters already: take merged_model(model) for a plain one")
    sites = target_sites(model, config)
    stacked, deterministic = model.flax_config.scan_layers, _mode(model)
    blocks = [model.blocks] if stacked else list(model.blocks)
    for block in blocks:
        for site in sites:
            parent = block
            for name in site.path[:-1]:
                parent = _child(parent, name)
            base = _child(parent, site.path[-1])
            spans = tuple((p.key, p.start, p.stop) for p in site.parts)
            layers = model.config.n_layers if stacked else None
            new = LoraLinear(base, spans, config, layers=layers, deterministic=deterministic, rngs=rngs)
            sharding = getattr(base.kernel.get_value(), "sharding", None)
            if isinstance(sharding, NamedSharding):  # under a mesh: the adapters replicated on it
                replicated = NamedSharding(sharding.mesh, PartitionSpec())
                nnx.update(new.lora, jax.device_put(nnx.state(new.lora), replicated))
            _replace(parent, site.path[-1], new)


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its kernel, in place (W += s A B); the forward then skips the adapters (for
    inference and export: adapters of a merged model get no gradient).

    Args:
        model: a module carrying LoraLinear layers (already merged ones are left as they are).
    """
    for _, layer in lora_layers(model):
        if not layer.merged:
            layer.fold(+1)
            layer.merged = True


def unmerge_lora(model: nnx.Module) -> None:
    """Undo `merge_lora`, in place (W -= s A B: within one rounding of the kernel before merging).

    Args:
        model: a module carrying LoraLinear layers (unmerged ones are left as they are).
    """
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.fold(-1)
            layer.merged = False


def merged_model(model: Transformer) -> Transformer:
    """A Transformer without adapters computing what `model` computes (the adapters folded into the kernels, one
    rounding each), for `flax_impl.hf.save_pretrained`. `model` is left as it is; the arrays of unadapted
    parameters are shared with it (jax arrays are immutable).

    Raises:
        TypeError: `model` is not a Transformer.
    """
    if not isinstance(model, Transformer):
        raise ArgumentTypeError(f"model must be a Transformer, got {type(model).__name__}")
    copy = nnx.clone(model)  # new Variables over the same arrays: folding below leaves `model` as it is
    for path, layer in lora_layers(copy):
        if not layer.merged:
            layer.fold(+1)
        plain = nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0)))
        for name, value in vars(layer).items():
            if not name.startswith("_") and name not in ("lora", "lora_config", "spans", "merged"):
                setattr(plain, name, value)
        parent = copy
        for name in path[:-1]:
            parent = _child(parent, name)
        _replace(parent, path[-1], plain)
    return copy


def lora_decay(path: tuple[str, ...]) -> bool:
    """Weight decay for the adapters (A and B: peft's trainable parameters, all decayed by torch's AdamW) and, as
    `flax_impl.train.default_decay`, for Linear kernels."""
    return "lora" in path or default_decay(path)


def make_lora_optimizer(model: nnx.Module, tcfg: TrainConfig) -> nnx.Optimizer:
    """nnx.Optimizer over the adapters only (`wrt=nnx.LoRAParam`: no state for the frozen weights) with
    `flax_impl.train.make_tx(tcfg, decay=lora_decay)`: clipping, AdamW, warmup and decay as full training.

    Raises:
        TypeError: `tcfg` is not a TrainConfig.
        ValueError: `model` carries no adapter.
    """
    if not isinstance(tcfg, TrainConfig):
        raise ArgumentTypeError(f"tcfg={tcfg!r:.60} must be a TrainConfig, got {type(tcfg).__name__}")
    if not lora_layers(model):
        raise ValueError("the model carries no LoRA adapter: apply_lora(model, config, rngs=...) first")
    return nnx.Optimizer(model, make_tx(tcfg, decay=lora_decay), wrt=nnx.LoRAParam)
