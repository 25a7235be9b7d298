"""The vocabulary of the per-family tables in `flax_impl.hf.families`: config fields, refused options, key
templates (the weight layouts are in `flax_impl.hf.layouts`, the shared converters in `flax_impl.hf.converters`).

A family is data, not code: `Field`s map a Hugging Face config.json entry to a `TransformerConfig` field through
a named two-way `Convert`; `Require`s name the HF options we do not implement (a clear error when a config.json
sets one); `Key`s map a checkpoint key template to our key templates (torch_ref's state-dict names) through a
`Layout`, chosen by the config where a family stores its weights in more than one way (`Key.when`).
`flax_impl.hf.register_family` adds a table without editing the library (docs/adding-a-family.md).

Every config.json entry a table reads declares its JSON kind (`flax_impl.validation.JSON_KINDS`: "bool", "int",
"float", "str", "list[str]"; "a|b" for either, "?" admits null), checked before any value is used, so a "false"
where a bool belongs is refused instead of read by truthiness. The engines that read the tables live in
`flax_impl.hf.convert`.

Axes: D model width, N heads, K kv heads, H head dim, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flax_impl.config import TransformerConfig

# Config fields that change neither the weights nor the eval-mode forward, in every family: ids, cache, init.
COMMON_IGNORED = ("bos_token_id", "eos_token_id", "use_cache", "initializer_range")


class Unsupported(ValueError):
    """A config.json value (or one of our config values, on save) that the other side cannot represent."""


# ---------------------------------------------------------------------------------------------------------------
# Config: HF field <-> our field.


@dataclass(frozen=True)
class Convert:
    """A named two-way value converter. `to_ours(value, hf)` reads the HF value; `hf` maps every config.json key
    the family's table names (and the keys in `reads`) to its value, defaults filled in, kinds checked.
    `to_hf(value, config)` writes ours back, with our whole config for context. Either raises `Unsupported` for a
    value the other side cannot represent."""

    name: str
    to_ours: Callable[[Any, Mapping[str, Any]], Any]
    to_hf: Callable[[Any, TransformerConfig], Any]
    # Other HF keys read -> (their default, their JSON kind).
    reads: Mapping[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)


SAME = Convert("same", lambda v, hf: v, lambda v, cfg: v)


def choice(name: str, table: Mapping[str, str]) -> Convert:
    """An enumeration: HF names -> our names. On save the first HF name listed for our value is written."""
    inverse: dict[str, str] = {}
    for theirs, ours in table.items():
        inverse.setdefault(ours, theirs)

    def to_ours(v: Any, hf: Mapping[str, Any]) -> str:
        if v not in table:
            raise Unsupported(f"{v!r} is not supported; supported: {sorted(table)}")
        return table[v]

    def to_hf(v: Any, cfg: TransformerConfig) -> str:
        if v not in inverse:
            raise Unsupported(f"{v!r} has no Hugging Face name here; representable: {sorted(inverse)}")
        return inverse[v]

    return Convert(name, to_ours, to_hf)


@dataclass(frozen=True)
class Field:
    """config.json `hf` (dotted for nested dicts: "attn_config.alibi_bias_max") <-> TransformerConfig `ours`.

    `default` is transformers' default for a config.json that omits the key (checked against the config class in
    parity_tests/test_hf.py); `kind` the JSON kind a config.json value must have (checked against the config
    class's annotations there too). Two Fields may read the same HF key (BLOOM's hidden_size gives d_model and
    d_ff)."""

    hf: str
    ours: str
    default: Any
    convert: Convert = SAME
    omit_default: bool = False  # on save, leave the key out when it equals `default`
    kind: str = dataclasses.field(kw_only=True)


@dataclass(frozen=True)
class Require:
    """An HF option we do not implement: a config.json whose value fails `check` is refused before any weight is
    read, with `why` in the message. transformers' default always passes (tested), so nothing is written on save."""

    hf: str
    default: Any
    allowed: tuple[Any, ...] = ()  # the values we implement ...
    check: Callable[[Any, Mapping[str, Any]], bool] | None = None  # ... or a test of the value (and `Convert`'s hf)
    why: str = ""
    kind: str = dataclasses.field(kw_only=True)  # the JSON kind, checked before `allowed` / `check`

    def ok(self, value: Any, hf: Mapping[str, Any]) -> bool:
        return self.check(value, hf) if self.check is not None else value in self.allowed


@dataclass(frozen=True)
class Derived:
    """A config.json entry written on save, computed from our config (no TransformerConfig field of its own)."""

    hf: str
    value: Callable[[TransformerConfig], Any]


# ---------------------------------------------------------------------------------------------------------------
# Weights: checkpoint key template <-> our key templates, through a layout.


@dataclass(frozen=True)
class Key:
    """Checkpoint key template `hf` <-> our key template(s) `ours`, stored with `layout` (a name in
    `flax_impl.hf.layouts.LAYOUTS`, or a `Layout`).

    Templates take `{i}` (a layer index) and `{p}` ("weight" or "bias", the same on both sides); `hf` also takes
    `{part}`: one checkpoint tensor per entry of `parts` ("qkv_concat": q, k, v in that order). A tuple `ours` is
    several of our tensors stored as one checkpoint tensor (Phi-3's gate_up_proj: ("blocks.{i}.ff.gate.weight",
    "blocks.{i}.ff.up.weight")), read apart and written back as one. `hf` is relative to the family's base-model
    prefix ("transformer.", "model.") unless `base=False` (the LM head). `when`, a test of the family's resolved
    config.json values, makes the key apply to some configs only: for each of our tensors the first key that
    matches it and whose `when` holds is used (Falcon's norms are `ln_attn` / `ln_mlp` in its new architecture,
    `input_layernorm` otherwise)."""

    hf: str
    ours: str | tuple[str, ...]
    layout: Any = "identity"  # str | flax_impl.hf.layouts.Layout
    parts: tuple[str, ...] = ()
    base: bool = True
    when: Callable[[Mapping[str, Any]], bool] | None = None

    @property
    def ours_templates(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else tuple(self.ours)


@dataclass(frozen=True)
class Family:
    """Everything `from_pretrained` / `save_pretrained` know about one Hugging Face model_type.

    config: the Fields; fixed: our fields the family pins (position scheme, norm placement, ...); require: the HF
    options we refuse; derived: extra config.json entries written on save; keys: the weight table; ignore: regexes
    of checkpoint keys dropped on load, each for a stated reason (buffers, task heads we do not model);
    unrepresented: our fields the HF config has no place for (not compared on save); ignored_hf: HF config fields
    that change neither the weights nor the eval-mode forward (the coverage test in parity_tests/test_hf.py checks
    that every field of the transformers config class is in config, require or ignored_hf); renamed: older
    config.json keys -> the dotted key transformers reads them into (GPT-NeoX's rotary_pct ->
    rope_parameters.partial_rotary_factor), used when the newer key is absent, as transformers does."""

    model_type: str
    architecture: str  # the transformers class save_pretrained's folder is for (config.json "architectures")
    prefix: str  # the base model's prefix in the head model's keys ("transformer.", "model."), stripped on load
    config: tuple[Field, ...]
    fixed: Mapping[str, Any]
    require: tuple[Require, ...]
    keys: tuple[Key, ...]
    derived: tuple[Derived, ...] = ()
    ignore: tuple[str, ...] = ()
    unrepresented: tuple[str, ...] = ()
    ignored_hf: tuple[str, ...] = ()
    saved_prefix: str | None = None  # the prefix written on save; None: `prefix` (a head model's keys)
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def save_prefix(self) -> str:
        return self.prefix if self.saved_prefix is None else self.saved_prefix
