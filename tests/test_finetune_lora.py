"""`flax-impl finetune --lora-r R` on a tiny Llama folder made offline: the base weights stay as they were, OUT is a
PEFT adapter folder that peft loads onto the transformers model with our model's outputs, and --merge writes the
adapters folded into a full folder that transformers loads with the same outputs. (LoRA's steps against
transformers + peft are proven in parity_tests/test_lora_peft.py.)"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from finetune_helpers import CHATS, make_folder, write_jsonl
from flax import nnx
from hf_helpers import assert_rows_close

from flax_impl import checkpoint as lib
from flax_impl.apps import checkpoint as ck
from flax_impl.apps.cli import main as cli_main
from flax_impl.tolerances import HF_FORWARD_REL, row_error

LORA = ["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj,down_proj", "--merge"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(FOLDER, DATA, OUT, argv) of one LoRA run."""
    work = tmp_path_factory.mktemp("ft-lora")
    folder = make_folder(work / "llama", "llama")
    data = write_jsonl(work / "data.jsonl", CHATS * 3)
    out = work / "out"
    argv = ["finetune", str(folder), "--data", str(data), "--out", str(out), "--seq-len", "128", "--batch-size", "4",
            "--steps", "4", "--eval-every", "2", "--lr", "1e-2", "--plot", "none", *LORA]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli_main(argv) == 0
    assert "LoRA r=4, alpha=8, dropout=0 on ('q_proj', 'v_proj', 'down_proj'); the base weights frozen" in (
        printed.getvalue())
    return folder, data, out, argv


def _ours(folder, out):
    """Our model: the folder's weights, adapters applied as the run did, the run's checkpoint restored."""
    import flax_impl.hf
    from flax_impl.lora import LoraConfig, apply_lora

    _, model = flax_impl.hf.from_pretrained(folder)
    config = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), model_type="llama")
    apply_lora(model, config, rngs=nnx.Rngs(0))
    lib.restore_checkpoint(out / ck.CKPT, model)
    model.eval()
    return model


@pytest.mark.slow  # a whole run (~50 s on 2 busy cores)
def test_lora_run_writes_a_peft_adapter_and_a_merged_folder_with_our_outputs(run):
    import peft
    import transformers

    import flax_impl.hf

    folder, _, out, _ = run
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "merged"} <= {
        p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()
    model = _ours(folder, out)
    _, base = flax_impl.hf.from_pretrained(folder)
    frozen = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    trained = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    adapters = [p for p in trained if "lora" in p]
    assert adapters and set(trained) - set(adapters) == set(frozen)
    for path, var in frozen.items():  # the base weights did not move
        np.testing.assert_array_equal(np.asarray(trained[path].get_value()), np.asarray(var.get_value()))
    assert max(np.abs(np.asarray(trained[p].get_value())).max() for p in adapters if p[-1] == "b") > 1e-3  # B moved
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 20))
    ours = np.asarray(model.logits(model(ids)))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(theirs, out).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        for hf in (theirs, merged):
            assert_rows_close(ours, hf(torch.as_tensor(ids)).logits.numpy(), msg=type(hf).__name__)
    plain = np.asarray(base.logits(base(ids)))
    assert row_error(plain, ours) > 1e3 * HF_FORWARD_REL  # the adapters change the outputs


@pytest.mark.slow  # uses the run
def test_resume_with_other_lora_options_is_refused(run, capsys):
    _, _, _, argv = run
    other = [a if a != "4" or argv[i - 1] != "--lora-r" else "8" for i, a in enumerate(argv)]
    assert cli_main([*other, "--steps", "6", "--resume"]) == 2
    assert "--resume with other data options" in capsys.readouterr().err


def test_lora_options_need_lora_r_and_real_targets(tmp_path, capsys):
    folder = make_folder(tmp_path / "llama", "llama")
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    base = ["finetune", str(folder), "--data", str(data), "--out", str(tmp_path / "o"), "--seq-len", "128"]
    assert cli_main([*base, "--merge"]) == 2
    assert "--merge and the --lora-* options need --lora-r" in capsys.readouterr().err
    assert cli_main([*base, "--lora-r", "4", "--lora-targets", "c_attn"]) == 2
    assert "--lora-*: " in capsys.readouterr().err
    assert cli_main([*base, "--lora-r", "0"]) == 2
    assert "r=0 must be an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
