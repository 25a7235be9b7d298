"""The other layouts and block forms of a family (hf_specs.VARIANTS: Falcon's classic multi-query and multi-head
qkv layouts and its sequential block, GPT-NeoX's and StableLM's other residual form, OPT post-LN and without its
final norm, GPT-BigCode multi-head), each read through the family's table and compared with transformers through
the torch twin holding the loaded weights: hidden states, logits and every parameter's gradient on the padded
batch, the round trip bit-exact, and the saved folder loaded by transformers.

The twin stands for the Flax model here (no compile per variant): parity_tests/test_hf.py proves the Flax model
against transformers for each family's main form, and the twin tests prove the two twins equal for every block
switch these variants use. Reference: eager attention, float32, every parameter perturbed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from hf_helpers import (
    VARIANTS,
    assert_grads_close,
    assert_rows_close,
    build_hf,
    hf_outputs,
    loss_weights,
    make_batch,
    run_theirs,
    run_twin,
)
from safetensors.numpy import load_file

import flax_impl.hf as fh
from flax_impl.tolerances import EXACT


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(variant, tmp_path):
    family, spec = VARIANTS[variant]
    model = build_hf(spec)
    model.save_pretrained(tmp_path / "hf")
    cfg, ours = fh.from_pretrained(tmp_path / "hf")
    batch = make_batch(spec, cfg.vocab_size)
    wh, wl = loss_weights(cfg, batch.mask)
    theirs_out, theirs_grads = run_theirs(model, spec, batch, wh, wl)
    ours_out, ours_grads = run_twin(ours, family, spec, batch, wh, wl)
    real = batch.real
    for name, o, t in zip(("hidden", "logits"), ours_out, theirs_out, strict=True):
        if t is not None:
            assert_rows_close(o[real], t[real], msg=f"{variant} {name}")
    assert_grads_close(family, cfg, theirs_grads, ours_grads)

    fh.save_pretrained(ours, tmp_path / "ours", model_type=family)
    original = load_file(tmp_path / "hf" / "model.safetensors")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(saved) == sorted(original)
    assert all(saved[k].dtype == v.dtype and np.array_equal(saved[k], v) for k, v in original.items())
    auto = transformers.AutoModelForCausalLM if spec.lm else transformers.AutoModel
    reloaded = auto.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf_outputs(reloaded, spec, batch)
    for want, g in zip(theirs_out, got, strict=True):
        if want is not None:
            np.testing.assert_allclose(g.numpy(), want, rtol=0, atol=EXACT)
