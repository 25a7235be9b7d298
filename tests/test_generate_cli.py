"""`flax-impl generate PATH --prompt TEXT` on a tiny GPT-2 folder with its own tokenizer, both built in-process
(a byte-level BPE trained on a few sentences, a transformers model saved with save_pretrained; nothing is
downloaded). The text the command prints is the tokenizer's decode of the tokens that the library's `generate`
returns for the same prompt; streaming writes multi-byte characters whole; every misuse exits 2 before any work,
naming the option; a damaged or hostile folder exits 2 naming the file, without a traceback; Ctrl-C exits 130 with
one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flax_impl.apps.cli import main
from flax_impl.apps.generate import REPLACEMENT, TextStream, continuation

SENTENCES = [
    "Position is information, and the architecture chooses where it enters.",
    "RoPE rotates the queries and keys inside attention; ALiBi adds a bias to the scores.",
    "Learned positions have a hard maximum length: 64 tokens in this tiny model.",
    "Café, naïve, über: byte-level pieces split characters of more than one byte.",
]
EOS = "<|endoftext|>"
N_POSITIONS = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny GPT-2 folder: config.json, model.safetensors, tokenizer.json (byte-level BPE, EOS = id 0)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    path = tmp_path_factory.mktemp("gpt2-tiny")
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_head=4, n_layer=2,
                                  n_positions=N_POSITIONS, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger logits than the 0.02 init: fewer near-ties between the top tokens
        for p in model.parameters():
            p.mul_(5.0)
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def model(folder):
    import flax_impl.hf

    return flax_impl.hf.from_pretrained(folder)[1]


def _library(model, tokenizer, prompts, **kw):
    """The library's tokens for `prompts`: one list of new ids per prompt (up to its length)."""
    from flax_impl.generation import generate

    out = generate(model, [tokenizer.encode(p).ids for p in prompts], **kw)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokens[i, : lengths[i]].tolist() for i in range(len(prompts))]


PROMPT = "Café, naïve"


@pytest.fixture(scope="module")
def greedy(model, tokenizer):
    """The library's 12 greedy tokens after PROMPT, stopping at EOS (id 0) as the command does by default."""
    return _library(model, tokenizer, [PROMPT], max_new_tokens=12, stop_tokens=(0,))[0]


def test_streamed_text_is_the_decode_of_generates_tokens(folder, tokenizer, greedy, capsys):
    assert main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    ids = tokenizer.encode(PROMPT).ids
    assert out == PROMPT + tokenizer.decode(ids + greedy)[len(PROMPT):] + "\n"
    assert out == PROMPT + continuation(tokenizer, ids, greedy) + "\n"
    assert "stop tokens [0]" in err and "first token after" in err and "then 11 tokens in" in err  # streamed


def test_stop_token_ends_the_text(folder, tokenizer, greedy, capsys):
    assert len(greedy) == 12 and 0 not in greedy  # the seed's tokens: no EOS, so any of them can be the stop
    stop = greedy[4]
    first = greedy.index(stop)
    argv = ["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--stop-token", str(stop)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == PROMPT + continuation(tokenizer, tokenizer.encode(PROMPT).ids, greedy[: first + 1]) + "\n"


def test_batch_of_prompts_prints_each_text(folder, tokenizer, model, capsys):
    prompts = ["Learned positions", "Position is information, and the"]
    argv = ["generate", str(folder), "--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20",
            "--top-p", "0.9", "--seed", "3", "--ignore-eos"]
    assert main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    out = capsys.readouterr().out
    new = _library(model, tokenizer, prompts, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20,
                   top_p=0.9, seed=3)
    texts = [p + continuation(tokenizer, tokenizer.encode(p).ids, n) for p, n in zip(prompts, new, strict=True)]
    assert out == texts[0] + "\n\n" + texts[1] + "\n"


def test_stream_writes_multibyte_characters_whole(tokenizer):
    """A character outside the training text is byte-level tokens, one byte each: its first bytes decode to
    U+FFFD, which the stream holds back until the character is complete."""
    prompt = tokenizer.encode("über").ids
    new = tokenizer.encode(" ✓ → ✓").ids
    assert len(new) > len(" ✓ → ✓")  # some characters are split over several tokens
    pieces: list[str] = []
    stream = TextStream(tokenizer, prompt, pieces.append)
    for t in new:
        stream.push(t)
    assert "".join(pieces) == " ✓ → ✓" and not any(REPLACEMENT in p for p in pieces)
    assert stream.finish(new) == " ✓ → ✓" and "".join(pieces) == " ✓ → ✓"


def test_stream_finishes_an_incomplete_character(tokenizer):
    """Tokens that end inside a character: the held U+FFFD is written at the end, as decode gives it."""
    prompt = tokenizer.encode("über").ids
    new = tokenizer.encode("✓").ids[:2]
    pieces: list[str] = []
    stream = TextStream(tokenizer, prompt, pieces.append)
    for t in new:
        stream.push(t)
    assert pieces == []
    assert stream.finish(new) == tokenizer.decode(prompt + new)[len("über"):] and REPLACEMENT in "".join(pieces)


def _folder_without(folder, tmp_path, name):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / name).unlink()
    return copy


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--prompt", ""], "--prompt"),
        (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["--prompt", "a", "--temperature", "0"], "--temperature=0"),
        (["--prompt", "a", "--temperature", "-1.5"], "--temperature=-1.5"),
        (["--prompt", "a", "--top-p", "0"], "--top-p=0"),
        (["--prompt", "a", "--top-p", "1.5"], "--top-p=1.5"),
        (["--prompt", "a", "--top-k", "-1"], "--top-k=-1"),
        (["--prompt", "a", "--greedy", "--temperature", "0.7"], "--greedy"),
        (["--prompt", "a", "--greedy", "--seed", "1"], "--seed"),
        (["--prompt", "a", "--max-new-tokens", "4", "--stop-token", "0", "100000"], "--stop-token"),
        (["--prompt", "word " * 80], "--prompt"),
        (["--prompt", "a", "--max-new-tokens", str(N_POSITIONS)], "--max-new-tokens"),
        (["--prompt", "a", "--seed", str(2**32)], "--seed=4294967296 must be an integer in [0, 2**32)"),
        (["--prompt", "a", "--temperature", "inf"], "--temperature=inf must be a finite number"),
        (["--prompt", "a", "--temperature", "nan"], "--temperature=nan"),
        (["--prompt", "a", "--temperature", "1e-39"], "--temperature=1e-39 must be >= 1.17549e-38"),
    ],
)
def test_misuse_exits_2_naming_the_option(folder, capsys, extra, needle):
    assert main(["generate", str(folder), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("flax-impl generate: error:") and needle in err


@pytest.mark.parametrize("missing, needle", [("tokenizer.json", "tokenizer.json"), ("config.json", "config.json"),
                                             ("model.safetensors", "model.safetensors")])
def test_missing_file_exits_2(folder, tmp_path, capsys, missing, needle):
    assert main(["generate", str(_folder_without(folder, tmp_path, missing)), "--prompt", "a"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and needle in err


def test_not_a_folder_and_not_causal_exit_2(folder, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "a"]) == 2
    assert "not a local folder" in capsys.readouterr().err
    bert = _folder_without(folder, tmp_path, "model.safetensors")
    hf = {"model_type": "bert", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
    (bert / "config.json").write_text(json.dumps(hf))
    assert main(["generate", str(bert), "--prompt", "a"]) == 2
    assert "not causal" in capsys.readouterr().err


def test_tokenizer_of_another_model_exits_2(folder, tmp_path, capsys):
    small = _folder_without(folder, tmp_path, "config.json")
    hf = json.loads((folder / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**hf, "vocab_size": 100}))
    assert main(["generate", str(small), "--prompt", "über ✓"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def test_a_tiny_temperature_samples_greedily(folder, tokenizer, greedy, capsys):
    """logits / 1.2e-38 overflows float32; the row max is subtracted first, so sampling tends to greedy."""
    argv = ["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "1.2e-38"]
    assert main([*argv, "--seed", "5"]) == 0
    assert capsys.readouterr().out == PROMPT + continuation(tokenizer, tokenizer.encode(PROMPT).ids, greedy) + "\n"


def _damaged(folder, tmp_path, name, content):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / name).write_bytes(content(copy / name) if callable(content) else content)
    return copy


def _config_with(**changes):
    return lambda path: json.dumps({**json.loads(path.read_text()), **changes}).encode()


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("model.safetensors", lambda p: p.read_bytes()[:-64], "model.safetensors is not a readable safetensors file"),
        ("config.json", b"{", "config.json is not a JSON file"),
        ("config.json", _config_with(tie_word_embeddings="false"), "tie_word_embeddings='false' must be a bool"),
        ("generation_config.json", b'{"eos_token_id": "0"}', "eos_token_id='0' must be an integer or null"),
        ("generation_config.json", b"[]", "generation_config.json holds a JSON list, not an object"),
        ("generation_config.json", b'{"eos_token_id": [0, true]}', "eos_token_id[1]=True must be an integer"),
        ("config.json", _config_with(n_layer=1), "unexpected key: h.1.attn.c_attn.bias"),  # found once loading
    ],
)
def test_a_damaged_folder_exits_2_naming_the_file(folder, tmp_path, capsys, name, content, needle):
    argv = ["generate", str(_damaged(folder, tmp_path, name, content)), "--prompt", "a", "--max-new-tokens", "4"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("flax-impl generate: error:") and needle in err and "Traceback" not in err


def test_without_tokenizers_exits_2_with_the_install_line(folder, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tokenizers" else find_spec(n, *a))
    assert main(["generate", str(folder), "--prompt", "a"]) == 2
    assert "pip install tokenizers" in capsys.readouterr().err


def test_ctrl_c_exits_130_with_one_line(folder):
    """SIGINT once the prompt is printed (the text streams next; tracing and compiling take seconds)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    # SIGINT as a terminal delivers it: xdist's workers ignore SIGINT, which a child inherits (Python then installs
    # no KeyboardInterrupt handler), so the child installs Python's own handler before the command runs.
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from flax_impl.apps.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    argv = [sys.executable, "-c", code, "generate", str(folder), "--prompt", "Position", "--max-new-tokens", "9"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=root)
    try:
        assert proc.stdout.read(len("Position")) == b"Position"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 130, err.decode()[-3000:]
    assert lines[-1] == "flax-impl generate: interrupted (Ctrl-C); nothing more is generated"
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode()
