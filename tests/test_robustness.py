"""Hostile arguments, drawn by hypothesis: every field of every config and every argument of the public functions
and modules (both twins), given a value of the wrong type or out of range, must raise before any work with the
error type of `flax_impl.validation`'s rule (a TypeError for a wrong type, a ValueError for a bad value), naming
the argument; a valid value must work (issue 19, items 2 and 8). Command options are tests/test_*_cli.py's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings, strategies as st

import flax_impl as fi
import torch_ref as tr
from flax_impl import config as C, train as ftrain
from flax_impl.attention_config import LAYER_TYPES, QK_NORMS, ROPE_TYPES
from flax_impl.tolerances import ELEMENTWISE


@dataclass(frozen=True)
class Arg:
    """What an argument accepts: kind "bool" | "int" | "float" | "choice" | "object" (an instance of `cls`);
    int bounds [low, high), float bounds closed unless *_open; `valid`: values that must work."""

    kind: str  # "seq": a list of `item`s ("choice" from `allowed`, "bool" or "float" > 0), of `high` entries if set
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = False
    allowed: tuple = ()
    valid: tuple = ()
    item: str = ""


BOOL, OPT_BOOL = Arg("bool", valid=(True, False)), Arg("bool", none_ok=True, valid=(True, None))
INT0, INT1 = Arg("int", low=0, valid=(0, 3)), Arg("int", low=1, valid=(1, 4))
POSITIVE = Arg("float", low=0.0, low_open=True, valid=(1e-6, 2.0))
PROB = Arg("float", low=0.0, high=1.0, valid=(0.0, 0.25, 1.0))


def choice(allowed: tuple) -> Arg:
    return Arg("choice", allowed=allowed, valid=allowed[:2])


TRANSFORMER = {
    **{name: INT1 for name in ("vocab_size", "d_ff", "n_layers", "max_len")},
    "d_model": Arg("int", low=1, valid=(8, 64)),  # n_heads = 8 divides it
    "n_heads": Arg("int", low=1, valid=(1, 4)),
    "n_kv_heads": Arg("int", low=1, none_ok=True, valid=(2, None)),
    "dropout": PROB,
    "attention_dropout": Arg("float", low=0.0, high=1.0, none_ok=True, valid=(0.5, None)),
    "rope_base": Arg("float", low=1.0, low_open=True, valid=(1.5, 1e6)),
    "rope_fraction": Arg("float", low=0.0, high=1.0, low_open=True, valid=(0.5, 1.0)),
    **{name: POSITIVE for name in ("rope_scale", "norm_eps", "alibi_max_bias")},
    **{name: BOOL for name in C.TRANSFORMER_BOOLS},
    **{name: OPT_BOOL for name in C.BIAS_SWITCHES},
    **{name: choice(allowed) for name, allowed in C.TRANSFORMER_CHOICES.items()},
    "padding_idx": Arg("int", low=0, high=10_000, none_ok=True, valid=(0, 9_999, None)),
    "sliding_window": Arg("int", low=1, none_ok=True, valid=(1, None)),
    "type_vocab_size": INT0,
    "position_offset": INT0,
    "norm_offset": Arg("float", valid=(0.0, 1.0, -0.5)),
    **{name: POSITIVE for name in C.POSITIVE_SCALARS},
    "final_logit_softcap": Arg("float", low=0.0, low_open=True, none_ok=True, valid=(30.0, None)),
    # attention and RoPE (flax_impl.attention_config); the base config has 6 layers and rope_type "linear"
    "head_dim": Arg("int", low=1, none_ok=True, valid=(8, None)),
    "qk_norm": choice(QK_NORMS),
    **{n: Arg("float", low=0.0, low_open=True, none_ok=True, valid=(0.5, None))
       for n in ("query_pre_attn_scalar", "attention_multiplier", "attn_logit_softcap")},
    "layer_types": Arg("seq", item="choice", allowed=LAYER_TYPES, high=6, none_ok=True,
                       valid=(None, ["full_attention"] * 6)),
    "rope_layers": Arg("seq", item="bool", high=6, none_ok=True, valid=(None, [True, False] * 3)),
    "rope_local_base": Arg("float", low=1.0, low_open=True, none_ok=True, valid=(1e4, None)),
    "rope_type": Arg("choice", allowed=ROPE_TYPES, valid=("linear",)),  # the others need rope_original_max_len
    "rope_original_max_len": Arg("int", low=1, none_ok=True, valid=(1, None)),
    **{n: POSITIVE for n in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow")},
    "rope_truncate": BOOL,
    "rope_attention_factor": Arg("float", low=0.0, low_open=True, none_ok=True, valid=(None,)),  # yarn / longrope
    **{n: Arg("seq", item="float", none_ok=True, valid=(None,)) for n in ("rope_short_factor", "rope_long_factor")},
}  # fmt: skip
TRANSFORMER_BASE = {"causal": True, "lm_head": "untied", "d_model": 64}  # sliding_window / lm_head_bias may be set
FLAX = {
    "dtype": choice(C.DTYPES),
    "param_dtype": choice(C.DTYPES),
    "attention_impl": choice(C.ATTENTION_IMPLS),
    "scan_unroll": INT1,
    "scan_layers": BOOL,
    "remat": BOOL,
}
TRAIN = {
    "learning_rate": POSITIVE,
    "eps": POSITIVE,
    "clip_norm": Arg("float", low=0.0, low_open=True, none_ok=True, valid=(0.5, None)),
    "warmup_steps": Arg("int", low=0, valid=(0, 999)),
    "total_steps": Arg("int", low=1, valid=(101, 10**6)),
    "end_lr_ratio": PROB,
    "weight_decay": Arg("float", low=0.0, valid=(0.0, 10.0)),
    "b1": Arg("float", low=0.0, high=1.0, high_open=True, valid=(0.0, 0.999)),
    "b2": Arg("float", low=0.0, high=1.0, high_open=True, valid=(0.5, 0.9999)),
    "mask_prob": Arg("float", low=0.0, high=1.0, low_open=True, valid=(0.01, 1.0)),
}
CONFIGS = {
    "TransformerConfig": (C.TransformerConfig, TRANSFORMER, TRANSFORMER_BASE),
    "FlaxConfig": (C.FlaxConfig, FLAX, {}),
    "TrainConfig": (C.TrainConfig, TRAIN, {}),
}


def wrong_type(arg: Arg) -> st.SearchStrategy:
    """Values of a type the argument does not take (bools for numbers, numbers for bools, strings for anything)."""
    common = [st.lists(st.integers(), max_size=2), st.just(b"1"), st.complex_numbers(max_magnitude=9)]
    if arg.kind == "seq":  # a list is a sequence's type: a list of entries of another type is a wrong type
        wrong_item = {"choice": st.integers(), "bool": st.sampled_from([0, 1, "True"]), "float": st.text(max_size=3)}
        common = [st.lists(wrong_item[arg.item], min_size=1, max_size=3), st.just(b"1"), st.integers()]
    if arg.kind != "choice":  # a str is a choice's type: a wrong str is a bad value
        common.append(st.text(max_size=6))
    if not arg.none_ok:
        common.append(st.none())
    by_kind = {
        "bool": [st.integers(-2, 2), st.floats(), st.sampled_from(["True", "False", "no", "0"])],
        "int": [st.booleans(), st.floats(), st.just(Fraction(1, 2)), st.sampled_from(["8", "1e3"])],
        "float": [st.booleans(), st.sampled_from(["1e-5", "0.1", "inf"]), st.just({"value": 1.0})],
        "choice": [st.integers(), st.booleans(), st.floats(), st.tuples(st.text(max_size=3))],
        "object": [st.integers(), st.floats(), st.booleans()],  # a dict is a config's documented other form
        "seq": [st.floats(), st.booleans(), st.just({"value": 1.0})],
    }[arg.kind]
    return st.one_of(*by_kind, *common)


def bad_value(arg: Arg) -> st.SearchStrategy | None:
    """Values of the right type outside the range or set; None where every value of the type is allowed."""
    if arg.kind == "int":
        parts = []
        if arg.low is not None:
            parts.append(st.integers(max_value=int(arg.low) - 1))
        if arg.high is not None:
            parts.append(st.integers(min_value=int(arg.high)))
        return st.one_of(*parts) if parts else None
    if arg.kind == "float":
        parts = [st.sampled_from([math.nan, math.inf, -math.inf])]
        if arg.low is not None:
            below = st.floats(max_value=arg.low, exclude_max=not arg.low_open, allow_nan=False, allow_infinity=False)
            parts.append(below)
        if arg.high is not None:
            above = st.floats(min_value=arg.high, exclude_min=not arg.high_open, allow_nan=False, allow_infinity=False)
            parts.append(above)
        return st.one_of(*parts)
    if arg.kind == "choice":
        return st.text(max_size=12).filter(lambda s: s not in arg.allowed)
    if arg.kind == "seq":  # an entry out of its set or range, or (per layer) a wrong length
        if arg.item == "float":
            return st.lists(st.sampled_from([0.0, -1.0, math.nan, math.inf]), min_size=1, max_size=3)
        good = st.sampled_from(arg.allowed) if arg.item == "choice" else st.booleans()
        wrong_length = st.lists(good, max_size=9).filter(lambda v: len(v) != arg.high)
        if arg.item == "choice":
            return st.one_of(wrong_length, st.lists(st.text(max_size=5).filter(lambda s: s not in arg.allowed),
                                                    min_size=1, max_size=6))  # fmt: skip
        return wrong_length
    return None


def draw_bad(data, args: dict[str, Arg]) -> tuple[str, object, type]:
    """(argument name, bad value, the error type the rule says it raises)."""
    name = data.draw(st.sampled_from(sorted(args)), label="argument")
    arg = args[name]
    value_strategy = bad_value(arg)
    by_value = value_strategy is not None and data.draw(st.booleans(), label="bad value (else bad type)")
    if by_value:
        return name, data.draw(value_strategy, label="value"), ValueError
    return name, data.draw(wrong_type(arg), label="value"), TypeError


def assert_refused(call, name: str, value: object, error: type) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    message = str(info.value)
    assert isinstance(info.value, error), f"{name}={value!r}: {type(info.value).__name__} ({message})"
    if error is ValueError:
        assert not isinstance(info.value, TypeError), f"{name}={value!r} has the right type: {message}"
    assert f"{name}=" in message, f"the message does not name {name}: {message}"
    assert "must be" in message or "is not one of" in message, f"the message does not say what is allowed: {message}"


# ------------------------------------------------------------------------------------------------------- configs
def test_every_config_field_has_a_rule():
    for cls, args, _ in CONFIGS.values():
        assert set(args) == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_bad_config_fields_are_refused_by_type(data):
    cls, args, base = CONFIGS[data.draw(st.sampled_from(sorted(CONFIGS)), label="config")]
    name, value, error = draw_bad(data, args)
    base = {k: v for k, v in base.items() if k != name}
    assert_refused(lambda: cls(**{**base, name: value}), name, value, error)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_valid_config_fields_are_kept_as_plain_python(data):
    cls, args, base = CONFIGS[data.draw(st.sampled_from(sorted(CONFIGS)), label="config")]
    name = data.draw(st.sampled_from(sorted(args)), label="field")
    value = data.draw(st.sampled_from(args[name].valid), label="value")
    as_numpy = data.draw(st.booleans()) and isinstance(value, (int, float)) and not isinstance(value, bool)
    given_value = (np.int64(value) if isinstance(value, int) else np.float64(value)) if as_numpy else value
    cfg = cls(**{**{k: v for k, v in base.items() if k != name}, name: given_value})
    kept = getattr(cfg, name)
    if isinstance(value, list):  # sequences are kept as tuples of plain values
        assert kept == tuple(value) and all(type(v) in (bool, int, float, str) for v in kept), (name, kept)
    elif value is not None:
        assert kept == value and type(kept) in (bool, int, float, str), (name, kept)
    assert cls.from_dict(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------- exported functions and modules
X = np.random.default_rng(0).standard_normal((1, 3, 2, 4)).astype(np.float32)  # (B, L, N, H)
E = np.random.default_rng(1).standard_normal((260, 4)).astype(np.float32)  # (V, D)
TOKENS = np.full((2, 5), 5, np.int64)
MODULE_CONFIG = fi.TransformerConfig(vocab_size=11, d_model=8, n_heads=2, d_ff=8, n_layers=1, max_len=8)
CONFIG_ARG = Arg("object")
OPT_CONFIG_ARG = Arg("object", none_ok=True)
ROPE_ARGS = {
    "base": Arg("float", low=1.0, low_open=True, valid=(2.0,)),
    "style": choice(C.ROPE_STYLES),
    "fraction": Arg("float", low=0.0, high=1.0, low_open=True, valid=(0.5,)),
    "scale": POSITIVE,
}
TEXT_ARGS = {  # "learned" needs a table: the valid draws take the others
    "position": Arg("choice", allowed=C.POSITIONS, valid=("sinusoidal", "rope", "none")),
    "embed_scale": BOOL,
    "input_norm": BOOL,
    "eps": POSITIVE,
}
QLEN, KLEN = Arg("int", low=0, valid=(0, 2)), Arg("int", low=0, valid=(3,))
PAD_IDX = Arg("int", low=-4, high=4, none_ok=True, valid=(-4, 3, None))


def _flax_module(name: str):
    return lambda **kw: getattr(fi, name)(**kw, rngs=nnx.Rngs(0))


def _flax_learned():
    return fi.LearnedPositions(8, 2, rngs=nnx.Rngs(0))


# name -> (call(**kwargs), {argument: Arg}, the valid kwargs the drawn argument replaces)
FUNCTIONS = {
    "fi.sinusoidal_table": (fi.sinusoidal_table, {"length": INT0, "d_model": INT1}, dict(length=3, d_model=4)),
    "tr.sinusoidal_table": (tr.sinusoidal_table, {"length": INT0, "d_model": INT1}, dict(length=3, d_model=4)),
    "fi.apply_rope": (lambda **kw: fi.apply_rope(jnp.asarray(X), jnp.arange(3), **kw), ROPE_ARGS, {}),
    "tr.apply_rope": (lambda **kw: tr.apply_rope(torch.from_numpy(X), torch.arange(3), **kw), ROPE_ARGS, {}),
    "fi.alibi_slopes": (fi.alibi_slopes, {"n_heads": INT1, "max_bias": POSITIVE}, dict(n_heads=2)),
    "tr.alibi_slopes": (tr.alibi_slopes, {"n_heads": INT1, "max_bias": POSITIVE}, dict(n_heads=2)),
    "fi.alibi_bias": (
        lambda **kw: fi.alibi_bias(slopes=np.ones(2, np.float32), **kw),
        {"q_len": QLEN, "k_len": KLEN, "causal": BOOL},
        dict(q_len=2, k_len=3),
    ),
    "tr.alibi_bias": (
        lambda **kw: tr.alibi_bias(slopes=torch.ones(2), **kw),
        {"q_len": QLEN, "k_len": KLEN, "causal": BOOL},
        dict(q_len=2, k_len=3),
    ),
    "fi.LearnedPositions": (
        lambda **kw: fi.LearnedPositions(**kw, rngs=nnx.Rngs(0)),
        {"max_len": INT1, "d_model": INT1},
        dict(max_len=4, d_model=2),
    ),
    "tr.LearnedPositions": (tr.LearnedPositions, {"max_len": INT1, "d_model": INT1}, dict(max_len=4, d_model=2)),
    "fi.LearnedPositions()": (
        lambda **kw: _flax_learned()(**kw), {"length": Arg("int", low=0, valid=(0, 4)), "offset": INT0}, dict(length=2)
    ),
    "fi.Embed": (
        lambda **kw: fi.Embed(**kw, rngs=nnx.Rngs(0)),
        {"num_embeddings": INT1, "features": INT1, "checked": BOOL, "padding_idx": PAD_IDX},
        dict(num_embeddings=4, features=2),
    ),
    "tr.Embed": (
        tr.Embed,
        {"num_embeddings": INT1, "embedding_dim": INT1, "padding_idx": PAD_IDX},
        dict(num_embeddings=4, embedding_dim=2),
    ),
    "fi.check_ids": (lambda **kw: fi.check_ids(np.zeros(3, np.int32), **kw), {"num_embeddings": INT1}, {}),
    "fi.Dropout": (fi.Dropout, {"rate": PROB, "deterministic": BOOL}, dict(rate=0.5)),
    "tr.Dropout": (tr.Dropout, {"p": PROB, "inplace": BOOL}, {}),
    "fi.LayerNorm": (fi.LayerNorm, {"num_features": INT1, "epsilon": POSITIVE, "use_bias": BOOL}, dict(num_features=4)),
    "tr.LayerNorm": (tr.LayerNorm, {"num_features": INT1, "eps": POSITIVE, "bias": BOOL}, dict(num_features=4)),
    "fi.RMSNorm": (fi.RMSNorm, {"num_features": INT1, "epsilon": POSITIVE}, dict(num_features=4)),
    "tr.RMSNorm": (tr.RMSNorm, {"num_features": INT1, "eps": POSITIVE}, dict(num_features=4)),
    "fi.encode_text": (lambda **kw: fi.encode_text("hi", fi.ByteTokenizer(), jnp.asarray(E), **kw), TEXT_ARGS, {}),
    "tr.encode_text": (
        lambda **kw: tr.encode_text("hi", tr.ByteTokenizer(), torch.from_numpy(E), **kw), TEXT_ARGS, {}
    ),
    "ByteTokenizer.encode": (
        lambda **kw: fi.ByteTokenizer().encode("hi", **kw), {"add_bos": BOOL, "add_eos": BOOL}, {}
    ),
    "batch_encode": (
        lambda **kw: fi.batch_encode(["a", "bc"], fi.ByteTokenizer(), **kw),
        {"max_len": Arg("int", low=0, none_ok=True, valid=(0, 1, None))},
        {},
    ),
    "as_tokenizer": (
        lambda **kw: fi.as_tokenizer(lambda s: [1], **kw),
        {
            "pad_id": Arg("int", low=0, none_ok=True, valid=(0, None)),
            "vocab_size": Arg("int", low=1, none_ok=True, valid=(2, None)),
        },
        {},
    ),
    "masked_token_batch": (
        lambda **kw: fi.masked_token_batch(TOKENS, **{"rng": np.random.default_rng(0), **kw}),
        {
            "vocab_size": Arg("int", low=1, valid=(10, 300)),
            "mask_prob": Arg("float", low=0.0, high=1.0, low_open=True, valid=(0.5,)),
            "mask_id": Arg("int", low=0, high=10, valid=(0, 9)),
            "first_regular_id": Arg("int", low=0, high=10, valid=(4,)),
            "pad_id": Arg("int", none_ok=True, valid=(0, None)),
            "rng": CONFIG_ARG,
        },
        dict(vocab_size=10),
    ),
    "next_token_batch": (
        lambda **kw: fi.next_token_batch(TOKENS, **kw),
        {"vocab_size": Arg("int", low=1, valid=(6, 300)), "pad_id": Arg("int", none_ok=True, valid=(0, None))},
        dict(vocab_size=10),
    ),
    "lr_schedule": (fi.lr_schedule, {"tcfg": CONFIG_ARG}, {}),
    **{
        f"{side}.{name}": (_flax_module(name) if side == "fi" else getattr(tr, name), {"config": CONFIG_ARG}, {})
        for side in ("fi", "tr")
        for name in ("MultiHeadAttention", "TransformerBlock", "TransformerInput", "Transformer")
    },
    "fi.TransformerBlock(flax_config)": (
        lambda **kw: fi.TransformerBlock(MODULE_CONFIG, **kw, rngs=nnx.Rngs(0)), {"flax_config": OPT_CONFIG_ARG}, {}
    ),
}


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_bad_arguments_of_the_public_api_are_refused_by_type(data):
    label = data.draw(st.sampled_from(sorted(FUNCTIONS)), label="function")
    call, args, base = FUNCTIONS[label]
    name, value, error = draw_bad(data, args)
    assert_refused(lambda: call(**{**base, name: value}), name, value, error)


@pytest.mark.parametrize("label", [k for k, (_, args, _) in FUNCTIONS.items() if any(a.valid for a in args.values())])
def test_valid_arguments_of_the_public_api_work(label):
    """Every listed valid value works; the twins' pure functions give the same result."""
    call, args, base = FUNCTIONS[label]
    for name, arg in args.items():
        for value in arg.valid:
            out = call(**{**base, name: value})
            twin = FUNCTIONS.get("tr." + label.removeprefix("fi."))
            if label.startswith("fi.") and twin and label.endswith(("table", "slopes", "bias", "rope")):
                want = twin[0](**{**twin[2], name: value})
                np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=ELEMENTWISE, err_msg=name)


def test_config_arguments_name_their_type():
    for module in (fi.MultiHeadAttention, fi.TransformerInput):
        with pytest.raises(TypeError, match="config='small' must be a TransformerConfig or a dict, got str"):
            module("small", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="flax_config=.* must be a FlaxConfig or None, got dict"):
        fi.TransformerInput(MODULE_CONFIG, flax_config={"dtype": "float32"}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="tcfg=None must be a TrainConfig, got NoneType"):
        ftrain.make_optimizer(fi.Transformer(MODULE_CONFIG, rngs=nnx.Rngs(0)), None)
