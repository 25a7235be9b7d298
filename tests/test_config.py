"""TransformerConfig and FlaxConfig: dict round trip, validation of every field, the split between them."""

import subprocess
import sys

import pytest

from flax_impl.config import FlaxConfig, TransformerConfig


def test_dict_round_trip():
    cfg = TransformerConfig(
        vocab_size=123, d_model=64, n_heads=4, position="rope", rope_style="interleaved", causal=True
    )
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    assert TransformerConfig.from_dict(TransformerConfig().to_dict()) == TransformerConfig()


def test_defaults_are_the_lesson_encoder():
    cfg = TransformerConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout) == (512, 8, 2048, 6, 0.1)
    assert cfg.attention_dropout == cfg.dropout
    assert cfg.norm_eps == 1e-5  # torch's default, not Flax's 1e-6
    assert cfg.head_dim == 64


def test_attention_dropout_defaults_to_dropout_but_can_differ():
    assert TransformerConfig(dropout=0.3).attention_dropout == 0.3
    assert TransformerConfig(dropout=0.3, attention_dropout=0.0).attention_dropout == 0.0


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("vocab_size", 0, "vocab_size=0"),
        ("d_model", -8, "d_model=-8"),
        ("n_heads", 0, "n_heads=0"),
        ("d_ff", 1.5, "d_ff=1.5"),
        ("n_layers", 0, "n_layers=0"),
        ("max_len", 0, "max_len=0"),
        ("dropout", 1.5, "dropout=1.5"),
        ("dropout", -0.1, "dropout=-0.1"),
        ("attention_dropout", 2.0, "attention_dropout=2.0"),
        ("position", "absolute", "position='absolute'"),
        ("rope_style", "neox", "rope_style='neox'"),
        ("activation", "swish", "activation='swish'"),
        ("norm_eps", 0.0, "norm_eps=0.0"),
        ("rope_base", 1.0, "rope_base=1.0"),
        ("rope_fraction", 0.0, "rope_fraction=0.0"),
        ("rope_scale", 0.0, "rope_scale=0.0"),
        ("padding_idx", 10_000, "padding_idx=10000"),
    ],
)
def test_invalid_field_names_field_and_value(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        TransformerConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("scan_unroll", 0, "scan_unroll=0"),
        ("scan_unroll", True, "scan_unroll=True"),
        ("dtype", "float8", "dtype='float8'"),
        ("param_dtype", "int8", "param_dtype='int8'"),
        ("attention_impl", "flash", "attention_impl='flash'"),
    ],
)
def test_invalid_flax_field_names_field_and_value(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        FlaxConfig(**{field: value})


@pytest.mark.parametrize("field", ["scan_layers", "remat"])
def test_flax_switches_must_be_bool(field):
    with pytest.raises(TypeError, match=f"{field}='no' must be a bool"):
        FlaxConfig(**{field: "no"})


def test_architecture_and_flax_settings_are_apart():
    arch = {f for f in TransformerConfig().to_dict()}
    flax_only = {f for f in FlaxConfig().to_dict()}
    assert not arch & flax_only
    assert FlaxConfig.from_dict(FlaxConfig(dtype="bfloat16").to_dict()) == FlaxConfig(dtype="bfloat16")
    with pytest.raises(ValueError, match=r"\['scan_layers'\] are Flax execution settings"):
        TransformerConfig.from_dict({"d_model": 64, "scan_layers": False})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="n_heads=6 must divide d_model=512"):
        TransformerConfig(n_heads=6)


def test_rope_needs_even_rotated_width():
    with pytest.raises(ValueError, match="rotated width 3"):
        TransformerConfig(d_model=12, n_heads=4, position="rope")  # head_dim 3
    TransformerConfig(d_model=12, n_heads=4, position="sinusoidal")  # fine without RoPE
    with pytest.raises(ValueError, match="rotated width 5"):
        TransformerConfig(d_model=40, n_heads=4, position="rope", rope_fraction=0.5)  # 0.5 * 10


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown TransformerConfig keys \['n_head'\]"):
        TransformerConfig.from_dict({"n_head": 8})
    with pytest.raises(ValueError, match="unknown TransformerConfig keys"):
        TransformerConfig().replace(depth=3)


def test_frozen():
    with pytest.raises(AttributeError):
        TransformerConfig().d_model = 3


def test_config_module_imports_neither_jax_nor_torch():
    code = "import sys, flax_impl.config; print(any(m in sys.modules for m in ('jax', 'torch', 'flax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "changes, error, words",
    [
        (dict(n_kv_heads=3), ValueError, "n_kv_heads=3 must divide n_heads=8"),
        (dict(n_kv_heads=0), ValueError, "n_kv_heads=0"),
        (dict(norm="batchnorm"), ValueError, "norm='batchnorm'"),
        (dict(mlp="moe"), ValueError, "mlp='moe'"),
        (dict(lm_head="shared"), ValueError, "lm_head='shared'"),
        (dict(lm_head_bias=True), ValueError, "lm_head_bias=True needs lm_head='untied'"),
        (dict(sliding_window=4), ValueError, "sliding_window=4 needs causal=True"),
        (dict(sliding_window=0, causal=True), ValueError, "sliding_window=0"),
        (dict(type_vocab_size=-1), ValueError, "type_vocab_size=-1"),
        (dict(alibi_max_bias=0.0), ValueError, "alibi_max_bias=0.0"),
        (dict(alibi_max_bias=float("inf")), ValueError, "alibi_max_bias=inf"),
        (dict(parallel_residual=True, norm_first=False), ValueError, "parallel_residual=True needs norm_first=True"),
        (dict(qkv_bias="yes"), TypeError, "qkv_bias='yes' must be a bool"),
        (dict(causal="no"), TypeError, "causal='no' must be a bool"),
        (dict(norm_first=0), TypeError, "norm_first=0 must be a bool"),
        (dict(padding_idx=True), TypeError, "padding_idx=True must be an integer in [0, 10000) or None, got bool"),
        (dict(norm_eps=float("inf")), ValueError, "norm_eps=inf must be a finite number"),
        (dict(norm_eps=float("nan")), ValueError, "norm_eps=nan must be a finite number"),
        (dict(rope_base="10000"), TypeError, "rope_base='10000' must be a finite number > 1, got str"),
        (dict(rope_scale=None), TypeError, "rope_scale=None must be a finite number > 0, got NoneType"),
    ],
)
def test_decoder_fields_are_checked(changes, error, words):
    pattern = words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace(".", r"\.")
    with pytest.raises(error, match=pattern):
        TransformerConfig(**changes)


def test_bias_switches_and_kv_heads_follow_their_defaults():
    cfg = TransformerConfig(bias=False, qkv_bias=True)
    assert (cfg.qkv_bias, cfg.out_bias, cfg.mlp_bias, cfg.norm_bias) == (True, False, False, False)
    assert cfg.replace(bias=True).out_bias is True and cfg.replace(bias=True).qkv_bias is True
    assert TransformerConfig().n_kv_heads == 8 and TransformerConfig().replace(n_heads=4).n_kv_heads == 4
    assert TransformerConfig(n_kv_heads=2).replace(n_heads=4).n_kv_heads == 2
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg


ROPE = dict(position="rope", causal=True)
LONGROPE = dict(rope_type="longrope", rope_original_max_len=8, **ROPE)


@pytest.mark.parametrize(
    "changes, error, words",
    [
        (dict(d_model=30, n_heads=4), ValueError, "n_heads=4 must divide d_model=30 (or set head_dim)"),
        (dict(head_dim=0), ValueError, "head_dim=0 must be an integer >= 1 or None"),
        (dict(qk_norm="l2"), ValueError, "qk_norm='l2' is not one of"),
        (dict(query_pre_attn_scalar=4, attention_multiplier=0.1), ValueError, "both set the attention scale"),
        (dict(attn_logit_softcap=0.0), ValueError, "attn_logit_softcap=0.0 must be a finite number > 0"),
        (dict(n_layers=2, layer_types=["full_attention"]), ValueError, "of length 2 or None (one entry per layer)"),
        (dict(n_layers=2, layer_types="full_attention"), TypeError, "layer_types='full_attention' must be a list"),
        (dict(n_layers=1, causal=True, layer_types=["sliding_attention"]), ValueError, "set sliding_window"),
        (dict(n_layers=2, rope_layers=[True, 1]), TypeError, "rope_layers=[True, 1] must be a list of bools"),
        (dict(rope_type="ntk"), ValueError, "rope_type='ntk' is not one of"),
        (dict(rope_type="yarn", **ROPE), ValueError, "rope_type='yarn' needs rope_original_max_len"),
        (dict(LONGROPE), ValueError, "rope_type='longrope' needs rope_short_factor: one factor per rotated pair, 32"),
        (dict(LONGROPE, rope_short_factor=[1.0] * 32, rope_long_factor=[2.0] * 31), ValueError, "got 31"),
        (dict(rope_long_factor=[1.0]), ValueError, "rope_long_factor=[1.0] must be None unless rope_type='longrope'"),
        (dict(rope_short_factor=[1.0, -2.0]), ValueError, "entry 1: entry=-2.0 must be a finite number > 0"),
        (dict(rope_type="llama3", rope_original_max_len=8, rope_low_freq_factor=4.0), ValueError,
         "rope_high_freq_factor=4.0 > rope_low_freq_factor=4.0"),
        (dict(rope_type="dynamic", rope_original_max_len=8, d_model=16, n_heads=8), ValueError,
         "rotated width 2 must be > 2"),
        (dict(rope_attention_factor=1.2), ValueError, "rope_attention_factor=1.2 must be None unless rope_type"),
        (dict(rope_local_base=1.0), ValueError, "rope_local_base=1.0 must be a finite number > 1"),
    ],
)  # fmt: skip
def test_attention_and_rope_fields_are_checked(changes, error, words):
    pattern = words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace(".", r"\.")
    with pytest.raises(error, match=pattern):
        TransformerConfig(**changes)


def test_head_dim_follows_d_model_over_n_heads_unless_set():
    cfg = TransformerConfig(d_model=64, n_heads=4)
    assert cfg.head_dim == 16 and cfg.replace(d_model=128).head_dim == 32 and cfg.replace(n_heads=8).head_dim == 8
    own = TransformerConfig(d_model=30, n_heads=4, head_dim=12)  # N need not divide D when H is given
    assert own.head_dim == 12 and own.replace(d_model=40).head_dim == 12
    gemma = TransformerConfig(n_layers=2, causal=True, sliding_window=4, layer_types=["sliding_attention"] * 2,
                              rope_layers=[False, True])  # fmt: skip
    assert gemma.layer_types == ("sliding_attention",) * 2 and gemma.rope_layers == (False, True)
    assert TransformerConfig.from_dict(gemma.to_dict()) == gemma and hash(gemma) == hash(gemma.replace())
