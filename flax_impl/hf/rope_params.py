"""config.json's `rope_parameters` <-> our RoPE fields, for every rope_type transformers' `ROPE_INIT_FUNCTIONS`
computes that ours does (`flax_impl.rope`): "default" and "linear" (ours "linear", rope_scale 1 for "default"),
"llama3", "yarn", "dynamic", "longrope".

Each parameter is read as transformers reads it: `factor` (rope_scale) is that of the type, 1 under "default"; yarn
and longrope without a factor take max_position_embeddings / original_max_position_embeddings; the length trained
at (rope_original_max_len) is rope_parameters' original_max_position_embeddings for llama3, yarn and longrope
(filled from max_position_embeddings when absent, or from the top-level original_max_position_embeddings of a config
class that has one, Phi-3), and max_position_embeddings for "dynamic"; yarn's beta_fast / beta_slow default to 32 /
1 and truncate to true. On save each parameter is written only under the types that read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax_impl.config import TransformerConfig
from flax_impl.hf.spec import Convert, Field, Require, Unsupported

_OURS = {"default": "linear", "linear": "linear", "llama3": "llama3", "yarn": "yarn", "dynamic": "dynamic",
         "longrope": "longrope"}  # fmt: skip
_P = "rope_parameters."


def _rope_type_to_hf(v: str, cfg: TransformerConfig) -> str:
    return "default" if v == "linear" and cfg.rope_scale == 1.0 else v


def _param(name: str, used_by: tuple[str, ...], ours_default: Any, kind: str, type_of, reads) -> Convert:
    """A rope parameter read under the types in `used_by` (ours_default where absent or under another type) and
    written only under them."""

    def read(v: Any, hf: Mapping[str, Any]) -> Any:
        if type_of(hf) not in used_by or v is None:
            return ours_default
        return tuple(float(x) for x in v) if kind.startswith("list") else v

    def write(v: Any, cfg: TransformerConfig) -> Any:
        if cfg.rope_type not in used_by:
            return None
        return list(v) if isinstance(v, tuple) else v

    return Convert(f"rope_parameters.{name} ({', '.join(used_by)})", read, write, reads=dict(reads or {}))


def rope_fields(theta: float = 10_000.0, *, max_pos: str = "max_position_embeddings",
                top_original: int | None = None, prefix: str = _P,
                aliases: Mapping[str, str] | None = None) -> tuple[Field, ...]:  # fmt: skip
    """The Fields of every RoPE parameter. `max_pos`: the family's max_position_embeddings key (one its Fields
    name); `top_original`: the
    default of a top-level original_max_position_embeddings the config class has (Phi-3's 4096), which then wins
    over rope_parameters' own; `prefix`: where the parameters are ("rope_parameters.full_attention." for Gemma 3's
    full layers); `aliases`: other rope_type names the config class reads as ours (Phi-3: "su" and "yarn" are
    longrope)."""
    _P, _TYPE = prefix, prefix + "rope_type"
    names = {**_OURS, **(aliases or {})}

    def _type(hf: Mapping[str, Any]) -> str:
        return names.get(hf[_TYPE], "linear")

    def _rope_type_to_ours(v: Any, hf: Mapping[str, Any]) -> str:
        if v not in names:
            raise Unsupported(f"rope_type {v!r} is not implemented; implemented: {sorted(names)}")
        return names[v]

    reads = {_TYPE: ("default", "str")}  # (max_pos is a key of the family's own Fields)
    if top_original is not None:
        reads["original_max_position_embeddings"] = (top_original, "int")

    def original(v: Any, hf: Mapping[str, Any]) -> int | None:
        t = _type(hf)
        if t == "dynamic":
            return int(hf[max_pos])
        if t not in ("llama3", "yarn", "longrope"):
            return None
        if top_original is not None:
            return int(hf["original_max_position_embeddings"])
        return int(hf[max_pos]) if v is None else int(v)

    def factor(v: Any, hf: Mapping[str, Any]) -> float:
        t = _type(hf)
        if hf[_TYPE] == "default":
            return 1.0
        if v is None:
            if t in ("yarn", "longrope"):
                return float(hf[max_pos]) / original(hf.get(_P + "original_max_position_embeddings"), hf)
            raise Unsupported(f"rope_type {hf[_TYPE]!r} needs a factor")
        return float(v)

    def factor_to_hf(v: float, cfg: TransformerConfig) -> float | None:
        return None if cfg.rope_type == "linear" and v == 1.0 else v

    def original_to_hf(v: int | None, cfg: TransformerConfig) -> int | None:
        return v if cfg.rope_type in ("llama3", "yarn", "longrope") else None

    orig_reads = {**reads}
    return (
        Field(_P + "rope_theta", "rope_base", theta, kind="float"),
        Field(_TYPE, "rope_type", "default", Convert("rope_type", _rope_type_to_ours, _rope_type_to_hf), kind="str"),
        Field(_P + "factor", "rope_scale", None, Convert("factor", factor, factor_to_hf, reads=orig_reads),
              omit_default=True, kind="float?"),
        Field(_P + "original_max_position_embeddings", "rope_original_max_len", None,
              Convert("original_max_position_embeddings", original, original_to_hf, reads=orig_reads),
              omit_default=True, kind="int?"),
        Field(_P + "low_freq_factor", "rope_low_freq_factor", None,
              _param("low_freq_factor", ("llama3",), 1.0, "float", _type, reads), omit_default=True, kind="float?"),
        Field(_P + "high_freq_factor", "rope_high_freq_factor", None,
              _param("high_freq_factor", ("llama3",), 4.0, "float", _type, reads), omit_default=True, kind="float?"),
        Field(_P + "beta_fast", "rope_beta_fast", None, _param("beta_fast", ("yarn",), 32.0, "float", _type, reads),
              omit_default=True, kind="float?"),
        Field(_P + "beta_slow", "rope_beta_slow", None, _param("beta_slow", ("yarn",), 1.0, "float", _type, reads),
              omit_default=True, kind="float?"),
        Field(_P + "truncate", "rope_truncate", None, _param("truncate", ("yarn",), True, "bool", _type, reads),
              omit_default=True, kind="bool?"),
        Field(_P + "attention_factor", "rope_attention_factor", None,
              _param("attention_factor", ("yarn", "longrope"), None, "float", _type, reads), omit_default=True,
              kind="float?"),
        Field(_P + "short_factor", "rope_short_factor", None,
              _param("short_factor", ("longrope",), None, "list[float]", _type, reads), omit_default=True,
              kind="list[float]?"),
        Field(_P + "long_factor", "rope_long_factor", None,
              _param("long_factor", ("longrope",), None, "list[float]", _type, reads), omit_default=True,
              kind="list[float]?"),
    )  # fmt: skip


# yarn's mscale / mscale_all_dim (DeepSeek) change its attention factor in a way ours does not compute.
YARN_MSCALE = tuple(
    Require(_P + name, None, (None, 0, 0.0), kind="float?",
            why="yarn's mscale / mscale_all_dim attention factor (DeepSeek) is not implemented")
    for name in ("mscale", "mscale_all_dim")
)  # fmt: skip
