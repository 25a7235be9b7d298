"""The two engines that read the family tables: config.json <-> TransformerConfig, and our state dict <->
checkpoint tensors. Pure Python + numpy; no file I/O (that is `flax_impl.hf.io`).

Axes: N heads, K kv heads, H head dim.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flax_impl.config import TransformerConfig
from flax_impl.hf.families import FAMILIES
from flax_impl.hf.spec import LAYOUTS, Dims, Family, Key, Unsupported
from flax_impl.validation import ArgumentTypeError, check_json_kind

# Our fields that change training only (dropout rates, the frozen padding row), never the weights or the eval-mode
# forward: written where the family has a place for them, not required to survive a save.
TRAINING_ONLY = ("dropout", "attention_dropout", "padding_idx")


def family(model_type: object) -> Family:
    """The table for a Hugging Face model_type; ValueError naming the supported ones otherwise."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def lookup(hf: Mapping[str, Any], path: str, default: Any = None) -> Any:
    """hf["a"]["b"] for path "a.b"; `default` where any level is absent (or the parent is None)."""
    node: Any = hf
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def put(hf: dict[str, Any], path: str, value: Any) -> None:
    """hf["a"]["b"] = value for path "a.b", creating the parent dicts."""
    *parents, last = path.split(".")
    node = hf
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def standardize_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with RoPE settings in transformers 5's one `rope_parameters` dict ({"rope_type", "rope_theta",
    "factor", ...}), as transformers' own `convert_rope_params_to_dict` does: transformers 4 wrote top-level
    `rope_theta` and `rope_scaling` ({"type" | "rope_type", "factor"}), which wins over `rope_parameters`."""
    hf = copy.deepcopy(dict(hf))
    for key in ("rope_scaling", "rope_parameters"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise ArgumentTypeError(f"{key}={hf[key]!r} must be a JSON object or null, got {type(hf[key]).__name__}")
    params = dict(hf.pop("rope_scaling", None) or hf.get("rope_parameters") or {})
    theta, partial = hf.pop("rope_theta", None), hf.pop("partial_rotary_factor", None)
    if not (params or theta is not None):
        return hf
    params.setdefault("rope_type", params.pop("type", "default"))
    if theta is not None:
        params.setdefault("rope_theta", theta)
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    hf["rope_parameters"] = params
    return hf


_ABSENT = object()


def _resolved(fam: Family, hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Every config.json key the table names -> its value, transformers' default where config.json omits it.

    Raises:
        ArgumentTypeError: one message listing every value config.json gives of another kind than the table
            declares (a "false" where a bool belongs, a "64" or 64.0 where an integer does, an object's parent
            that is not an object), naming `source`, the key, the value and what is allowed.
        ValueError: only NaN or infinite numbers (the same message).
    """
    kinds: dict[str, tuple[Any, str]] = {}
    for entry in (*fam.require, *fam.config):
        kinds.setdefault(entry.hf, (entry.default, entry.kind))
    for f in fam.config:
        for path, default_kind in f.convert.reads.items():
            kinds.setdefault(path, default_kind)
    out: dict[str, Any] = {}
    problems: list[str] = []
    wrong_type = False
    for path, (default, kind) in kinds.items():
        parent = path.rpartition(".")[0]
        node = lookup(hf, parent, None) if parent else hf
        if node is not None and not isinstance(node, Mapping):
            problems.append(f"{parent}={node!r} must be a JSON object or null, got {type(node).__name__}")
            wrong_type = True
            continue
        value = lookup(hf, path, _ABSENT)
        if value is _ABSENT:
            out[path] = default
            continue
        try:
            check_json_kind(path, value, kind)
        except ValueError as e:  # ArgumentTypeError included
            problems.append(str(e))
            wrong_type |= isinstance(e, ArgumentTypeError)
        out[path] = value
    if problems:
        lines = "\n  ".join(dict.fromkeys(problems))
        error = ArgumentTypeError if wrong_type else ValueError
        raise error(f"{source} (model_type={fam.model_type!r}) holds values flax_impl cannot read:\n  {lines}")
    return out


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json") -> tuple[Family, TransformerConfig]:
    """A config.json dict -> (its family, our TransformerConfig).

    Every value the family's table reads is checked against its declared JSON kind first (`flax_impl.hf.spec`):
    a value of another kind is refused, never read by truthiness or converted.

    Args:
        hf: the config.json object.
        source: how messages name the file (the path of config.json).
    Raises:
        ArgumentTypeError: a value of the wrong kind (one message naming every such key, its value and what is
            allowed); also a ValueError.
        ValueError: an unsupported model_type; one message listing every option set to a value we do not
            implement; or a config our TransformerConfig rejects (naming the field).
    """
    if not isinstance(hf, Mapping):
        raise ArgumentTypeError(f"{source} must hold a JSON object, got {type(hf).__name__}")
    try:
        fam = family(hf.get("model_type"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    try:
        standard = standardize_rope(hf)
    except ArgumentTypeError as e:
        raise ArgumentTypeError(f"{source} (model_type={fam.model_type!r}): {e}") from None
    values = _resolved(fam, standard, source)
    problems = [f"{r.hf}={values[r.hf]!r}: {r.why}" for r in fam.require if not r.ok(values[r.hf], values)]
    fields: dict[str, Any] = dict(fam.fixed)
    for f in fam.config:
        try:
            fields[f.ours] = f.convert.to_ours(values[f.hf], values)
        except Unsupported as e:
            problems.append(f"{f.hf}={values[f.hf]!r}: {e}")
    if problems:
        raise ValueError(
            f"{source} (model_type={fam.model_type!r}) sets options flax_impl does not implement:\n  "
            + "\n  ".join(problems)
        )
    try:
        return fam, TransformerConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{source} (model_type={fam.model_type!r}) gives an invalid TransformerConfig: {e}") from e


def _relevant(cfg: TransformerConfig, name: str) -> bool:
    """Whether a field can change this config's weights or eval-mode forward (RoPE settings only under RoPE, ...)."""
    if name in TRAINING_ONLY:
        return False
    if name == "bias":  # resolved into the four switches (qkv_bias, ...), which are compared instead
        return False
    if name.startswith("rope_"):
        return cfg.position == "rope"
    if name.startswith("alibi_"):
        return cfg.position == "alibi"
    if name == "parallel_shared_norm":
        return cfg.parallel_residual
    return True


def config_to_hf(fam: Family, cfg: TransformerConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """Our config -> a config.json dict for `fam`, checked by converting it back: every field that can change the
    weights or the eval-mode forward must survive (else one ValueError lists the fields the family cannot hold)."""
    hf: dict[str, Any] = {"model_type": fam.model_type, "architectures": [fam.architecture], "dtype": dtype}
    problems = []
    for f in fam.config:
        value = getattr(cfg, f.ours)
        try:
            out = f.convert.to_hf(value, cfg)
        except Unsupported as e:
            problems.append(f"{f.ours}={value!r}: {e}")
            continue
        if not (f.omit_default and out == f.default):
            put(hf, f.hf, out)
    for d in fam.derived:
        put(hf, d.hf, d.value(cfg))
    if not problems:
        back = config_from_hf(hf)[1]
        for field in dataclasses.fields(cfg):
            name = field.name
            if name in fam.unrepresented or not _relevant(cfg, name):
                continue
            if getattr(back, name) != getattr(cfg, name):
                problems.append(
                    f"{name}={getattr(cfg, name)!r} (a {fam.model_type} config.json gives {getattr(back, name)!r})"
                )
    if problems:
        raise ValueError(
            f"model_type={fam.model_type!r} cannot represent this TransformerConfig:\n  " + "\n  ".join(problems)
        )
    return hf


# ---------------------------------------------------------------------------------------------------------------
# Weights.


def dims(cfg: TransformerConfig) -> Dims:
    return Dims(N=cfg.n_heads, K=cfg.n_kv_heads, H=cfg.head_dim)


def _ours_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


@dataclass(frozen=True)
class Entry:
    """One of our tensors and the checkpoint tensors that store it (keys without the base-model prefix)."""

    ours: str
    layout: str
    hf_keys: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    base: bool


def weight_plan(fam: Family, cfg: TransformerConfig, our_shapes: Mapping[str, tuple[int, ...]]) -> list[Entry]:
    """For each of our keys (torch_ref names, torch layout shapes) the checkpoint keys and shapes that store it.

    Raises:
        ValueError: one of our parameters has no entry in the family's table (a config the family cannot hold).
    """
    d = dims(cfg)
    compiled = [(key, _ours_regex(key.ours)) for key in fam.keys]
    plan, unmapped = [], []
    for ours, shape in our_shapes.items():
        hit = next(((key, m) for key, rx in compiled if (m := rx.match(ours))), None)
        if hit is None:
            unmapped.append(ours)
            continue
        key, m = hit
        names = _hf_names(key, m.groupdict())
        shapes = tuple(tuple(s) for s in LAYOUTS[key.layout].hf_shapes(tuple(shape), d))
        plan.append(Entry(ours, key.layout, names, shapes, key.base))
    if unmapped:
        raise ValueError(f"model_type={fam.model_type!r} has no checkpoint key for our parameters {unmapped}")
    return plan


def _hf_names(key: Key, bindings: dict[str, str]) -> tuple[str, ...]:
    if key.parts:
        return tuple(key.hf.format(part=part, **bindings) for part in key.parts)
    return (key.hf.format(**bindings),)


def to_ours(entry: Entry, tensors: list[np.ndarray], cfg: TransformerConfig) -> np.ndarray:
    """The checkpoint tensors of one entry -> our tensor (torch layout)."""
    return LAYOUTS[entry.layout].to_ours(tensors, dims(cfg))


def to_hf(entry: Entry, tensor: np.ndarray, cfg: TransformerConfig) -> list[np.ndarray]:
    """Our tensor (torch layout) -> the checkpoint tensors of one entry, C-contiguous."""
    return [np.ascontiguousarray(t) for t in LAYOUTS[entry.layout].to_hf(tensor, dims(cfg))]


def check_checkpoint(
    fam: Family, cfg: TransformerConfig, plan: list[Entry], found: Mapping[str, tuple[int, ...]]
) -> None:
    """Compare the checkpoint's keys and shapes (prefix stripped, ignored keys dropped) with the plan's.

    Raises:
        ValueError: one message listing every missing, unexpected and misshaped key.
    """
    expected = {k: s for e in plan for k, s in zip(e.hf_keys, e.hf_shapes, strict=True)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(found[k])} vs expected {expected[k]}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != expected[k]
    ]
    if missing or unexpected or misshaped:
        lines = [f"the checkpoint does not match its config.json (model_type={fam.model_type!r}):"]
        lines += [f"  missing key: {k}" for k in missing]
        lines += [f"  unexpected key: {k}" for k in unexpected]
        lines += [f"  shape mismatch: {m}" for m in misshaped]
        raise ValueError("\n".join(lines))


def normalize_keys(fam: Family, cfg: TransformerConfig, keys: list[str]) -> dict[str, str]:
    """Checkpoint key -> key relative to the base-model prefix, minus the keys the family ignores (and a tied
    LM head's copy of the embedding, which transformers itself re-ties on load)."""
    ignore = [re.compile(p + r"\Z") for p in fam.ignore]
    if cfg.lm_head == "tied":
        ignore.append(re.compile(r"lm_head\.weight\Z"))
    out: dict[str, str] = {}
    for key in keys:
        short = key[len(fam.prefix) :] if fam.prefix and key.startswith(fam.prefix) else key
        if any(rx.match(short) for rx in ignore):
            continue
        if short in out:
            raise ValueError(f"the checkpoint holds both {out[short]!r} and {key!r} (the same tensor)")
        out[short] = key
    return out
