"""A family registered without editing the library (`flax_impl.hf.register_family`): the Helium table that
docs/adding-a-family.md writes, taken from the page itself, gets the proof of the built-in families (hidden
states, logits and every gradient against transformers on a left- and right-padded batch, the bit-exact round
trip, the saved folder reloaded by transformers, greedy tokens equal to transformers' generate), and `flax-impl
parity --hf` and `flax-impl generate` work on its folder. Malformed tables are refused naming every problem; a
table named under the `flax_impl.hf_families` entry-point group is found by model_type.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "parity_tests"))
from hf_helpers import (  # noqa: E402
    Spec,
    assert_grads_close,
    assert_rows_close,
    build_hf,
    hf_outputs,
    loss_weights,
    make_batch,
    run_ours,
    run_theirs,
)
from safetensors.numpy import load_file  # noqa: E402
from test_docs import code_blocks  # noqa: E402

import flax_impl.hf as fh  # noqa: E402
from flax_impl.apps import parity_hf  # noqa: E402
from flax_impl.apps.cli import main  # noqa: E402
from flax_impl.generation import generate  # noqa: E402
from flax_impl.hf import registry  # noqa: E402
from flax_impl.tolerances import EXACT  # noqa: E402

PAGE = ROOT / "docs" / "adding-a-family.md"
SPEC = Spec(
    "HeliumConfig",
    dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, attention_bias=True,
         mlp_bias=True, bos_token_id=1, eos_token_id=2),
    "HeliumForCausalLM",
)  # fmt: skip


def _table_source() -> str:
    """The page's first python block: the Helium table, as a user writes it."""
    return code_blocks(PAGE, ("python",))[0][1]


@pytest.fixture(scope="module")
def helium():
    """The page's table, registered for this module's tests and unregistered after."""
    namespace: dict = {}
    exec(compile(_table_source(), str(PAGE), "exec"), namespace)
    table = namespace["HELIUM"]
    before = registry.FAMILIES.get("helium")
    fh.register_family(table, replace=True)
    yield table
    registry.FAMILIES.pop("helium")
    if before is not None:
        registry.FAMILIES["helium"] = before


@pytest.fixture(scope="module")
def folder(helium, tmp_path_factory):
    model = build_hf(SPEC)
    path = tmp_path_factory.mktemp("helium")
    model.save_pretrained(path)
    return model, path


def test_registered_family_matches_transformers(folder, tmp_path):
    theirs, path = folder
    cfg, ours = fh.from_pretrained(path)
    assert (cfg.rope_style, cfg.rope_base, cfg.n_kv_heads, cfg.qkv_bias, cfg.out_bias) == (
        "interleaved", 100_000.0, 2, True, False
    )  # fmt: skip
    batch = make_batch(SPEC, cfg.vocab_size)
    wh, wl = loss_weights(cfg, batch.mask)
    theirs_out, theirs_grads = run_theirs(theirs, SPEC, batch, wh, wl)
    ours_out, ours_grads = run_ours(ours, "helium", SPEC, batch, wh, wl)
    for name, o, t in zip(("hidden", "logits"), ours_out, theirs_out, strict=True):
        assert_rows_close(o[batch.real], t[batch.real], msg=f"helium {name}")
    assert_grads_close("helium", cfg, theirs_grads, ours_grads)

    fh.save_pretrained(ours, tmp_path, model_type="helium")
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    assert all(np.array_equal(saved[k], v) for k, v in original.items())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        got = hf_outputs(reloaded, SPEC, batch)
    for want, g in zip(theirs_out, got, strict=True):
        np.testing.assert_allclose(g.numpy(), want, rtol=0, atol=EXACT)

    P = 9  # greedy tokens: a left-padded batch, 32 new tokens
    prompts = [np.random.default_rng(b).integers(3, 100, n).tolist() for b, n in enumerate((9, 4, 6))]
    ids, mask = torch.zeros(3, P, dtype=torch.long), torch.zeros(3, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0,
                          eos_token_id=None)  # fmt: skip
    out = generate(ours, prompts, max_new_tokens=32)
    np.testing.assert_array_equal(out.tokens, ref[:, P:].numpy())


def test_parity_command_passes_on_the_registered_family(folder, tmp_path):
    args = argparse.Namespace(hf=str(folder[1]), flax=None, batch=2, length=12, seed=0, json=None,
                              reference="transformers", dtype="float32", decode=4)  # fmt: skip
    assert parity_hf.run(args) == 0


def test_generate_command_runs_on_the_registered_family(folder, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, path = folder
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(100)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    assert main(["generate", str(path), "--prompt", "w5 w6 w7", "--max-new-tokens", "6", "--ignore-eos"]) == 0
    out = generate(fh.from_pretrained(path)[1], [[5, 6, 7]], max_new_tokens=6)
    assert capsys.readouterr().out.split() == ["w5", "w6", "w7"] + [f"w{t}" for t in np.asarray(out.tokens)[0]]


def test_malformed_tables_are_refused_naming_every_problem(helium):
    bad = dataclasses.replace(
        helium,
        fixed={**helium.fixed, "rope_kind": "x"},
        keys=(*helium.keys, fh.Key("x.{i}.weight", "blocks.{j}.x", "nope")),
    )
    with pytest.raises(ValueError, match="malformed") as err:
        fh.register_family(bad, replace=True)
    for needle in ("'rope_kind' is not a TransformerConfig field", "layout='nope'", "placeholders"):
        assert needle in str(err.value)
    with pytest.raises(ValueError, match="model_type='helium' is registered already"):
        fh.register_family(helium)
    with pytest.raises(TypeError, match="must be a flax_impl.hf.spec.Family"):
        fh.register_family({"model_type": "helium"})
    assert fh.FAMILIES["helium"] is helium  # nothing replaced by the refused calls


def test_an_entry_point_registers_a_table_for_the_commands(tmp_path, monkeypatch):
    """A package naming the table under `flax_impl.hf_families` (here a dist-info folder on sys.path, as pip
    installs one) makes the model_type known on first use, in a process that never imported the package."""
    (tmp_path / "helium_plugin.py").write_text(_table_source())
    info = tmp_path / "helium_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: helium-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flax_impl.hf_families]\nhelium = helium_plugin:HELIUM\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(registry.FAMILIES, "helium", raising=False)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    table = fh.family("helium")
    assert table.architecture == "HeliumForCausalLM" and registry.FAMILIES["helium"] is table
