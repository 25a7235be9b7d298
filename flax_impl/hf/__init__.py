"""Read and write Hugging Face model folders (config.json + safetensors): bert, gpt2, llama, mistral, qwen2,
bloom, mpt. Local folders only; nothing is downloaded, and neither torch nor transformers is imported.

    cfg, model = flax_impl.hf.from_pretrained("path/to/gpt2-folder")      # TransformerConfig, Transformer
    flax_impl.hf.save_pretrained(model, "out/", model_type="gpt2")        # transformers.AutoModel* loads out/

Each family is a declarative table in `flax_impl.hf.families` (config fields with named converters, refused
options, weight-key templates with named layouts); `flax_impl.hf.convert` holds the two engines that read them.
Weights pass through torch_ref's state-dict names (`flax_impl.interop`), the stable interchange format.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from flax_impl.config import FlaxConfig, TransformerConfig
from flax_impl.hf.convert import (
    check_checkpoint,
    config_from_hf,
    config_to_hf,
    family,
    normalize_keys,
    to_hf,
    to_ours,
    weight_plan,
)
from flax_impl.hf.families import FAMILIES
from flax_impl.hf.io import CONFIG, read_config, read_headers, read_tensor, warn_lossy_cast, weight_files, write_folder
from flax_impl.interop import build_abstract, place_torch_tensors, state_dict_shapes, to_numpy_state_dict
from flax_impl.transformer import Transformer

__all__ = ["FAMILIES", "from_pretrained", "save_pretrained", "to_hf_state_dict"]


def from_pretrained(
    path: str | os.PathLike, *, flax_config: FlaxConfig | None = None, rngs_seed: int = 0
) -> tuple[TransformerConfig, Transformer]:
    """Load a local Hugging Face model folder into a Transformer, in eval mode (as transformers does).

    The folder holds config.json and model.safetensors, or model.safetensors.index.json and its shards. Keys with
    or without the base-model prefix ("transformer.", "model.", "bert.") are accepted, so both XModel and
    XForCausalLM checkpoints load; task heads we do not model (BERT's pooler and MLM head) are dropped. The
    hidden states of `model(ids, attention_mask)` are transformers' `last_hidden_state`; `model.logits(h)` is
    the LM head.

    Args:
        path: the folder.
        flax_config: how the Flax model computes (dtype, scanned layers, ...); the weights are cast to its
            param_dtype.
        rngs_seed: seeds the model's rngs (dropout in train mode). No weight is initialised: the model is built
            abstractly and each parameter is placed once, read from the checkpoint.
    Returns:
        (config, model).
    Warns:
        LossyCastWarning: the checkpoint's tensors lose values on their cast to param_dtype (once per load).
        NonFiniteWeightWarning: a tensor holds NaN or inf (it loads as it is).
    Raises:
        FileNotFoundError: the folder, config.json, the weights or a shard is missing.
        ArgumentTypeError: a config.json value of the wrong JSON kind (a TypeError naming the file and key).
        ValueError: before any weight is read: a malformed config.json or index, a damaged or truncated weights
            file (naming it), an unsupported model_type or option (one message naming every one); then, from the
            headers only: one message listing every missing, unexpected and misshaped key.
    """
    hf = read_config(path)
    fam, cfg = config_from_hf(hf, source=str(Path(path) / CONFIG))
    files = weight_files(path)
    header = read_headers(files)  # key -> (shape, file, dtype); damaged files fail here, before any tensor
    warn_lossy_cast(header, (flax_config or FlaxConfig()).param_dtype, str(path))
    model = build_abstract(lambda: Transformer(cfg, flax_config=flax_config, rngs=nnx.Rngs(rngs_seed)))
    plan = weight_plan(fam, cfg, state_dict_shapes(model))
    names = normalize_keys(fam, cfg, list(header))
    check_checkpoint(fam, cfg, plan, {short: header[full][0] for short, full in names.items()})
    by_ours = {entry.ours: entry for entry in plan}

    def fetch(ours: str) -> np.ndarray:  # read on demand: one parameter's tensors at a time
        entry = by_ours[ours]
        return to_ours(entry, [read_tensor(header[names[k]][1], names[k]) for k in entry.hf_keys], cfg)

    place_torch_tensors(model, state_dict_shapes(model), fetch)
    model.eval()
    return cfg, model


def to_hf_state_dict(model: Transformer, model_type: str) -> dict[str, np.ndarray]:
    """The model's parameters as the checkpoint tensors of family `model_type`: the keys and layouts that
    `save_pretrained` writes (with the XForCausalLM / XModel prefix), numpy arrays in the param_dtype.

    Raises:
        TypeError: `model` is not a Transformer.
        ValueError: an unsupported model_type, or a config the family cannot hold (see `save_pretrained`).
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a Transformer, got {type(model).__name__}")
    fam = family(model_type)
    cfg = model.config
    config_to_hf(fam, cfg)  # refuses a config the family cannot hold, before any tensor is converted
    state = to_numpy_state_dict(model)
    plan = weight_plan(fam, cfg, {k: v.shape for k, v in state.items()})
    tensors = {}
    for entry in plan:
        for key, tensor in zip(entry.hf_keys, to_hf(entry, state[entry.ours], cfg), strict=True):
            tensors[(fam.save_prefix if entry.base else "") + key] = tensor
    return tensors


def save_pretrained(model: Transformer, path: str | os.PathLike, *, model_type: str) -> None:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) of family `model_type`.

    transformers loads it with AutoModel (bert) or AutoModelForCausalLM (the decoder families) and computes the
    same outputs. Only the architecture is written: token ids (bos/eos; pad where it is not the embedding's
    padding_idx) take transformers' defaults. Tensors keep the model's param_dtype.

    Args:
        model: the Transformer.
        path: the folder (created if absent; config.json and model.safetensors are replaced).
        model_type: one of `FAMILIES`.
    Raises:
        TypeError: `model` is not a Transformer.
        ValueError: before anything is written: an unsupported model_type, or a config the family cannot hold
            (one message naming every field that would not survive, e.g. rmsnorm for gpt2).
    """
    tensors = to_hf_state_dict(model, model_type)
    hf = config_to_hf(family(model_type), model.config, dtype=model.flax_config.param_dtype)
    write_folder(path, hf, tensors)
