"""flax_impl.hf against transformers: tiny random models of each family (built by transformers, every parameter
perturbed, saved to a folder) load into ours with the same hidden states, logits and gradients; ours saves back
bit-exactly to a folder transformers loads; bad folders and configs fail with one clear error.

Reference: transformers' eager attention (attn_implementation="eager"), float32, a batch with a right-padded and
a left-padded row, compared at real positions only. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_helpers import (
    FAMILIES,
    SPECS,
    Built,
    assert_grads_close,
    assert_rows_close,
    build_hf,
    hf_outputs,
    loss_weights,
    make_batch,
    row_budgets_no_looser,
    run_ours,
    run_theirs,
)
from safetensors.numpy import load_file, save_file

import flax_impl as fi
import flax_impl.hf as fh
from flax_impl.tolerances import EXACT


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory) -> Built:
    family = request.param
    spec = SPECS[family]
    model = build_hf(spec)
    folder = tmp_path_factory.mktemp(f"hf-{family}")
    model.save_pretrained(folder)
    cfg, ours = fh.from_pretrained(folder)
    batch = make_batch(spec, cfg.vocab_size)
    wh, wl = loss_weights(cfg, batch.mask)
    theirs_out, theirs_grads = run_theirs(model, spec, batch, wh, wl)
    ours_out, ours_grads = run_ours(ours, family, spec, batch, wh, wl)
    return Built(family, model, folder, cfg, ours, batch, theirs_out, theirs_grads, ours_out, ours_grads)


def test_forward_matches_transformers(built):
    """Hidden states and logits at every real position, each row within HF_FORWARD_REL of its largest |value|."""
    real = built.batch.real
    assert np.abs(built.theirs_out[0][real]).max() > 0.5  # non-trivial outputs
    for name, ours, theirs in zip(("hidden", "logits"), built.ours_out, built.theirs_out, strict=True):
        if theirs is not None:
            assert_rows_close(ours[real], theirs[real], msg=f"{built.family} {name}")
            row_budgets_no_looser(theirs[real])  # and no row's budget is looser than the absolute 1e-4 it replaced


def test_gradients_match_transformers(built):
    """d/dparams of sum(hidden * Wh) + sum(logits * Wl) over real positions, for every parameter."""
    assert_grads_close(built.family, built.cfg, built.theirs_grads, built.ours_grads)


# What each family's tiny model must read into our config (hf_helpers.SPECS sets the non-default values).
EXPECTED = {
    "gpt2": dict(position="learned", activation="gelu_tanh", d_ff=128, max_len=64, lm_head="tied", causal=True),
    "bert": dict(
        norm_first=False, input_norm=True, final_norm=False, type_vocab_size=2, norm_eps=1e-12, padding_idx=0,
        activation="gelu", causal=False,
    ),
    "llama": dict(
        position="rope", rope_base=500_000.0, rope_type="llama3", rope_scale=8.0, rope_original_max_len=64,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, n_kv_heads=2, qkv_bias=True, out_bias=True,
        mlp_bias=True, norm="rmsnorm", norm_eps=1e-5, mlp="gated", activation="silu", lm_head="untied", padding_idx=0,
    ),
    "mistral": dict(sliding_window=5, n_kv_heads=2, qkv_bias=False, out_bias=False, lm_head="untied"),
    "qwen2": dict(qkv_bias=True, out_bias=False, mlp_bias=False, lm_head="tied", sliding_window=5,
                  layer_types=("full_attention", "sliding_attention")),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
                    n_kv_heads=2, lm_head="untied"),
    "qwen3": dict(head_dim=16, qk_norm="rmsnorm", qkv_bias=True, out_bias=True, mlp_bias=False, sliding_window=5,
                  layer_types=("full_attention", "sliding_attention"), lm_head="untied"),
    "gemma2": dict(
        head_dim=16, query_pre_attn_scalar=24.0, attn_logit_softcap=5.0, final_logit_softcap=3.0, sliding_window=5,
        layer_types=("sliding_attention", "full_attention"), branch_norm="sandwich", norm_offset=1.0,
        embed_scale=True, activation="gelu_tanh", qk_norm="none",
    ),
    "gemma3_text": dict(
        head_dim=16, n_kv_heads=1, query_pre_attn_scalar=24.0, attn_logit_softcap=None, final_logit_softcap=None,
        qk_norm="rmsnorm", norm_offset=1.0, branch_norm="sandwich", rope_base=1e6, rope_scale=8.0,
        rope_local_base=1e4, layer_types=("sliding_attention", "full_attention"), sliding_window=5,
    ),
    "bloom": dict(position="alibi", n_heads=6, d_ff=192, input_norm=True, activation="gelu_tanh", qkv_bias=True),
    "mpt": dict(
        position="alibi", alibi_max_bias=8.0, d_ff=192, activation="gelu", qkv_bias=False, out_bias=False,
        mlp_bias=False, norm_bias=False, lm_head="untied",
    ),
    "gpt_neox": dict(
        rope_fraction=0.25, rope_style="half", parallel_residual=True, parallel_shared_norm=False, qkv_bias=True,
        mlp_bias=True, activation="gelu", lm_head="untied",
    ),
    "gptj": dict(
        rope_fraction=0.5, rope_style="interleaved", parallel_residual=True, parallel_shared_norm=True,
        qkv_bias=False, out_bias=False, mlp_bias=True, lm_head="untied", lm_head_bias=True, activation="gelu_tanh",
    ),
    "codegen": dict(rope_fraction=0.5, rope_style="interleaved", parallel_residual=True, lm_head_bias=True),
    "falcon": dict(
        n_kv_heads=2, parallel_residual=True, parallel_shared_norm=False, qkv_bias=True, mlp_bias=True,
        activation="gelu", lm_head="tied", d_ff=128,
    ),
    "phi": dict(
        rope_fraction=4 / 12, parallel_residual=True, parallel_shared_norm=True, qkv_bias=True, lm_head_bias=True,
        activation="gelu_tanh",
    ),
    "phi3": dict(
        rope_fraction=0.75, sliding_window=5, n_kv_heads=2, norm="rmsnorm", mlp="gated", padding_idx=0,
        qkv_bias=False, rope_type="longrope", rope_original_max_len=8, rope_scale=8.0,
        rope_short_factor=(1.0, 1.5, 2.0), rope_long_factor=(1.5, 3.0, 6.0),
    ),
    "stablelm": dict(
        rope_fraction=0.25, norm="layernorm", norm_bias=True, mlp="gated", qkv_bias=True, out_bias=False,
        mlp_bias=False, parallel_residual=False, padding_idx=0,
    ),
    "opt": dict(
        position="learned", positions_from="mask", position_offset=2, max_len=66, norm_first=True, final_norm=True,
        activation="relu", padding_idx=1, lm_head="tied",
    ),
    "gpt_bigcode": dict(position="learned", n_kv_heads=1, activation="gelu_tanh", lm_head="tied", d_ff=128),
    "roberta": dict(
        positions_from="tokens", position_offset=2, padding_idx=1, type_vocab_size=1, norm_first=False,
        norm_eps=1e-5, max_len=64, causal=False,
    ),
    "xlm-roberta": dict(positions_from="tokens", position_offset=2, padding_idx=1, type_vocab_size=1),
    "distilbert": dict(
        position="learned", norm_first=False, input_norm=True, final_norm=False, type_vocab_size=0, norm_eps=1e-12,
        padding_idx=0, causal=False,
    ),
    "gemma": dict(
        norm="rmsnorm", norm_offset=1.0, embed_scale=True, mlp="gated", activation="gelu_tanh", n_kv_heads=1,
        norm_eps=1e-6, lm_head="tied", padding_idx=0, head_dim=16,
    ),
    "starcoder2": dict(
        norm="layernorm", norm_bias=True, mlp="plain", activation="gelu_tanh", sliding_window=6, qkv_bias=True,
        mlp_bias=True, n_kv_heads=2, lm_head="tied",
    ),
}  # fmt: skip


def test_config_reads_each_family_setting(built):
    got = {k: getattr(built.cfg, k) for k in EXPECTED[built.family]}
    assert got == EXPECTED[built.family]


# A task head or buffer each family's table drops, as a checkpoint key relative to the base model.
_DROPPED = {
    "bert": "cls.predictions.bias", "gpt2": "h.0.attn.masked_bias", "gpt_neox": "layers.0.attention.masked_bias",
    "codegen": "h.0.attn.causal_mask", "distilbert": "vocab_projector.bias", "roberta": "lm_head.bias",
    "xlm-roberta": "pooler.dense.bias",
}  # fmt: skip


def test_base_model_and_head_model_checkpoints_load_alike(built, tmp_path):
    """Keys with or without the base-model prefix load the same weights; task heads and buffers the table
    ignores (BERT's MLM head, GPT-2's old causal-mask buffers) are dropped."""
    fam = fh.FAMILIES[built.family]
    tensors = load_file(built.folder / "model.safetensors")
    other = {}
    for k, v in tensors.items():  # a head model's checkpoint becomes its base model's, and the other way round
        if fam.save_prefix:
            other[k.removeprefix(fam.prefix)] = v  # the head's keys (lm_head, GPT-NeoX's embed_out) as they are
        else:
            other[fam.prefix + k] = v
    if built.family in _DROPPED:
        other[_DROPPED[built.family]] = np.zeros((3,), np.float32)
    folder = _copy(built, tmp_path / "m")
    save_file(other, folder / "model.safetensors", metadata={"format": "pt"})
    _, ours = fh.from_pretrained(folder)
    want, got = fi.to_numpy_state_dict(built.ours), fi.to_numpy_state_dict(ours)
    assert all(np.array_equal(got[k], v) for k, v in want.items())


def test_round_trip_is_bit_exact(built, tmp_path):
    fh.save_pretrained(built.ours, tmp_path, model_type=built.family)
    original, saved = load_file(built.folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for k, v in original.items():
        assert saved[k].dtype == v.dtype and np.array_equal(saved[k], v), k


def test_saved_folder_loads_in_transformers(built, tmp_path):
    spec = SPECS[built.family]
    fh.save_pretrained(built.ours, tmp_path, model_type=built.family)
    auto = transformers.AutoModelForCausalLM if spec.lm else transformers.AutoModel
    reloaded = auto.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == spec.model_cls
    with torch.no_grad():
        got = hf_outputs(reloaded, spec, built.batch)
    for want, g in zip(built.theirs_out, got, strict=True):
        if want is not None:
            np.testing.assert_allclose(g.numpy(), want, rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _copy(built: Built, dst: Path, changes: dict | None = None) -> Path:
    """A copy of the family's folder with `changes` merged into config.json (nested dicts merged key by key)."""
    shutil.copytree(built.folder, dst)
    path = dst / "config.json"
    path.write_text(json.dumps(_merge(json.loads(path.read_text()), changes or {})))
    return dst


def test_unsupported_model_type(built, tmp_path):
    folder = _copy(built, tmp_path / "m", {"model_type": "t5"})
    with pytest.raises(ValueError, match=r"model_type='t5' is not supported; supported: \['bert', 'bloom'"):
        fh.from_pretrained(folder)


# config.json changes we do not implement -> what the one error must name (all of them).
UNSUPPORTED = {
    "gpt2": (
        {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True},
        ["scale_attn_by_inverse_layer_idx=True", "reorder_and_upcast_attn=True"],
    ),
    "bert": (
        {"is_decoder": True, "position_embedding_type": "relative_key"},
        ["is_decoder=True", "position_embedding_type='relative_key'"],
    ),
    "llama": (
        {"rope_parameters": {"rope_type": "yarn", "mscale": 0.7, "mscale_all_dim": 1.0}, "hidden_act": "quick_gelu"},
        ["rope_parameters.mscale=0.7", "rope_parameters.mscale_all_dim=1.0", "hidden_act='quick_gelu'"],
    ),
    "mistral": ({"rope_parameters": {"rope_type": "proportional", "mscale": 1.0}},
                ["rope_parameters.rope_type='proportional'", "rope_parameters.mscale=1.0"]),
    "qwen2": (
        {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention", "chunked_attention"]},
        ["sliding_window=4", "chunked_attention"],
    ),
    "bloom": ({"apply_residual_connection_post_layernorm": True}, ["apply_residual_connection_post_layernorm=True"]),
    "mpt": (
        {"attn_config": {"clip_qkv": 8.0, "alibi": False, "qk_ln": True, "softmax_scale": 0.5, "alibi_bias_max": 4}},
        [
            "attn_config.clip_qkv=8.0",
            "attn_config.alibi=False",
            "attn_config.qk_ln=True",
            "attn_config.softmax_scale=0.5",
            "attn_config.alibi_bias_max=4",
        ],
    ),
    "gpt_neox": ({"rope_parameters": {"rope_type": "yarn"}}, ["rope_parameters.rope_type='yarn'"]),
    "gptj": ({"tie_word_embeddings": True, "rotary_dim": 5}, ["tie_word_embeddings=True", "rotary_dim=5"]),
    "codegen": ({"n_embd": 34, "n_head": 2, "rotary_dim": 18}, ["n_embd=34", "rotary_dim=18"]),
    "falcon": ({"alibi": True, "parallel_attn": False}, ["alibi=True", "num_ln_in_parallel_attn=2"]),
    "phi": ({"head_dim": 4, "tie_word_embeddings": True}, ["head_dim=4", "tie_word_embeddings=True"]),
    "phi3": ({"rope_parameters": {"rope_type": "llama3"}}, ["rope_parameters.rope_type='llama3'"]),
    "granite": ({"rope_parameters": {"partial_rotary_factor": 0.5}}, ["partial_rotary_factor=0.5"]),
    "qwen3": ({"rope_parameters": {"partial_rotary_factor": 0.5}, "hidden_act": "quick_gelu"},
              ["partial_rotary_factor=0.5", "hidden_act='quick_gelu'"]),
    "gemma2": ({"use_bidirectional_attention": True, "layer_types": ["sliding_attention", "chunked_attention"]},
               ["use_bidirectional_attention=True", "chunked_attention"]),
    "gemma3_text": ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
                    ["rope_parameters.sliding_attention.rope_type='linear'"]),
    "stablelm": ({"qk_layernorm": True, "rope_parameters": {"rope_type": "dynamic"}},
                 ["qk_layernorm=True", "rope_type='dynamic'"]),
    "opt": ({"word_embed_proj_dim": 16, "layer_norm_elementwise_affine": False},
            ["word_embed_proj_dim=16", "layer_norm_elementwise_affine=False"]),
    "gpt_bigcode": ({"scale_attn_weights": False, "add_cross_attention": True},
                    ["scale_attn_weights=False", "add_cross_attention=True"]),
    "roberta": ({"is_decoder": True, "pad_token_id": None}, ["is_decoder=True", "pad_token_id=None"]),
    "xlm-roberta": ({"add_cross_attention": True}, ["add_cross_attention=True"]),
    "distilbert": ({"activation": "quick_gelu"}, ["activation='quick_gelu'"]),
    "gemma": ({"rope_parameters": {"partial_rotary_factor": 0.5}, "use_bidirectional_attention": True},
              ["partial_rotary_factor=0.5", "use_bidirectional_attention=True"]),
    "starcoder2": ({"rope_parameters": {"rope_type": "llama3"}}, ["rope_type='llama3'"]),
}  # fmt: skip


def test_unsupported_options_fail_before_weights_are_read(built, tmp_path):
    changes, named = UNSUPPORTED[built.family]
    folder = _copy(built, tmp_path / "m", changes)
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")  # never read: the config fails first
    with pytest.raises(ValueError, match="does not implement") as err:
        fh.from_pretrained(folder)
    for text in named:
        assert text in str(err.value)


def test_missing_files(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a local folder"):
        fh.from_pretrained(tmp_path / "absent")
    folder = _copy(built, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        fh.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        fh.from_pretrained(folder)


def test_sharded_checkpoint_loads_the_same_weights(built, tmp_path):
    built.hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, ours = fh.from_pretrained(tmp_path)
    want, got = fi.to_numpy_state_dict(built.ours), fi.to_numpy_state_dict(ours)
    for k, v in want.items():
        assert np.array_equal(got[k], v), k
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are not in"):
        fh.from_pretrained(tmp_path)


def test_mismatched_checkpoint_lists_every_key_in_one_error(built, tmp_path):
    folder = _copy(built, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    dropped, bent = names[0], names[-1]
    del tensors[dropped]
    tensors[bent] = np.concatenate([tensors[bent], tensors[bent]], axis=0)
    tensors["extra.weight"] = np.zeros((3,), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        fh.from_pretrained(folder)
    msg = str(err.value)
    prefix = fh.FAMILIES[built.family].prefix
    assert f"missing key: {dropped.removeprefix(prefix)}" in msg
    assert "unexpected key: extra.weight" in msg
    assert f"shape mismatch: {bent.removeprefix(prefix)}" in msg


def test_save_refuses_a_config_the_family_cannot_hold(built, tmp_path):
    flip = not built.cfg.embed_scale
    cfg = built.cfg.replace(position="sinusoidal", embed_scale=flip)
    model = nnx.eval_shape(lambda: fi.Transformer(cfg, rngs=nnx.Rngs(0)))  # refused before any weight is read
    with pytest.raises(ValueError, match=rf"model_type='{built.family}' cannot represent") as err:
        fh.save_pretrained(model, tmp_path / "out", model_type=built.family)
    assert "position='sinusoidal'" in str(err.value) and f"embed_scale={flip}" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"model_type='nope' is not supported"):
        fh.save_pretrained(built.ours, tmp_path / "out", model_type="nope")
