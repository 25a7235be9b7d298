"""The vocabulary of the per-family tables in `flax_impl.hf.families`: config fields, required options, key
templates and the named weight layouts.

A family is data, not code: `Field`s map a Hugging Face config.json entry to a `TransformerConfig` field through
a named two-way `Convert`; `Require`s name the HF options we do not implement (a clear error when a config.json
sets one); `Key`s map a checkpoint key template to our key template (torch_ref's state-dict names) through a named
`Layout`. Every config.json entry a table reads declares its JSON kind (`flax_impl.validation.JSON_KINDS`: "bool",
"int", "float", "str", "list[str]"; "a|b" for either, "?" admits null), checked before any value is used, so a
"false" where a bool belongs is refused instead of read by truthiness. The engines that read the tables live in
`flax_impl.hf.convert`.

Axes: D model width, N heads, K kv heads, H head dim, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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


# Hugging Face activation names (transformers.activations.ACT2CLS) -> ours. gelu_new, gelu_fast and
# gelu_pytorch_tanh are the same tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))); "gelu" is exact erf.
ACTIVATION = choice(
    "activation",
    {
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "relu": "relu",
        "silu": "silu",
        "gelu_python": "gelu",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_python_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "swish": "silu",
    },
)

TIE = Convert("tie_word_embeddings", lambda v, hf: "tied" if v else "untied", lambda v, cfg: v == "tied")


def width_times(factor: int, width_key: str) -> Convert:
    """F = factor x D where transformers hard-codes the MLP width (BLOOM, MPT); on save d_ff must be that."""

    def to_hf(v: int, cfg: TransformerConfig) -> int:
        if v != factor * cfg.d_model:
            raise Unsupported(f"the MLP width is fixed at {factor} x d_model = {factor * cfg.d_model}")
        return cfg.d_model

    return Convert(f"{factor} x {width_key}", lambda v, hf: factor * int(v), to_hf)


def inner_or_4d(width_key: str) -> Convert:
    """GPT-2's n_inner: None means 4 x n_embd."""

    def to_ours(v: Any, hf: Mapping[str, Any]) -> int:
        return 4 * int(hf[width_key]) if v is None else int(v)

    return Convert(f"n_inner (None = 4 x {width_key})", to_ours, lambda v, cfg: v)


def kv_heads(heads_key: str) -> Convert:
    """num_key_value_heads K: None means K = N (plain multi-head attention)."""

    def to_ours(v: Any, hf: Mapping[str, Any]) -> int:
        return int(hf[heads_key]) if v is None else int(v)

    return Convert("num_key_value_heads (None = N)", to_ours, lambda v, cfg: v)


def _linear_factor(v: Any, hf: Mapping[str, Any]) -> float:
    return float(v) if hf["rope_parameters.rope_type"] == "linear" else 1.0


# rope_parameters.factor is our rope_scale only under rope_type "linear" (positions divided by it).
ROPE_LINEAR_FACTOR = Convert(
    "factor of rope_type 'linear'",
    _linear_factor,
    lambda v, cfg: v,
    reads={"rope_parameters.rope_type": ("default", "str")},
)


def head_dim_check(hidden_key: str, heads_key: str) -> Callable[[Any, Mapping[str, Any]], bool]:
    """head_dim must be None or hidden_size / num_attention_heads (ours is always D / N). With N < 1 the check
    passes: TransformerConfig refuses N itself, naming it."""
    return lambda v, hf: v is None or hf[heads_key] < 1 or v == hf[hidden_key] // hf[heads_key]


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
# Weights: checkpoint key template <-> our key template, through a named layout.


@dataclass(frozen=True)
class Dims:
    """The head counts a layout needs: N query heads, K kv heads, H head dim."""

    N: int
    K: int
    H: int


@dataclass(frozen=True)
class Layout:
    """How one of our tensors is stored in the checkpoint: `to_hf` splits/permutes ours into the checkpoint's
    tensors (one per `Key.parts` entry, or one), `to_ours` is its exact inverse (permutations and concatenations
    only: bit-exact both ways), `hf_shapes` gives the checkpoint shapes from ours without touching data."""

    name: str
    to_ours: Callable[[list[np.ndarray], Dims], np.ndarray]
    to_hf: Callable[[np.ndarray, Dims], list[np.ndarray]]
    hf_shapes: Callable[[tuple[int, ...], Dims], list[tuple[int, ...]]]


def _qkv_sizes(d: Dims) -> list[int]:
    return [d.N * d.H, d.K * d.H, d.K * d.H]


def _per_head_to_ours(a: np.ndarray, d: Dims) -> np.ndarray:
    rest = a.shape[1:]
    return a.reshape(d.N, 3, d.H, *rest).swapaxes(0, 1).reshape(3 * d.N * d.H, *rest)  # rows (3, N, H)


def _per_head_to_hf(a: np.ndarray, d: Dims) -> np.ndarray:
    rest = a.shape[1:]
    return a.reshape(3, d.N, d.H, *rest).swapaxes(0, 1).reshape(3 * d.N * d.H, *rest)  # rows (N, 3, H)


LAYOUTS: dict[str, Layout] = {
    # Same tensor, same layout (nn.Linear (out, in) on both sides, embeddings, norms, biases).
    "identity": Layout("identity", lambda a, d: a[0], lambda a, d: [a], lambda s, d: [s]),
    # GPT-2's Conv1D stores its weight (in, out), the transpose of nn.Linear's (out, in).
    "conv1d": Layout("conv1d", lambda a, d: a[0].T, lambda a, d: [a.T], lambda s, d: [s[::-1]]),
    # Separate q, k, v projections (Llama-family q_proj/k_proj/v_proj, BERT query/key/value), weights
    # (N*H | K*H, D) or biases: ours is one in_proj with rows [q (N*H); k (K*H); v (K*H)].
    "qkv_concat": Layout(
        "qkv_concat",
        lambda a, d: np.concatenate(a, axis=0),
        lambda a, d: np.split(a, np.cumsum(_qkv_sizes(d))[:2], axis=0),
        lambda s, d: [(n, *s[1:]) for n in _qkv_sizes(d)],
    ),
    # BLOOM's fused query_key_value is per head: its 3*N*H rows are viewed as (N, 3, H); ours are (3, N, H).
    "qkv_per_head": Layout(
        "qkv_per_head",
        lambda a, d: _per_head_to_ours(a[0], d),
        lambda a, d: [_per_head_to_hf(a, d)],
        lambda s, d: [s],
    ),
}


@dataclass(frozen=True)
class Key:
    """A checkpoint key template `hf` <-> our key template `ours`, stored with layout `layout`.

    Templates take `{i}` (a layer index), `{p}` ("weight" or "bias", the same on both sides) and, in `hf` only,
    `{part}`: one checkpoint tensor per entry of `parts` ("qkv_concat": q, k, v in that order). `hf` is relative to
    the family's base-model prefix ("transformer.", "model.") unless `base=False` (the LM head)."""

    hf: str
    ours: str
    layout: str = "identity"
    parts: tuple[str, ...] = ()
    base: bool = True


@dataclass(frozen=True)
class Family:
    """Everything `from_pretrained` / `save_pretrained` know about one Hugging Face model_type.

    config: the Fields; fixed: our fields the family pins (position scheme, norm placement, ...); require: the HF
    options we refuse; derived: extra config.json entries written on save; keys: the weight table; ignore: regexes
    of checkpoint keys dropped on load, each for a stated reason (buffers, task heads we do not model);
    unrepresented: our fields the HF config has no place for (not compared on save); ignored_hf: HF config fields
    that change neither the weights nor the eval-mode forward (the coverage test in parity_tests/test_hf.py checks
    that every field of the transformers config class is in config, require or ignored_hf)."""

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

    @property
    def save_prefix(self) -> str:
        return self.prefix if self.saved_prefix is None else self.saved_prefix
