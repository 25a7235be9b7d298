"""EncoderConfig: dict round trip and validation of every field."""

import subprocess
import sys

import pytest

from flax_impl.config import EncoderConfig


def test_dict_round_trip():
    cfg = EncoderConfig(vocab_size=123, d_model=64, n_heads=4, position="rope", rope_style="interleaved", causal=True)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert EncoderConfig.from_dict(EncoderConfig().to_dict()) == EncoderConfig()


def test_defaults_are_the_lesson_encoder():
    cfg = EncoderConfig()
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers, cfg.dropout) == (512, 8, 2048, 6, 0.1)
    assert cfg.attention_dropout == cfg.dropout
    assert cfg.layer_norm_eps == 1e-5  # torch's default, not Flax's 1e-6
    assert cfg.head_dim == 64


def test_attention_dropout_defaults_to_dropout_but_can_differ():
    assert EncoderConfig(dropout=0.3).attention_dropout == 0.3
    assert EncoderConfig(dropout=0.3, attention_dropout=0.0).attention_dropout == 0.0


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("vocab_size", 0, "vocab_size=0"),
        ("d_model", -8, "d_model=-8"),
        ("n_heads", 0, "n_heads=0"),
        ("d_ff", 1.5, "d_ff=1.5"),
        ("n_layers", 0, "n_layers=0"),
        ("scan_unroll", 0, "scan_unroll=0"),
        ("scan_unroll", True, "scan_unroll=True"),
        ("max_len", 0, "max_len=0"),
        ("dropout", 1.5, "dropout=1.5"),
        ("dropout", -0.1, "dropout=-0.1"),
        ("attention_dropout", 2.0, "attention_dropout=2.0"),
        ("position", "absolute", "position='absolute'"),
        ("rope_style", "neox", "rope_style='neox'"),
        ("activation", "swish", "activation='swish'"),
        ("dtype", "float8", "dtype='float8'"),
        ("param_dtype", "int8", "param_dtype='int8'"),
        ("layer_norm_eps", 0.0, "layer_norm_eps=0.0"),
        ("rope_base", 1.0, "rope_base=1.0"),
        ("rope_fraction", 0.0, "rope_fraction=0.0"),
        ("rope_scale", 0.0, "rope_scale=0.0"),
        ("padding_idx", 10_000, "padding_idx=10000"),
    ],
)
def test_invalid_field_names_field_and_value(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(".", r"\.")):
        EncoderConfig(**{field: value})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="n_heads=6 must divide d_model=512"):
        EncoderConfig(n_heads=6)


def test_rope_needs_even_rotated_width():
    with pytest.raises(ValueError, match="rotated width 3"):
        EncoderConfig(d_model=12, n_heads=4, position="rope")  # head_dim 3
    EncoderConfig(d_model=12, n_heads=4, position="sinusoidal")  # fine without RoPE
    with pytest.raises(ValueError, match="rotated width 5"):
        EncoderConfig(d_model=40, n_heads=4, position="rope", rope_fraction=0.5)  # 0.5 * 10


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown EncoderConfig keys \['n_head'\]"):
        EncoderConfig.from_dict({"n_head": 8})
    with pytest.raises(ValueError, match="unknown EncoderConfig keys"):
        EncoderConfig().replace(depth=3)


def test_frozen():
    with pytest.raises(AttributeError):
        EncoderConfig().d_model = 3


def test_config_module_imports_neither_jax_nor_torch():
    code = "import sys, flax_impl.config; print(any(m in sys.modules for m in ('jax', 'torch', 'flax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
