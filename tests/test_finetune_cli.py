"""`flax-impl finetune FOLDER --data PATH --out DIR` end to end on a tiny GPT-2 folder made offline: the folder it
writes loads in transformers with our model's outputs and keeps the original's config fields and tokenizer files;
progress a log can read; Ctrl-C (a real SIGINT in a subprocess) checkpoints, prints a summary and the resume
command, exit 130, and the printed command finishes the run bit for bit as the uninterrupted one; every misuse
exits 2 before any work, naming the option, the file or the record."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from finetune_helpers import CHATS, make_folder, write_jsonl
from flax import nnx
from hf_helpers import assert_rows_close

from flax_impl import checkpoint as lib
from flax_impl.apps import checkpoint as ck, finetune_loop
from flax_impl.apps.cli import main as cli_main
from flax_impl.tolerances import HF_FORWARD_REL, row_error

ROOT = Path(__file__).resolve().parents[1]
# `flax-impl finetune` in a subprocess, with the suite's matmul precision; SIGINT_AFTER=N sends the process a real
# SIGINT (Ctrl-C) from inside its N-th optimizer step, so that it arrives at a known step.
LAUNCH = """
import os, signal, sys, jax
jax.config.update("jax_default_matmul_precision", "highest")
import flax_impl.apps.finetune_step as fs
after, real, calls = int(os.environ.get("SIGINT_AFTER", 0)), fs.train_step, []
def train_step(*args, **kw):
    calls.append(1)
    if len(calls) == after:
        os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kw)
fs.train_step = train_step
from flax_impl.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("ft-cli") / "gpt2", "gpt2")


@pytest.fixture(scope="module")
def data(folder):
    return write_jsonl(folder.parent / "data.jsonl", CHATS * 3)


def argv(folder, data, out, *extra):
    return ["finetune", str(folder), "--data", str(data), "--out", str(out), "--seq-len", "128", "--batch-size", "2",
            "--grad-accum", "2", "--steps", "4", "--eval-every", "2", "--eval-fraction", "0.2", "--pack",
            "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def whole(folder, data):
    """The uninterrupted run: (OUT, stdout, stderr)."""
    out = folder.parent / "whole"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main(argv(folder, data, out))
    assert code == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


def _arrays(out: Path, folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The checkpoint's metadata and every array (parameters, rng streams, AdamW state)."""
    import flax_impl.hf
    from flax_impl.train import make_optimizer

    info = lib.checkpoint_info(out / ck.CKPT)
    _, model = flax_impl.hf.from_pretrained(folder)
    from flax_impl.config import TrainConfig

    opt = make_optimizer(model, TrainConfig.from_dict(info.metadata["train"]))
    lib.restore_checkpoint(out / ck.CKPT, model, opt)
    arrays = {}
    for prefix, node in (("model/", model), ("opt/", opt)):
        for path, var in nnx.to_flat_state(nnx.state(node)):
            value = var.get_value()
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                value = jax.random.key_data(value)
            arrays[prefix + "/".join(map(str, path))] = np.asarray(value)
    return {**info.metadata, "step": info.step}, arrays


@pytest.mark.slow  # a whole run: the train and eval steps compile (~50 s on 2 busy cores)
def test_finetune_writes_a_folder_transformers_loads_with_our_outputs(whole, folder):
    import transformers

    import flax_impl.hf

    out, printed, log = whole
    assert "12 training / 3 held-out examples" in printed and "done: held-out loss" in printed
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png",
            "checkpoint"} <= {p.name for p in out.iterdir()}
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    config, original = (json.loads((d / "config.json").read_text()) for d in (out, folder))
    assert {k: config[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")} == {
        k: original[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")}
    assert "\r" not in log and "fine-tuning (the first step compiles)\n" in log  # plain lines in a log
    assert [line.split()[:2] for line in printed.splitlines() if line.startswith("step ")] == [
        ["step", "2"], ["step", "4"]]
    # The final checkpoint's weights are the folder's (bit for bit), and transformers computes our outputs.
    _, model = flax_impl.hf.from_pretrained(folder)
    lib.restore_checkpoint(out / ck.CKPT, model)
    model.eval()
    _, saved = flax_impl.hf.from_pretrained(out)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(saved, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, 300, size=(2, 20))
    import torch

    with torch.no_grad():
        want = theirs(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(model.logits(model(ids)))
    assert_rows_close(got, want, msg="transformers on the fine-tuned folder")
    before = flax_impl.hf.from_pretrained(folder)[1]
    assert row_error(np.asarray(before.logits(before(ids))), got) > 1e3 * HF_FORWARD_REL  # training moved it
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == json.loads(
        (folder / "tokenizer_config.json").read_text())["chat_template"]


@pytest.mark.slow  # uses the whole run
def test_existing_checkpoint_needs_resume(whole, folder, data, capsys):
    assert cli_main(argv(folder, data, whole[0])) == 2
    assert "holds a checkpoint (step 4" in capsys.readouterr().err


@pytest.mark.slow  # two more runs (~50 s)
def test_ctrl_c_checkpoints_and_the_printed_command_resumes_bit_for_bit(whole, folder, data, tmp_path):
    """A real SIGINT during step 2 (in a subprocess): the step ends and is saved, a summary and the resume command
    are printed, exit 130; the printed command then finishes the run as the uninterrupted one, every array and
    every logged loss equal."""
    out = tmp_path / "pieces"
    args = argv(folder, data, out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "SIGINT_AFTER": "2"}
    stopped = subprocess.run([sys.executable, "-c", LAUNCH, *args], env=env, capture_output=True, text=True)
    assert stopped.returncode == finetune_loop.INTERRUPTED, stopped.stderr
    assert "Traceback" not in stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert lines[-2].startswith("flax-impl finetune: interrupted after step 2 of 4 (train loss ")
    assert lines[-2].endswith(f"): checkpoint {out / ck.CKPT / '2'}")
    assert lines[-1] == f"resume with: {shlex.join(['flax-impl', *args, '--resume'])}"
    assert not (out / "model.safetensors").exists()  # the folder is written at the end only
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli_main(shlex.split(lines[-1].removeprefix("resume with: "))[1:]) == 0
    assert "steps 2 -> 4 of 4" in printed.getvalue()
    (want_meta, want), (got_meta, got) = _arrays(whole[0], folder), _arrays(out, folder)
    assert got_meta == want_meta  # the loss history included
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert (out / "model.safetensors").read_bytes() == (whole[0] / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------------- misuse: exit 2 before work
@pytest.fixture
def no_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("flax-impl finetune started work before reporting the bad input")

    monkeypatch.setattr(finetune_loop, "_train", forbidden)


BAD_OPTIONS = [
    (["--batch-size", "0"], "--batch-size=0 must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum=0 must be >= 1"),
    (["--seq-len", "300"], "--seq-len=300 is above the model's maximum length 256"),
    (["--steps", "4", "--warmup", "4"], "--warmup=4 must be below the 4 steps"),
    (["--stop-at", "5"], "--stop-at=5 must be in [1, 4]"),
    (["--lr", "nan"], "--lr=nan must be a finite number > 0"),
    (["--eval-fraction", "1"], "--eval-fraction=1.0 must be a finite number in [0, 1)"),
    (["--eval-fraction", "0.99"], "leaves none to train on"),
    (["--fsdp"], "--fsdp shards over the mesh's data axis"),
    (["--mesh", "data=3"], "--mesh data=3"),
    (["--num-processes", "2"], "need all of --coordinator, --num-processes and --process-id"),
    (["--eval-data", "no/such.jsonl"], "--eval-data 'no/such.jsonl' is not a file"),
    (["--resume"], "--resume: no complete checkpoint in"),
]


@pytest.mark.parametrize("extra, message", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_is_exit_2_before_any_work(folder, data, tmp_path, capsys, no_work, extra, message):
    assert cli_main(argv(folder, data, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("flax-impl finetune: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_folder_and_data_are_exit_2_before_any_work(folder, data, tmp_path, capsys, no_work):
    import shutil

    def run_2(folder_, data_) -> str:
        assert cli_main(argv(folder_, data_, tmp_path / "run")) == 2
        return capsys.readouterr().err

    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(folder, no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert "has no tokenizer.json" in run_2(no_tok, data)
    no_template = tmp_path / "no-template"
    shutil.copytree(folder, no_template)
    (no_template / "tokenizer_config.json").write_text("{}")
    assert "data.jsonl:1: a chat record needs a chat template" in run_2(no_template, data)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "holds no record" in run_2(folder, empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"input": "x"}])
    assert "bad.jsonl:2: a record needs 'messages'" in run_2(folder, bad)
    assert "is not a local folder" in run_2(tmp_path / "nothing", data)
    assert not (tmp_path / "run").exists()
