"""The attention and RoPE fields of `TransformerConfig`: their allowed values and the rules between them.

Pure Python (no jax, no torch), like `flax_impl.config`, which calls `check_attention_fields` from
`TransformerConfig.__post_init__`. The rule of `flax_impl.validation` holds: a value of the wrong type raises
`ArgumentTypeError`, a value of the right type out of range or set raises ValueError, the message naming the field,
its value and what is allowed. Sequence fields take a list or a tuple and are stored as a tuple (hashable, so that
a config stays a static attribute of the modules; a JSON list reads back as the same config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax_impl.validation import ArgumentTypeError, check_bool, check_choice, check_float, check_int

# "rmsnorm": x / rms(x) * w over each head's H dims, w (H,) shared by the heads (Qwen3; Gemma 3 with norm_offset 1:
# (1 + w)); "layernorm": LayerNorm over H, w and b (H,) shared by the heads (b if norm_bias; Phi);
# "layernorm_per_head": LayerNorm over H with each head's own w (N, H) (K, H) and no bias (StableLM, Cohere);
# "rmsnorm_full_width": RMSNorm over all of q's N H and k's K H dims before the split into heads, w (N H,) and
# (K H,) (OLMo 2). Epsilon norm_eps, offset norm_offset (times (c + w)) as every norm; statistics in float32.
QK_NORMS = ("none", "rmsnorm", "layernorm", "layernorm_per_head", "rmsnorm_full_width")
# transformers' rope_type names; ours "linear" is transformers' "default" (rope_scale 1) and "linear".
ROPE_TYPES = ("linear", "llama3", "yarn", "dynamic", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


def check_sequence(
    name: str, value: object, check_item: Callable[[object], Any], what: str, *, length: int | None = None
) -> tuple | None:
    """`value` (a list or tuple, or None) as a tuple of its entries checked by `check_item`.

    Raises:
        ArgumentTypeError: not a list or tuple, or an entry of the wrong type.
        ValueError: an entry out of range, or `length` given and the length differs.
    """
    if value is None:
        return None
    allowed = f"a list of {what}" + (f" of length {length}" if length is not None else "") + " or None"
    if not isinstance(value, (list, tuple)):
        raise ArgumentTypeError(f"{name}={value!r} must be {allowed}, got {type(value).__name__}")
    items = []
    for i, item in enumerate(value):
        try:
            items.append(check_item(item))
        except ArgumentTypeError as e:
            raise ArgumentTypeError(f"{name}={value!r} must be {allowed}: entry {i}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{name}={value!r} must be {allowed}: entry {i}: {e}") from None
    if length is not None and len(items) != length:
        raise ValueError(f"{name}={value!r} must be {allowed} (one entry per layer), got {len(items)} entries")
    return tuple(items)


def _positive(name: str, value: object, *, none_ok: bool = False) -> float | None:
    return check_float(name, value, low=0.0, low_open=True, none_ok=none_ok)


def check_attention_fields(cfg: Any, set_: Callable[[str, Any], None]) -> None:
    """Check and normalise the attention/RoPE fields of the TransformerConfig `cfg` (being built) with `set_`.

    Resolves `head_dim` (None -> d_model / n_heads) and stores sequences as tuples.

    Raises:
        ArgumentTypeError / ValueError: as the module docstring says, naming the field.
    """
    head_dim = check_int("head_dim", cfg.head_dim, low=1, none_ok=True)
    if head_dim is None:
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"n_heads={cfg.n_heads} must divide d_model={cfg.d_model} (or set head_dim)")
        head_dim = cfg.d_model // cfg.n_heads
    set_("head_dim", head_dim)
    check_choice("qk_norm", cfg.qk_norm, QK_NORMS)
    for name in ("query_pre_attn_scalar", "attention_multiplier", "attn_logit_softcap", "rope_attention_factor"):
        set_(name, _positive(name, getattr(cfg, name), none_ok=True))
    if cfg.query_pre_attn_scalar is not None and cfg.attention_multiplier is not None:
        raise ValueError(
            f"query_pre_attn_scalar={cfg.query_pre_attn_scalar!r} and attention_multiplier="
            f"{cfg.attention_multiplier!r} both set the attention scale: set at most one"
        )
    n = cfg.n_layers
    kinds = check_sequence("layer_types", cfg.layer_types, lambda v: check_choice("entry", v, LAYER_TYPES),
                           f"{list(LAYER_TYPES)}", length=n)  # fmt: skip
    set_("layer_types", kinds)
    if kinds is not None and "sliding_attention" in kinds and cfg.sliding_window is None:
        raise ValueError(
            f"layer_types={list(kinds)!r} must be all 'full_attention' without a sliding_window: set sliding_window "
            "(the window W of its sliding layers)"
        )
    set_("rope_layers", check_sequence("rope_layers", cfg.rope_layers, lambda v: check_bool("entry", v), "bools",
                                       length=n))  # fmt: skip
    set_("rope_local_base", check_float("rope_local_base", cfg.rope_local_base, low=1.0, low_open=True, none_ok=True))
    check_choice("rope_type", cfg.rope_type, ROPE_TYPES)
    set_("rope_original_max_len", check_int("rope_original_max_len", cfg.rope_original_max_len, low=1, none_ok=True))
    for name in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow"):
        set_(name, _positive(name, getattr(cfg, name)))
    set_("rope_truncate", check_bool("rope_truncate", cfg.rope_truncate))
    rotated = int(round(cfg.rope_fraction * head_dim))
    for name in ("rope_short_factor", "rope_long_factor"):
        value = check_sequence(name, getattr(cfg, name), lambda v: _positive("entry", v), "numbers > 0")
        set_(name, value)
        if value is not None and cfg.rope_type != "longrope":
            raise ValueError(f"{name}={list(value)!r} must be None unless rope_type='longrope' (got {cfg.rope_type!r})")
        if cfg.rope_type == "longrope" and (value is None or len(value) != rotated // 2):
            raise ValueError(
                f"rope_type='longrope' needs {name}: one factor per rotated pair, {rotated // 2} (rotated width "
                f"{rotated}), got {None if value is None else len(value)}"
            )
    if cfg.rope_type != "linear" and cfg.rope_original_max_len is None:
        raise ValueError(
            f"rope_type={cfg.rope_type!r} needs rope_original_max_len (the length trained at): it must be set"
        )
    if cfg.rope_type == "llama3" and cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
        raise ValueError(
            f"rope_type='llama3' needs rope_high_freq_factor={cfg.rope_high_freq_factor!r} > "
            f"rope_low_freq_factor={cfg.rope_low_freq_factor!r}"
        )
    if cfg.rope_attention_factor is not None and cfg.rope_type not in ("yarn", "longrope"):
        raise ValueError(
            f"rope_attention_factor={cfg.rope_attention_factor!r} must be None unless rope_type is 'yarn' or "
            f"'longrope' (got {cfg.rope_type!r})"
        )
    if cfg.rope_type == "dynamic" and rotated <= 2:
        raise ValueError(f"rope_type='dynamic' raises the base to r / (r - 2): rotated width {rotated} must be > 2")


def sliding_layers(cfg: Any) -> tuple[bool, ...]:
    """Per layer, whether it attends through the sliding window: its `layer_types` entry is "sliding_attention", or,
    without `layer_types`, every layer when `sliding_window` is set (one window for all, as Mistral)."""
    if cfg.layer_types is not None:
        return tuple(t == "sliding_attention" for t in cfg.layer_types)
    return (cfg.sliding_window is not None,) * cfg.n_layers
