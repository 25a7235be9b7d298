"""Greedy tokens of `flax_impl.generate` equal transformers' `generate(do_sample=False)` for every causal family
of hf_specs, on a left-padded batch of prompts of different lengths (the longest past every family's sliding
window), 32 new tokens, and each step's logits within HF_FORWARD_REL of transformers' scores.

Reference: transformers' eager attention, float32, every parameter perturbed (hf_helpers.build_hf). Its own file so
that the suite's two workers share the compile-heavy generation tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_helpers import FAMILIES, SPECS, assert_rows_close, build_hf, row_budgets_no_looser

import flax_impl.hf as fh
from flax_impl.generation import generate

# Every causal family of hf_specs (one tiny model each, the model of parity_tests/test_hf.py): today's six, and the
# families of issue 24 (partial rotary, parallel blocks, Falcon's grouped qkv, Phi-3's fused projections and window,
# OPT's positions from the mask, Gemma's (1 + w) norms and scaled embedding, StarCoder2's window).
CAUSAL = [f for f in FAMILIES if SPECS[f].lm]
HF_LENGTHS = (9, 4, 6)  # the sliding windows are 5 (Mistral, Phi-3) and 6 (StarCoder2): the longest prompt needs them
HF_NEW = 32


@pytest.mark.parametrize("family", CAUSAL)
def test_greedy_tokens_match_transformers(family, tmp_path):
    theirs = build_hf(SPECS[family])
    theirs.save_pretrained(tmp_path)
    cfg, ours = fh.from_pretrained(tmp_path)
    rng = np.random.default_rng(len(family))
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in HF_LENGTHS]
    P = max(HF_LENGTHS)
    ids, mask = torch.zeros(len(prompts), P, dtype=torch.long), torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    ref = theirs.generate(
        ids, attention_mask=mask, max_new_tokens=HF_NEW, do_sample=False, pad_token_id=0, eos_token_id=None,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    out = generate(ours, prompts, max_new_tokens=HF_NEW, return_logits=True)
    np.testing.assert_array_equal(out.tokens, ref.sequences[:, P:].numpy())
    scores = torch.stack(ref.scores, 1).numpy()  # (B, T, V)
    assert_rows_close(out.logits, scores, msg=family)  # each step's logits within HF_FORWARD_REL of their largest
    row_budgets_no_looser(scores)
