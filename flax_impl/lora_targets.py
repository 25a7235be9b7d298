"""Which columns of which Linear a LoRA target names: our module names, or a Hugging Face family's, read from the
family tables of `flax_impl.hf` (key templates and layouts), never written per family.

A *site* is one Linear inside a block (`attn.in_proj`, `attn.out_proj`, `ff.gate`, `ff.0`, ...); each of its
*parts* is one module of the checkpoint's model, which covers the output columns [start, stop) of our Linear.
Llama's `q_proj`, `k_proj` and `v_proj` are three parts of our packed `attn.in_proj` (columns [q | k | v]): a
LoRA on `q_proj` is a LoRA on the q columns only. GPT-2's `c_attn` and MPT's `Wqkv` are one part covering all of
in_proj. BLOOM's `query_key_value` is one part whose rows are ours permuted per head: `order` holds the
permutation, applied to LoRA B's rows on save and load (A, which acts on the input, never moves). GPT-2's Conv1D
stores its weight transposed, but peft's `lora_A` / `lora_B` are nn.Linear whatever the base layer, so a layout
that only transposes ("conv1d") moves no LoRA row.

Targets are matched as peft matches `target_modules` (peft.tuners.tuners_utils.check_target_module_exists): a
list entry matches a module whose full name equals it or ends with "." + entry; a single string other than
"all-linear" is a regular expression matched against the whole name; "all-linear" takes every site. A LoRA here
adapts every layer alike (one stacked adapter under `nnx.scan`), so a target that picks some layers only is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flax import nnx

from flax_impl.hf.convert import config_to_hf, dims, family, hf_values, layout_of
from flax_impl.hf.layouts import LAYOUTS

ALL_LINEAR = "all-linear"
# Layouts that only transpose the base weight store peft's nn.Linear adapters unchanged.
_LORA_LAYOUT = {"conv1d": "identity"}


@dataclass(frozen=True)
class Part:
    """One adapter of a site.

    Attributes:
        key: its entry in `LoraLinear.lora` ("q_proj", "c_attn", "in_proj").
        module: the full module name it answers to, `{i}` for the layer ("model.layers.{i}.self_attn.q_proj").
        start, stop: the output columns of our Linear it covers.
        order: row k of the checkpoint's LoRA B is our column start + order[k]; None: in order.
    """

    key: str
    module: str
    start: int
    stop: int
    order: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Site:
    """A Linear inside every block: `path` from the block ("attn", "in_proj"), its kernel (d_in, d_out), parts."""

    path: tuple[str | int, ...]
    d_in: int
    d_out: int
    parts: tuple[Part, ...]


def block_linears(model: nnx.Module) -> list[tuple[tuple[str | int, ...], int, int]]:
    """(path inside a block, d_in, d_out) of every nnx.Linear of a Transformer's first (or stacked) block."""
    block = model.blocks if model.flax_config.scan_layers else model.blocks[0]
    out = []
    for path, node in nnx.iter_graph(block):
        if isinstance(node, nnx.Linear):
            shape = node.kernel.get_value().shape  # (in, out), or (n_layers, in, out)
            out.append((tuple(path), int(shape[-2]), int(shape[-1])))
    return out


def _our_weight_key(path: tuple[str | int, ...]) -> str:
    """The torch_ref state-dict template of a site's weight (interop's names: the packed `in_proj_weight`)."""
    name = ".".join(map(str, path))
    return f"blocks.{{i}}.{name}_weight" if path[-1] == "in_proj" else f"blocks.{{i}}.{name}.weight"


def all_sites(model: nnx.Module, model_type: str | None) -> list[Site]:
    """Every site of a Transformer with all its parts, in our names (model_type None) or the family's.

    Raises:
        ValueError: an unsupported model_type; a site the family's table has no key for, or whose layout does not
            map each checkpoint row to one of our columns.
    """
    linears = block_linears(model)
    if model_type is None:
        return [
            Site(path, d_in, d_out, (Part(str(path[-1]), "blocks.{i}." + ".".join(map(str, path)), 0, d_out),))
            for path, d_in, d_out in linears
        ]
    fam = family(model_type)
    values = hf_values(fam, config_to_hf(fam, model.config))  # what Key.when and the layouts read
    d = dims(model.config, values)
    keys = [k for k in fam.keys if k.when is None or k.when(values)]
    sites = []
    for path, d_in, d_out in linears:
        ours = _our_weight_key(path)
        key = next((k for k in keys if ours in [t.replace("{p}", "weight") for t in k.ours_templates]), None)
        if key is None:
            raise ValueError(f"model_type={model_type!r} has no checkpoint key for our {ours}")
        if len(key.ours_templates) > 1:  # Phi-3's gate_up_proj: one checkpoint module over two of our Linears
            module = key.hf.replace("{p}", "weight").removesuffix(".weight")
            raise ValueError(
                f"LoRA on model_type={model_type!r} is not supported: its {module} stores several of our Linears "
                f"{list(key.ours_templates)} as one module"
            )
        name = key.layout if isinstance(key.layout, str) else None
        layout = LAYOUTS[_LORA_LAYOUT[name]] if name in _LORA_LAYOUT else layout_of(key)
        probe = layout.to_hf([np.arange(d_out)[:, None]], d)  # each checkpoint part's rows, as our column numbers
        weight = key.hf.replace("{p}", "weight")
        names = [weight.replace("{part}", p) for p in key.parts] or [weight]
        parts = []
        for name, rows in zip(names, probe, strict=True):
            module = fam.save_prefix + name.removesuffix(".weight")
            cols = np.asarray(rows)[:, 0] if np.ndim(rows) == 2 and np.shape(rows)[1] == 1 else None
            if cols is None or not np.array_equal(np.sort(cols), np.arange(cols.min(), cols.max() + 1)):
                raise ValueError(f"layout {key.layout!r} of {module} does not map its rows onto a span of our columns")
            start = int(cols.min())
            order = None if np.array_equal(cols, np.sort(cols)) else tuple(int(c) - start for c in cols)
            parts.append(Part(module.rsplit(".", 1)[-1], module, start, int(cols.max()) + 1, order))
        sites.append(Site(path, d_in, d_out, tuple(parts)))
    return sites


def _matches(target: str | Sequence[str], name: str) -> bool:
    if isinstance(target, str):
        return target == ALL_LINEAR or re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def select(sites: list[Site], targets: str | Sequence[str], n_layers: int) -> list[Site]:
    """The sites and parts that `targets` names (peft's rules, module docstring), every layer alike.

    Raises:
        ValueError: an entry of a list that names no part (listing the names there are), or a target that names a
            part in some layers only.
    """
    chosen, unused = [], set() if isinstance(targets, str) else set(targets)
    for site in sites:
        parts = []
        for part in site.parts:
            names = [part.module.format(i=i) for i in range(n_layers)]
            hits = [_matches(targets, n) for n in names]
            if any(hits) and not all(hits):
                layers = [i for i, h in enumerate(hits) if h]
                raise ValueError(
                    f"targets={targets!r} name {part.module} in layers {layers} only: a LoRA here adapts every layer"
                )
            if all(hits):
                parts.append(part)
                if not isinstance(targets, str):
                    unused -= {t for t in targets if _matches([t], names[0])}
        if parts:
            chosen.append(Site(site.path, site.d_in, site.d_out, tuple(parts)))
    available = sorted({p.module.rsplit(".", 1)[-1] for s in sites for p in s.parts})
    if unused or not chosen:
        missing = sorted(unused) if unused else targets
        raise ValueError(
            f"targets {missing!r} name no projection of this model (LoRA adapts the blocks' Linear layers: the "
            f"embeddings, norms and LM head are not targets); its projections are {available}"
        )
    return chosen
