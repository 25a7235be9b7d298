"""Hostile Hugging Face folders and faults while reading or writing them (issue 28): every config.json value the
family tables read has a declared JSON kind, the kinds transformers' own config classes annotate, and a value of
another kind is refused naming the file, the key and the value (never read by truthiness); a file that is not
JSON or not safetensors, truncated or corrupt, is named in one ValueError before any weight is read; NaN weights
load with a warning naming the tensor; a full disk while saving leaves the previous folder as it was.

The folders are tiny transformers models saved with save_pretrained (nothing is downloaded).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_helpers import FAMILIES, SPECS
from safetensors.numpy import load_file, save_file

import flax_impl.hf as fh
from flax_impl.hf import io
from flax_impl.validation import ArgumentTypeError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- the declared kinds
def _kind_types(kind: str) -> set[type]:
    """The Python types of the JSON values a kind admits ("float" admits integers too)."""
    base = {"bool": {bool}, "int": {int}, "float": {float, int}, "str": {str}, "list[str]": {list}}
    out = set().union(*(base[k] for k in kind.rstrip("?").split("|")))
    return out | ({type(None)} if kind.endswith("?") else set())


def _annotation_types(annotation) -> set[type]:
    """The Python types a transformers config annotation admits (Literal["a"] -> str, list[str] -> list)."""
    if annotation is None or annotation is type(None):
        return {type(None)}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_annotation_types(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    return {origin or annotation}


def _annotations(cls) -> dict:
    """config.json key (dotted into MPT's attn_config and the RoPE parameters) -> the class's annotation."""
    out = {}
    for name, f in cls.__dataclass_fields__.items():
        sub = getattr(cls, "sub_configs", {}).get(name)
        if sub is not None:
            out.update({f"{name}.{k}": v for k, v in _annotations(sub).items()})
        elif name == "rope_parameters":
            hints = typing.get_type_hints(transformers.modeling_rope_utils.RopeParameters)
            out.update({f"{name}.{k}": v for k, v in hints.items()})
        elif not isinstance(f.type, str):
            out[name] = f.type
    return out


# Where our kind admits more than transformers annotates, and why.
LOOSER = {("mpt", "attn_config.attn_pdrop"): "annotated int, a dropout rate; MosaicML's configs write 0.0"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_read_is_the_one_transformers_annotates(family):
    """Each key a table reads admits the same kinds of JSON value as transformers' annotation (null aside, which
    ours may refuse or read as the default; integers where a float belongs): no valid file is refused, and no
    string passes for a bool or a number."""
    fam = fh.FAMILIES[family]
    kinds = {e.hf: e.kind for e in (*fam.config, *fam.require)}
    for f in fam.config:
        kinds.update({key: kind for key, (_, kind) in f.convert.reads.items()})
    annotations = _annotations(getattr(transformers, SPECS[family].config_cls))
    compared = 0
    for key, kind in kinds.items():
        if key not in annotations:  # keys of transformers 4 (position_embedding_type) or unannotated (head_dim)
            continue
        ours, theirs = _kind_types(kind) - {type(None)}, _annotation_types(annotations[key]) - {type(None)}
        allowed = theirs | ({int} if float in theirs else set())
        assert theirs <= ours, f"{family} {key}: {kind!r} refuses what transformers admits ({annotations[key]})"
        assert ours <= allowed or (family, key) in LOOSER, f"{family} {key}: {kind!r} vs {annotations[key]}"
        compared += 1
    assert compared >= len(kinds) - 2


# ---------------------------------------------------------------------------------------------- config.json
def _config_folder(family: str, path: Path, changes: dict) -> Path:
    """A folder holding only config.json: the family's tiny transformers config with `changes` (nested dicts
    replace their key's value). No weights: a bad value must fail before any weight is looked for."""
    spec = SPECS[family]
    hf = getattr(transformers, spec.config_cls)(**spec.kwargs).to_dict()
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**hf, **changes}))
    return path


# family, config.json changes, what the one error must name (besides the file)
WRONG_KIND = [
    ("gpt2", {"tie_word_embeddings": "false"}, "tie_word_embeddings='false' must be a bool (true or false), got str"),
    ("gpt2", {"n_inner": 64.0}, "n_inner=64.0 must be an integer or null, got float"),
    ("gpt2", {"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon='1e-5' must be a finite number, got str"),
    ("gpt2", {"scale_attn_weights": 0}, "scale_attn_weights=0 must be a bool"),
    ("qwen2", {"use_sliding_window": "false"}, "use_sliding_window='false' must be a bool"),
    ("qwen2", {"layer_types": "full_attention"}, "layer_types='full_attention' must be a list of strings or null"),
    ("llama", {"attention_bias": "true"}, "attention_bias='true' must be a bool"),
    ("llama", {"num_key_value_heads": 2.0}, "num_key_value_heads=2.0 must be an integer or null"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, "rope_parameters.rope_theta='1e4'"),
    ("llama", {"rope_scaling": "linear"}, "rope_scaling='linear' must be a JSON object or null"),
    ("mistral", {"sliding_window": True}, "sliding_window=True must be an integer or null, got bool"),
    ("bert", {"pad_token_id": False}, "pad_token_id=False must be an integer or null, got bool"),
    ("bloom", {"hidden_size": "48"}, "hidden_size='48' must be an integer, got str"),
    ("mpt", {"attn_config": {"alibi": "true"}}, "attn_config.alibi='true' must be a bool"),
    ("mpt", {"attn_config": []}, "attn_config=[] must be a JSON object or null"),
]


@pytest.mark.parametrize("family, changes, needle", WRONG_KIND, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in WRONG_KIND])
def test_a_value_of_the_wrong_kind_is_refused_naming_the_file(family, changes, needle, tmp_path):
    folder = _config_folder(family, tmp_path / "m", changes)
    with pytest.raises(ArgumentTypeError) as err:
        fh.from_pretrained(folder)
    assert str(folder / "config.json") in str(err.value) and needle in str(err.value)


def test_a_string_bool_would_have_changed_the_model():
    """The hazard the kinds close: read by truthiness, tie_word_embeddings="false" gave a tied head."""
    hf = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "tie_word_embeddings": False}
    assert fh.convert.config_from_hf(hf)[1].lm_head == "untied"
    with pytest.raises(ArgumentTypeError, match="tie_word_embeddings='false'"):
        fh.convert.config_from_hf({**hf, "tie_word_embeddings": "false"})


def test_a_nan_in_config_json_is_refused(tmp_path):
    folder = _config_folder("gpt2", tmp_path / "m", {"layer_norm_epsilon": float("nan")})  # json writes NaN
    with pytest.raises(ValueError, match="layer_norm_epsilon=nan must be a finite number"):
        fh.from_pretrained(folder)


@pytest.mark.parametrize("text, needle", [("{", "is not a JSON file"), ("[1, 2]", "holds a JSON list, not an object"),
                                          (b"\xff\xfe{}", "is not a JSON file")])
def test_a_config_json_that_is_not_an_object_is_named(text, needle, tmp_path):
    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError) as err:
        fh.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and needle in str(err.value)


# ---------------------------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 folder saved by transformers: config.json + model.safetensors."""
    spec = SPECS["gpt2"]
    torch.manual_seed(0)
    model = getattr(transformers, spec.model_cls)(getattr(transformers, spec.config_cls)(**spec.kwargs))
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder


def _copy(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_a_damaged_weights_file_is_named_before_any_weight_is_read(gpt2, tmp_path, damage):
    folder = _copy(gpt2, tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-100], "header": data[:8] + b"x" + data[9:], "empty": b""}[damage])
    with pytest.raises(ValueError, match="is not a readable safetensors file") as err:
        fh.from_pretrained(folder)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "index, needle",
    [
        ("{", "is not a JSON file"),
        ("[]", "has no 'weight_map' object"),
        (json.dumps({"weight_map": {"a": 3}}), "maps keys to [3]"),
        (json.dumps({"weight_map": {"a": "../model.safetensors"}}), "shards must be file names"),
    ],
)
def test_a_malformed_index_is_named(gpt2, tmp_path, index, needle):
    folder = _copy(gpt2, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / io.INDEX).write_text(index)
    with pytest.raises(ValueError) as err:
        fh.from_pretrained(folder)
    assert str(folder / io.INDEX) in str(err.value) and needle in str(err.value)


def test_nan_weights_load_with_a_warning_naming_the_tensor(gpt2, tmp_path):
    folder = _copy(gpt2, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    key = "transformer.h.1.mlp.c_fc.weight"
    tensors[key][0, :3] = [np.nan, np.inf, -np.inf]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(io.NonFiniteWeightWarning, match=rf"tensor '{key}' holds 1 NaN and 2 infinite values"):
        fh.from_pretrained(folder)


def test_a_lossy_cast_is_described_once(gpt2, tmp_path):
    """float32 into bfloat16 parameters loses precision, bfloat16 into float16 range; widening loses nothing."""
    header = io.read_headers(io.weight_files(gpt2))
    with pytest.warns(io.LossyCastWarning, match=r"tensor\(s\) stored as F32 are cast to bfloat16, losing precision"):
        io.warn_lossy_cast(header, "bfloat16", str(gpt2))
    bf16 = {"a": "BF16", "b": "BF16"}
    assert io.cast_warning(bf16, "float32", "x") is None
    assert "losing range" in io.cast_warning(bf16, "float16", "x")


# ---------------------------------------------------------------------------------------------- writing
FULL_DISK = r"""
import resource, signal, sys
from flax import nnx
import flax_impl as fi
import flax_impl.hf as fh

folder = sys.argv[1]
cfg = fh.convert.config_from_hf(fh.io.read_config(folder))[1]
model = fi.Transformer(cfg, rngs=nnx.Rngs(1))  # other weights than the folder's
fh.save_pretrained(model, sys.argv[3], model_type="gpt2")  # elsewhere first: every program compiled before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    fh.save_pretrained(model, folder, model_type="gpt2")
except OSError as err:
    print(f"OSError: {err}")
"""


def test_a_full_disk_while_saving_leaves_the_previous_folder(gpt2, tmp_path):
    folder = _copy(gpt2, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    limit = len(before["model.safetensors"]) // 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", FULL_DISK, str(folder), str(limit), str(tmp_path / "warm-up")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OSError: [Errno 27] cannot write") and "model.safetensors" in proc.stdout
    assert "the folder keeps its previous files" in proc.stdout
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left either


def test_a_failure_on_the_second_file_replaces_neither(gpt2, tmp_path, monkeypatch):
    """config.json is written after the weights: failing there must not leave new weights beside the old config."""
    folder = _copy(gpt2, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    tensors = {k: v + 1 for k, v in load_file(folder / "model.safetensors").items()}

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.json, "dump", no_space)
    with pytest.raises(OSError, match=r"cannot write .*config\.json \(No space left on device\)"):
        io.write_folder(folder, {"model_type": "gpt2"}, tensors)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
