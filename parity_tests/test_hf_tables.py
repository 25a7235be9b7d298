"""The family tables against the installed transformers and without a model: every default is the config
class's own and every field of the class is mapped, refused or listed as changing nothing; older config keys read
as transformers reads them; what a save writes and refuses; bfloat16 checkpoints. The per-family parity proof is
parity_tests/test_hf.py; the registration of a user's table is parity_tests/test_hf_families.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers
from hf_helpers import FAMILIES, SPECS

import flax_impl as fi
import flax_impl.hf as fh

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


# transformers defaults that a table refuses, each for its reason.
REFUSED_DEFAULTS: set[tuple[str, str]] = set()


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
        refused = (family, req.hf) in REFUSED_DEFAULTS
        assert req.ok(values[req.hf], values) != refused, f"{family}: transformers' default {req.hf}={req.default!r}"
    paths = set(named) | set(fam.ignored_hf)
    uncovered = [k for k in defaults if not any(p == k or p.startswith(k + ".") for p in paths)]
    assert uncovered == [], f"{family}: transformers config fields neither mapped, refused nor ignored"



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


