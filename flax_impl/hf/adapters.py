"""PEFT LoRA adapter folders both ways (adapter_config.json + adapter_model.safetensors), as peft's
`PeftModel.save_pretrained` writes them and `PeftModel.from_pretrained(transformers_model, folder)` reads them.

Keys are peft's: "base_model.model." + the transformers model's module name + ".lora_A.weight" / ".lora_B.weight",
e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (r, D_in) and `...lora_B.weight` (D_out, r),
the module names taken from the family tables (`flax_impl.lora_targets`). Ours are A = lora_A.T (D_in, r) and
B = lora_B.T with B's columns in our order (BLOOM's per-head rows permuted, the only layout that moves them). Both
ways copy and permute only: a saved adapter read back is bit-exact.

Nothing imports peft or torch here; the tests load our folders with peft and peft's folders with this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_impl.hf.convert import config_to_hf, family
from flax_impl.hf.io import read_headers, read_tensor
from flax_impl.lora import LoraConfig, LoraLinear, apply_lora, lora_config, lora_layers, target_sites
from flax_impl.lora_targets import ALL_LINEAR, Part, Site
from flax_impl.transformer import Transformer
from flax_impl.validation import ArgumentTypeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's own prefix before the transformers model's module names

# adapter_config.json options we refuse unless they hold peft's default ("what it does" for the message).
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA's magnitude vectors are not implemented"),
    "lora_bias": (False, "a bias on lora_B is not implemented"),
    "bias": ("none", "training the base layers' biases is not part of a LoRA here"),
    "modules_to_save": (None, "fully trained extra modules are not part of a LoRA here"),
    "rank_pattern": ({}, "a rank per module is not implemented"),
    "alpha_pattern": ({}, "an alpha per module is not implemented"),
    "layers_to_transform": (None, "a LoRA here adapts every layer"),
    "layers_pattern": (None, "a LoRA here adapts every layer"),
    "exclude_modules": (None, "excluded modules are not implemented"),
    "target_parameters": (None, "LoRA on bare parameters is not implemented"),
    "trainable_token_indices": (None, "trainable tokens are not implemented"),
    "layer_replication": (None, "replicated layers are not implemented"),
    "use_qalora": (False, "QA-LoRA is not implemented"),
    "alora_invocation_tokens": (None, "activated LoRA is not implemented"),
}


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == [] or value is False


def config_from_peft(peft: Mapping[str, Any], model_type: str) -> LoraConfig:
    """An adapter_config.json dict -> our LoraConfig for family `model_type`.

    Raises:
        ValueError: not a LORA adapter, or one message naming every option set that we do not implement.
    """
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"peft_type={peft.get('peft_type')!r}: only LORA adapters are read")
    problems = [
        f"{key}={peft[key]!r}: {why}"
        for key, (default, why) in _REFUSED.items()
        if key in peft and peft[key] != default and not (_empty(default) and _empty(peft[key]))
    ]
    if problems:
        raise ValueError("adapter_config.json sets options flax_impl does not implement:\n  " + "\n  ".join(problems))
    targets = peft.get("target_modules")
    targets = targets if isinstance(targets, str) else tuple(sorted(targets or ()))
    return LoraConfig(
        r=peft.get("r", 8),
        alpha=peft.get("lora_alpha", 8),
        dropout=float(peft.get("lora_dropout", 0.0)),
        targets=targets,
        model_type=model_type,
        use_rslora=bool(peft.get("use_rslora", False)),
    )


def config_to_peft(config: LoraConfig, model: Transformer, sites: list[Site]) -> dict[str, Any]:
    """Our LoraConfig -> adapter_config.json (peft's field names; peft fills the fields not written)."""
    fam = family(config.model_type)
    targets = config.targets
    if targets == ALL_LINEAR:  # peft's all-linear would also take modules we do not model: name ours
        targets = sorted({p.module.rsplit(".", 1)[-1] for s in sites for p in s.parts})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if model.config.causal else None,
        "base_model_name_or_path": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "use_rslora": config.use_rslora,
        "bias": "none",
        "fan_in_fan_out": any(k.layout == "conv1d" for k in fam.keys),  # GPT-2's Conv1D (peft sets it itself too)
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
    }


def _layers(model: Transformer, site: Site) -> list[tuple[int | None, LoraLinear]]:
    """(layer or None when stacked, the LoraLinear) of `site` in every block."""
    blocks = [(None, model.blocks)] if model.flax_config.scan_layers else list(enumerate(model.blocks))
    out = []
    for n, block in blocks:
        node = block
        for name in site.path:
            node = node[name] if isinstance(node, nnx.List) else getattr(node, name)
        out.append((n, node))
    return out


def _keys(part: Part, i: int) -> tuple[str, str]:
    module = PREFIX + part.module.format(i=i)
    return module + ".lora_A.weight", module + ".lora_B.weight"


def peft_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The model's adapters as peft's tensors, keyed as adapter_model.safetensors keys them (module docstring).

    Raises:
        ValueError: no adapter; adapters named in our module names (LoraConfig.model_type None).
    """
    config = lora_config(model)
    if config is None:
        raise ValueError("the model carries no LoRA adapter")
    if config.model_type is None:
        raise ValueError("the adapters were named in our module names (model_type=None): PEFT keys need a family")
    out = {}
    for site in target_sites(model, config):
        for n, layer in _layers(model, site):
            for part in site.parts:
                a = np.asarray(layer.lora[part.key].a[...])  # (D_in, r) or (n_layers, D_in, r)
                b = np.asarray(layer.lora[part.key].b[...])  # (r, D_out)
                for i in range(model.config.n_layers) if n is None else [n]:
                    A, B = (a[i], b[i]) if n is None else (a, b)
                    B = B.T if part.order is None else B.T[list(part.order)]  # (D_out, r), checkpoint row order
                    key_a, key_b = _keys(part, i)
                    out[key_a], out[key_b] = np.ascontiguousarray(A.T), np.ascontiguousarray(B)
    return out


def save_peft_adapter(model: Transformer, folder: str | os.PathLike) -> None:
    """Write the model's adapters as a PEFT folder that `peft.PeftModel.from_pretrained(transformers_model, folder)`
    loads onto the family's transformers model (unmerged adapters; a merged model's are written as they are).

    Raises:
        TypeError: `model` is not a Transformer.
        ValueError: before anything is written: no adapter, our names (model_type None), or a config the family
            cannot hold.
    """
    from safetensors.numpy import save_file

    if not isinstance(model, Transformer):
        raise ArgumentTypeError(f"model must be a Transformer, got {type(model).__name__}")
    tensors = peft_state_dict(model)
    config = lora_config(model)
    config_to_hf(family(config.model_type), model.config)  # refuses a config the family cannot hold
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(folder / ADAPTER_CONFIG, "w", encoding="utf-8") as f:
        json.dump(config_to_peft(config, model, target_sites(model, config)), f, indent=2, sort_keys=True)
        f.write("\n")


def load_peft_adapter(
    model: Transformer, folder: str | os.PathLike, *, model_type: str, rngs: nnx.Rngs | None = None
) -> LoraConfig:
    """Adapt `model` (without adapters) as a PEFT folder says and load its weights, in place.

    Args:
        model: a Transformer of family `model_type` without adapters.
        folder: holds adapter_config.json and adapter_model.safetensors.
        model_type: the family whose module names the adapter uses.
        rngs: seeds the adapters' dropout streams (training on); None: nnx.Rngs(0).
    Returns:
        The LoraConfig read.
    Raises:
        FileNotFoundError: a file is missing.
        ValueError: before the model changes: an option we do not implement; one message listing every missing,
            unexpected and misshaped key; a model with adapters already.
    """
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {str(folder)!r}")
    with open(folder / ADAPTER_CONFIG, encoding="utf-8") as f:
        config = config_from_peft(json.load(f), model_type)
    if lora_layers(model):
        raise ValueError("the model carries LoRA adapters already")
    sites = target_sites(model, config)
    header = read_headers([folder / ADAPTER_WEIGHTS])
    expected = {}
    for site in sites:
        for part in site.parts:
            for i in range(model.config.n_layers):
                key_a, key_b = _keys(part, i)
                expected[key_a], expected[key_b] = (config.r, site.d_in), (part.stop - part.start, config.r)
    _check(expected, {k: v[0] for k, v in header.items()})
    apply_lora(model, config, rngs=nnx.Rngs(0) if rngs is None else rngs)
    for site in sites:
        for n, layer in _layers(model, site):
            for part in site.parts:
                A, B = [], []
                for i in range(model.config.n_layers) if n is None else [n]:
                    key_a, key_b = _keys(part, i)
                    A.append(read_tensor(folder / ADAPTER_WEIGHTS, key_a).T)  # (D_in, r)
                    rows = read_tensor(folder / ADAPTER_WEIGHTS, key_b)  # (D_out, r), checkpoint row order
                    if part.order is not None:
                        rows = rows[np.argsort(part.order)]
                    B.append(rows.T)  # (r, D_out)
                adapter = layer.lora[part.key]
                adapter.a[...] = jnp.asarray(np.stack(A) if n is None else A[0], jnp.float32)
                adapter.b[...] = jnp.asarray(np.stack(B) if n is None else B[0], jnp.float32)
    return config


def _check(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: adapter {tuple(found[k])} vs expected {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or misshaped:
        lines = ["the adapter does not match its adapter_config.json and this model:"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {m}" for m in misshaped]
        raise ValueError("\n".join(lines))
