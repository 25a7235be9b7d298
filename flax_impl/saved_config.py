"""The config a checkpoint carries, and the check that a model is of that config.

Two configs can share every parameter key and shape and still compute different things (n_heads 2 vs 4, another
position scheme, causal or not): a checkpoint of `flax_impl.interop.save` (safetensors metadata) or
`flax_impl.checkpoint.save_checkpoint` (an Orbax JSON item) therefore stores the model's TransformerConfig, and
loading it into a model of another config is a ValueError listing every field that differs. A checkpoint without a
config (written by torch, or before configs were stored) loads with a warning that its architecture could not be
checked.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from flax_impl.config import TransformerConfig

CONFIG_KEY = "flax_impl.config"  # safetensors metadata entry: the TransformerConfig as JSON
# Fields that do not change what the weights compute: the dropout rates (training only) and max_len (a limit on
# the input length; for learned positions it is also a parameter's shape, which the shape check compares).
CONFIG_FIELDS_IGNORED = ("dropout", "attention_dropout", "max_len")


def saved_config(module: Any) -> dict[str, Any] | None:
    """`module.config.to_dict()` when the module keeps a TransformerConfig as `.config` (Transformer),
    else None (the module cannot be checked)."""
    config = getattr(module, "config", None)
    return config.to_dict() if isinstance(config, TransformerConfig) else None


def config_differences(saved: dict[str, Any], config: TransformerConfig) -> list[str]:
    """One line `field: checkpoint A vs model B` per architecture field that differs (`CONFIG_FIELDS_IGNORED`
    aside). A field the checkpoint does not have counts as its default; one this version does not know differs.

    Args:
        saved: the checkpoint's config as a dict (`TransformerConfig.to_dict()` of the model that wrote it).
        config: the config of the model to load into.

    Returns:
        The differences, sorted by field name; [] when the two describe the same architecture.
    """
    ours = json.loads(json.dumps(config.to_dict()))  # JSON's types, as the saved side went through JSON
    defaults = json.loads(json.dumps(TransformerConfig().to_dict()))
    lines = []
    for field in sorted(set(ours) | set(saved)):
        if field in CONFIG_FIELDS_IGNORED:
            continue
        if field not in ours:
            lines.append(f"{field}: checkpoint {saved[field]!r}, a field this version does not know")
            continue
        theirs = saved.get(field, defaults[field])
        if theirs != ours[field]:
            lines.append(f"{field}: checkpoint {theirs!r} vs model {ours[field]!r}")
    return lines


def config_mismatches(module: Any, saved: str | dict[str, Any] | None, source: str) -> list[str]:
    """The lines `config <field>: checkpoint A vs model B` for every architecture field in which `module`'s
    TransformerConfig differs from the checkpoint's config `saved`; a loader puts them in its error message,
    before its own lines (keys, shapes). A UserWarning when the checkpoint has no config.

    Args:
        module: the model to load into (only a module with a TransformerConfig `.config` is checked).
        saved: the checkpoint's config as a dict or as JSON text, or None when it carries none.
        source: the checkpoint, as named in the warning and errors.

    Returns:
        [] when the configs agree, or the module or the checkpoint has no config.

    Raises:
        ValueError: `saved` is not a JSON object.
    """
    config = getattr(module, "config", None)
    if not isinstance(config, TransformerConfig):
        return []
    if saved is None:
        warnings.warn(
            f"{source} carries no flax_impl config (written by torch or an older flax_impl): its keys and shapes "
            "are checked, its architecture (heads, position scheme, ...) cannot be",
            UserWarning,
            stacklevel=3,
        )
        return []
    if isinstance(saved, str):
        try:
            saved = json.loads(saved)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: its saved config is not JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{source}: its saved config is not a JSON object: {saved!r:.80}")
    return [f"config {line}" for line in config_differences(saved, config)]
