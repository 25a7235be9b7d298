"""flax_impl.hf against transformers: tiny random models of each family (built by transformers, every parameter
perturbed, saved to a folder) load into ours with the same hidden states, logits and gradients; ours saves back
bit-exactly to a folder transformers loads; bad folders and configs fail with one clear error.

Reference: transformers' eager attention (attn_implementation="eager"), float32, right-padded batches compared at
real positions only. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
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
    assert_rows_close,
    hf_outputs,
    loss_weights,
    make_batch,
    perturb,
    row_budgets_no_looser,
    run_ours,
    run_theirs,
)
from safetensors.numpy import load_file, save_file

import flax_impl as fi
import flax_impl.hf as fh
from flax_impl.tolerances import EXACT, GRAD_REL


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory) -> Built:
    family = request.param
    spec = SPECS[family]
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    torch.manual_seed(0)
    model_cls = getattr(transformers, spec.model_cls)
    model = model_cls._from_config(config, attn_implementation="eager", **spec.model_kwargs).eval()
    perturb(model, seed=1)
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


# Without RoPE a separate key bias b_k adds q.b_k to every score of a query row: softmax cancels it, so its exact
# gradient is zero and both sides hold only roundoff (BERT's key.bias). Those are compared with the scale of the
# same layer's query bias. (RoPE rotates b_k differently at each key position: a real gradient, compared as usual.)
_KEY_BIAS = re.compile(r"(.*)\.attention\.self\.key\.bias\Z")


def test_gradients_match_transformers(built):
    """d/dparams of sum(hidden * Wh) + sum(logits * Wl) over real positions, for every parameter."""
    theirs, ours = built.theirs_grads, built.ours_grads
    assert sorted(ours) == sorted(theirs)
    for k, g in theirs.items():
        if _KEY_BIAS.match(k):
            scale = np.abs(theirs[k.replace(".key.", ".query.")]).max()
            assert np.abs(g).max() <= GRAD_REL * scale and np.abs(ours[k]).max() <= GRAD_REL * scale, k
            continue
        scale = np.abs(g).max()
        assert scale > 0, k
        np.testing.assert_allclose(ours[k], g, rtol=0, atol=GRAD_REL * scale, err_msg=k)


# What each family's tiny model must read into our config (hf_helpers.SPECS sets the non-default values).
EXPECTED = {
    "gpt2": dict(position="learned", activation="gelu_tanh", d_ff=128, max_len=64, lm_head="tied", causal=True),
    "bert": dict(
        norm_first=False, input_norm=True, final_norm=False, type_vocab_size=2, norm_eps=1e-12, padding_idx=0,
        activation="gelu", causal=False,
    ),
    "llama": dict(
        position="rope", rope_base=500.0, rope_scale=2.0, n_kv_heads=2, qkv_bias=True, out_bias=True, mlp_bias=True,
        norm="rmsnorm", norm_eps=1e-5, mlp="gated", activation="silu", lm_head="untied", padding_idx=0,
    ),
    "mistral": dict(sliding_window=5, n_kv_heads=2, qkv_bias=False, out_bias=False, lm_head="untied"),
    "qwen2": dict(qkv_bias=True, out_bias=False, mlp_bias=False, lm_head="tied", sliding_window=None),
    "bloom": dict(position="alibi", n_heads=6, d_ff=192, input_norm=True, activation="gelu_tanh", qkv_bias=True),
    "mpt": dict(
        position="alibi", alibi_max_bias=8.0, d_ff=192, activation="gelu", qkv_bias=False, out_bias=False,
        mlp_bias=False, norm_bias=False, lm_head="untied",
    ),
}  # fmt: skip


def test_config_reads_each_family_setting(built):
    got = {k: getattr(built.cfg, k) for k in EXPECTED[built.family]}
    assert got == EXPECTED[built.family]


def test_base_model_and_head_model_checkpoints_load_alike(built, tmp_path):
    """Keys with or without the base-model prefix load the same weights; task heads and buffers the table
    ignores (BERT's MLM head, GPT-2's old causal-mask buffers) are dropped."""
    fam = fh.FAMILIES[built.family]
    tensors = load_file(built.folder / "model.safetensors")
    other = {}
    for k, v in tensors.items():  # a head model's checkpoint becomes its base model's, and the other way round
        if k.startswith(fam.prefix):
            other[k.removeprefix(fam.prefix)] = v
        elif k.startswith("lm_head."):
            other[k] = v
        else:
            other[fam.prefix + k] = v
    extra = {"bert": "bert.cls.predictions.bias", "gpt2": "h.0.attn.masked_bias"}.get(built.family)
    if extra:
        other[extra] = np.zeros((3,), np.float32)
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
# The tables against the installed transformers.


def _class_defaults(cls, prefix: str = "") -> dict:
    """config.json key (dotted into sub-configs such as MPT's attn_config) -> the config class's default."""
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in base:
            continue
        sub = getattr(cls, "sub_configs", {}).get(f.name)
        if sub is not None:
            out.update(_class_defaults(sub, prefix + f.name + "."))
        else:
            out[prefix + f.name] = f.default
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_table_defaults_and_coverage_match_transformers(family):
    """Every Field/Require default is the config class's own, transformers' defaults pass every Require, and
    every field of the class is mapped, refused, read by a converter, or listed as changing neither the weights
    nor the eval-mode forward."""
    fam = fh.FAMILIES[family]
    defaults = _class_defaults(getattr(transformers, SPECS[family].config_cls))
    named = {e.hf: e.default for e in (*fam.config, *fam.require)}
    for f in fam.config:
        named.update({key: default for key, (default, _) in f.convert.reads.items()})
    for key, default in named.items():
        if key in defaults:
            assert default == defaults[key], (
                f"{family} {key}: table default {default!r}, transformers {defaults[key]!r}"
            )
    values = {**{k: v for k, v in defaults.items()}, **named}
    for req in fam.require:
        assert req.ok(req.default, values), f"{family} refuses transformers' default {req.hf}={req.default!r}"
    paths = set(named) | set(fam.ignored_hf)
    uncovered = [k for k in defaults if not any(p == k or p.startswith(k + ".") for p in paths)]
    assert uncovered == [], f"{family}: transformers config fields neither mapped, refused nor ignored"


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
        {"rope_parameters": {"rope_type": "yarn"}, "head_dim": 16, "hidden_act": "quick_gelu"},
        ["rope_parameters.rope_type='yarn'", "head_dim=16", "hidden_act='quick_gelu'"],
    ),
    "mistral": ({"head_dim": 4}, ["head_dim=4"]),
    "qwen2": (
        {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention", "sliding_attention"]},
        ["sliding_window=4", "mix full and sliding-window"],
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
}


def test_unsupported_options_fail_before_weights_are_read(built, tmp_path):
    changes, named = UNSUPPORTED[built.family]
    folder = _copy(built, tmp_path / "m", changes)
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")  # never read: the config fails first
    with pytest.raises(ValueError, match="does not implement") as err:
        fh.from_pretrained(folder)
    for text in named:
        assert text in str(err.value)


def test_transformers_4_rope_keys_read_the_same():
    """transformers 4 wrote rope_theta and rope_scaling {"type": ...} at the top level."""
    new = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64)
    old = dict(new, rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    new["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}
    cfg = fh.convert.config_from_hf(old)[1]
    assert cfg == fh.convert.config_from_hf(new)[1]
    assert (cfg.rope_base, cfg.rope_scale) == (500.0, 2.0)
    # A factor under rope_type "default" is not a linear scale.
    plain = fh.convert.config_from_hf(dict(new, rope_parameters={"rope_type": "default", "factor": 4.0}))[1]
    assert (plain.rope_base, plain.rope_scale) == (10_000.0, 1.0)


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


def test_bfloat16_checkpoints_read_and_write_exactly(tmp_path):
    """numpy has no bfloat16: a bf16 checkpoint is read exactly (widened to float32), and a bf16 model writes BF16
    tensors that transformers loads unchanged."""
    spec = SPECS["gpt2"]
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    model = getattr(transformers, spec.model_cls)._from_config(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    _, ours = fh.from_pretrained(tmp_path / "bf16")
    got = fh.to_hf_state_dict(ours, "gpt2")
    for k, p in model.named_parameters():
        assert got[k].dtype == np.float32 and np.array_equal(got[k], p.detach().float().numpy()), k
    unrolled16 = fi.FlaxConfig(param_dtype="bfloat16", scan_layers=False)  # per-layer parameters, not stacked
    _, ours16 = fh.from_pretrained(tmp_path / "bf16", flax_config=unrolled16)
    fh.save_pretrained(ours16, tmp_path / "out", model_type="gpt2")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    want = dict(model.named_parameters())
    for k, p in reloaded.named_parameters():
        assert torch.equal(p, want[k]), k


def test_save_does_not_require_fields_that_cannot_change_the_model():
    """Dropout rates, RoPE settings of a non-RoPE model, a parallel-residual option without parallel residuals:
    written where the family has a place, never a reason to refuse."""
    cfg = fh.convert.config_from_hf({"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1})[1]
    cfg = cfg.replace(dropout=0.3, rope_base=123.0, parallel_shared_norm=False)
    hf = fh.convert.config_to_hf(fh.FAMILIES["gpt2"], cfg)
    assert hf["resid_pdrop"] == 0.3 and hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    with pytest.raises(
        ValueError, match=r"cannot represent.*\n  norm='rmsnorm' \(a gpt2 config.json gives 'layernorm'\)"
    ):
        fh.convert.config_to_hf(fh.FAMILIES["gpt2"], cfg.replace(norm="rmsnorm"))


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
    cfg = built.cfg.replace(position="sinusoidal", embed_scale=True)
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"model_type='{built.family}' cannot represent") as err:
        fh.save_pretrained(model, tmp_path / "out", model_type=built.family)
    assert "position='sinusoidal'" in str(err.value) and "embed_scale=True" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"model_type='nope' is not supported"):
        fh.save_pretrained(built.ours, tmp_path / "out", model_type="nope")
