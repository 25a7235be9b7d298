"""Orbax checkpoints (flax_impl.checkpoint) and the mesh-aware safetensors load (flax_impl.interop.load).

One device in this process; the 8-device checks (sharded restores, resharding onto another mesh, what each
device is handed) run once in a subprocess (checkpoint_worker.py) with 8 simulated CPU devices.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import eight_device_report

from flax_impl import interop, train as ftrain
from flax_impl.checkpoint import (
    CheckpointError,
    abstract,
    checkpoint_info,
    checkpoint_steps,
    restore_checkpoint,
    save_checkpoint,
)
from flax_impl.checkpoint_dir import MANIFEST
from flax_impl.config import TransformerConfig
from flax_impl.tolerances import TRAIN_REL
from flax_impl.transformer import Transformer

WORKER = Path(__file__).with_name("checkpoint_worker.py")
CONFIG = TransformerConfig(vocab_size=61, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=16, dropout=0.2)


def _tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2)


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, CONFIG.vocab_size, size=(4, 8))
    return ftrain.masked_token_batch(tokens, vocab_size=CONFIG.vocab_size, rng=rng, mask_prob=0.5)


def _values(node) -> dict[str, np.ndarray]:
    """Every variable (parameters, rng keys as key data and counts, optimizer state) as numpy."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(node)):
        value = var.get_value()
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out["/".join(map(str, path))] = np.asarray(value)
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model + AdamW optimizer after two steps with dropout on (moments, counts and rng streams all moved),
    saved as steps 1 and 2, with the values at step 2."""
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    directory = tmp_path_factory.mktemp("ckpt") / "run"
    for step in (1, 2):
        ftrain.train_step(model, opt, _batch(step))
        save_checkpoint(directory, model, opt, step=step)
    return directory, model, opt, _values(model), _values(opt)


def test_round_trip_into_abstract_modules_is_exact_and_resumes(trained):
    directory, model, opt, model_values, opt_values = trained
    assert checkpoint_steps(directory) == [1, 2]
    assert sorted(os.listdir(directory)) == ["1", "2"]  # no temporary folder left behind
    target = abstract(lambda: Transformer(CONFIG, rngs=nnx.Rngs(1)))
    target_opt = abstract(lambda: nnx.Optimizer(Transformer(CONFIG, rngs=nnx.Rngs(1)), _tx(), wrt=nnx.Param))
    assert isinstance(target.blocks.attn.in_proj.kernel.get_value(), jax.ShapeDtypeStruct)  # nothing allocated
    assert restore_checkpoint(directory, target, target_opt) == 2  # the newest step
    _assert_same(_values(target), model_values)  # parameters, dropout keys and counts
    _assert_same(_values(target_opt), opt_values)  # step, AdamW count, mu, nu
    assert int(target_opt.step.get_value()) == 2
    assert np.abs(opt_values["opt_state/0/nu/final_norm/bias"]).max() > 0  # the moments are not their zero init
    # resuming from the restored state is the run that did not stop: same dropout masks, same update
    saved = (nnx.clone(model), nnx.clone(opt))
    resumed = ftrain.train_step(target, target_opt, _batch(3))
    continued = ftrain.train_step(*saved, _batch(3))
    assert float(resumed["loss"]) == float(continued["loss"])
    _assert_same(_values(target), _values(saved[0]))


def test_restore_into_concrete_modules_an_older_step_and_the_model_alone(trained):
    directory, *_ = trained
    model = Transformer(CONFIG, rngs=nnx.Rngs(5))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    assert restore_checkpoint(directory, model, opt, step=1) == 1
    assert int(opt.step.get_value()) == 1
    step1 = _values(model)
    alone = Transformer(CONFIG, rngs=nnx.Rngs(6))
    restore_checkpoint(directory, alone, step=1)  # no optimizer: the model item only
    _assert_same(_values(alone), step1)
    assert not np.array_equal(step1["final_norm/bias"], trained[3]["final_norm/bias"])  # step 1 is not step 2


def test_another_config_is_a_clear_error_naming_every_array_before_any_change(trained):
    directory, *_ = trained
    other = Transformer(CONFIG.replace(d_ff=48), rngs=nnx.Rngs(0))
    before = _values(other)
    with pytest.raises(ValueError) as info:
        restore_checkpoint(directory, other)
    message = str(info.value)
    assert message.startswith(f"cannot restore step 2 of {str(directory)!r} into Transformer:")
    assert "model/blocks/ff/0/kernel: expected (2, 16, 48) float32, found (2, 16, 32) float32" in message
    assert "model/blocks/ff/3/kernel: expected (2, 48, 16) float32, found (2, 32, 16) float32" in message
    assert "model/blocks/ff/0/bias: expected (2, 48) float32, found (2, 32) float32" in message
    assert "  config d_ff: checkpoint 32 vs model 48\n" in message  # the reason first, then every array
    assert "in_proj" not in message  # only what differs
    _assert_same(_values(other), before)  # nothing was written
    untied = abstract(lambda: Transformer(CONFIG.replace(lm_head="untied"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"model/lm_head/kernel: not in the checkpoint \(expected \(16, 61\) float32"):
        restore_checkpoint(directory, untied)
    bf16 = abstract(lambda: Transformer(CONFIG, flax_config=None, rngs=nnx.Rngs(0)))
    bf16.final_norm.scale.set_value(jax.ShapeDtypeStruct((16,), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"model/final_norm/scale: expected \(16,\) bfloat16, found \(16,\) float32"):
        restore_checkpoint(directory, bf16)


@pytest.mark.parametrize(
    "change, line",
    [
        ({"n_heads": 4}, "config head_dim: checkpoint 8 vs model 4\n  config n_heads: checkpoint 2 vs model 4"),
        ({"position": "alibi"}, "config position: checkpoint 'sinusoidal' vs model 'alibi'"),
        ({"causal": True}, "config causal: checkpoint False vs model True"),
    ],
)
def test_same_shapes_other_config_is_refused_by_both_formats(trained, tmp_path, change, line):
    """Every key and shape agrees, the computation does not: the config each checkpoint carries tells."""
    directory, model, *_ = trained
    other = Transformer(CONFIG.replace(**change), rngs=nnx.Rngs(3))
    before = _values(other)
    with pytest.raises(ValueError, match=f"cannot restore step 2 of .* into Transformer:\n  {line}"):
        restore_checkpoint(directory, other)
    path = tmp_path / "model.safetensors"
    interop.save(model, path)
    with pytest.raises(ValueError, match=f"cannot load state dict into Transformer:\n  {line}"):
        interop.load(other, path)
    _assert_same(_values(other), before)  # nothing was written
    interop.load(other, path, strict=False)  # load what matches, by key: the config is not compared


def test_what_may_differ_and_files_without_a_config(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from flax_impl.saved_config import CONFIG_KEY

    _, model, *_ = trained
    path = tmp_path / "model.safetensors"
    interop.save(model, path)
    with safe_open(str(path), framework="numpy") as f:
        assert json.loads(f.metadata()[CONFIG_KEY]) == CONFIG.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # dropout rates and max_len do not change what the weights compute
        interop.load(Transformer(CONFIG.replace(dropout=0.0, max_len=64), rngs=nnx.Rngs(1)), path)
    bare = tmp_path / "bare.safetensors"  # as torch writes it: no flax_impl config
    save_file(interop.to_numpy_state_dict(model), bare, metadata={"format": "pt"})
    target = Transformer(CONFIG, rngs=nnx.Rngs(1))
    with pytest.warns(UserWarning, match="bare.safetensors carries no flax_impl config"):
        interop.load(target, bare)
    _assert_same(interop.to_numpy_state_dict(target), interop.to_numpy_state_dict(model))
    # An Orbax step saved without a config and without checksums (as before either was stored) restores with
    # verify=False and the same warning.
    save_checkpoint(tmp_path / "orbax", model, step=5)
    shutil.rmtree(tmp_path / "orbax" / "5" / "config")
    (tmp_path / "orbax" / "5" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"{MANIFEST} is missing: the step cannot be checked"):
        restore_checkpoint(tmp_path / "orbax", Transformer(CONFIG, rngs=nnx.Rngs(1)))
    with pytest.warns(UserWarning, match="step 5 of .* carries no flax_impl config"):
        restore_checkpoint(tmp_path / "orbax", Transformer(CONFIG, rngs=nnx.Rngs(1)), verify=False)


def test_bad_arguments_fail_clearly(trained, tmp_path):
    directory, model, opt, *_ = trained
    with pytest.raises(ValueError, match=r"step=2 is already saved in .*: choose a new step"):
        save_checkpoint(directory, model, opt, step=2)
    with pytest.raises(ValueError, match=r"step=7 is not in .*; saved steps: \[1, 2\]"):
        restore_checkpoint(directory, model, step=7)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"step={bad!r} must be an integer >= 0"):
            save_checkpoint(tmp_path / "x", model, step=bad)
    with pytest.raises(ValueError, match="max_to_keep=0 must be an integer >= 1 or None"):
        save_checkpoint(tmp_path / "x", model, step=0, max_to_keep=0)
    with pytest.raises(TypeError, match="model must be an nnx.Module, got dict"):
        save_checkpoint(tmp_path / "x", {}, step=0)
    with pytest.raises(TypeError, match="optimizer must be an nnx.Optimizer or None, got Transformer"):
        restore_checkpoint(directory, model, model)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        restore_checkpoint(tmp_path / "empty", model)
    assert not (tmp_path / "x").exists()  # every check ran before any write
    save_checkpoint(tmp_path / "model_only", model, step=0)
    with pytest.raises(ValueError, match="step 0 in .* has no optimizer state; pass optimizer=None"):
        restore_checkpoint(tmp_path / "model_only", model, opt)


def test_max_to_keep_deletes_the_oldest_steps_and_metadata_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative directory
    model = Transformer(CONFIG, rngs=nnx.Rngs(0))
    for step in (10, 20, 30):
        save_checkpoint("run", model, step=step, max_to_keep=2, metadata={"losses": [0.1, 1 / 3], "step": step})
    tmp_path = Path("run")
    assert checkpoint_steps(tmp_path) == [20, 30]
    assert sorted(os.listdir(tmp_path)) == ["20", "30"]  # no temporary folder left behind
    info = checkpoint_info(tmp_path)
    assert (info.step, info.path, info.config) == (30, tmp_path / "30", CONFIG.to_dict())
    assert info.metadata == {"losses": [0.1, 1 / 3], "step": 30}  # floats exactly
    assert checkpoint_info(tmp_path, step=20).metadata["step"] == 20
    for bad in ([1], {"x": float("nan")}, {"x": (1, 2)}, {1: 2}):
        with pytest.raises(ValueError, match="metadata must be a JSON object"):
            save_checkpoint(tmp_path, model, step=40, metadata=bad)
    assert checkpoint_steps(tmp_path) == [20, 30]


def test_a_flipped_byte_in_any_file_is_an_error_naming_it(trained, tmp_path):
    """Every file of a step, one flipped byte each (and a truncation, a deletion, a broken manifest): restoring
    is a CheckpointError naming the file, and nothing is written into the modules."""
    directory = tmp_path / "run"
    shutil.copytree(trained[0], directory)
    step = directory / "2"
    files = sorted(json.loads((step / MANIFEST).read_text())["files"])
    assert any(f.startswith("model/") for f in files) and any(f.startswith("optimizer/") for f in files)
    model = Transformer(CONFIG, rngs=nnx.Rngs(7))
    before = _values(model)
    rng = np.random.default_rng(0)
    for name in files:
        path = step / name
        good = path.read_bytes()
        at = int(rng.integers(len(good)))
        path.write_bytes(good[:at] + bytes([good[at] ^ 1 << int(rng.integers(8))]) + good[at + 1 :])
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} is corrupt: its sha256 differs"):
            restore_checkpoint(directory, model)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} is corrupt"):
            checkpoint_info(directory)
        path.write_bytes(good[:-1])
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} is truncated or overwritten"):
            restore_checkpoint(directory, model)
        path.unlink()
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} is missing"):
            restore_checkpoint(directory, model)
        path.write_bytes(good)
    _assert_same(_values(model), before)
    manifest = step / MANIFEST
    good = manifest.read_bytes()
    for damaged, message in ((good[:-2], "is not readable JSON"), (good.replace(b'"step": 2', b'"step": 3'),
                                                                    "is not the manifest of step 2")):
        manifest.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(manifest))} {message}"):
            restore_checkpoint(directory, model)
    manifest.write_bytes(good)
    assert restore_checkpoint(directory, model) == 2
    _assert_same(_values(model), trained[3])


def test_a_full_disk_leaves_no_partial_step_and_the_saved_ones_intact(tmp_path):
    """A write that fails in TensorStore (the file size limit here, as a full disk would: EFBIG for ENOSPC) is an
    OSError naming the folder; the temporary folder is deleted and the step saved before still restores."""

    class Big(nnx.Module):
        def __init__(self, seed: int):  # 4 MB of random (incompressible) values: past the limit, unlike a log line
            self.w = nnx.Param(jnp.asarray(np.random.default_rng(seed).standard_normal(1 << 20, np.float32)))

    saved = Big(1)
    save_checkpoint(tmp_path, saved, step=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 21, hard))
    try:
        with pytest.raises(OSError) as info:
            save_checkpoint(tmp_path, Big(2), step=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.errno == errno.EFBIG and info.value.filename == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["1"]
    target = Big(0)
    assert restore_checkpoint(tmp_path, target) == 1
    np.testing.assert_array_equal(target.w[...], saved.w[...])


def test_safetensors_load_into_an_abstract_model(trained, tmp_path):
    """interop.load places every parameter as it reads it: an abstract model gets real parameters (its rng
    streams, absent from a safetensors file, stay abstract)."""
    _, model, *_ = trained
    path = tmp_path / "model.safetensors"
    interop.save(model, path)
    target = abstract(lambda: Transformer(CONFIG, rngs=nnx.Rngs(1)))
    interop.load(target, path)
    want = interop.to_numpy_state_dict(model)
    got = interop.to_numpy_state_dict(target)
    _assert_same(got, want)
    assert isinstance(target.input.dropout.rngs.key.get_value(), jax.ShapeDtypeStruct)
    target.eval()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 8)))
    reference = nnx.clone(model)
    reference.eval()
    np.testing.assert_array_equal(np.asarray(target(ids)), np.asarray(reference(ids)))


def test_safetensors_partial_load_into_an_abstract_model_is_an_error(trained, tmp_path):
    from safetensors.numpy import save_file

    _, model, *_ = trained
    state = {k: v for k, v in interop.to_numpy_state_dict(model).items() if not k.startswith("blocks.1.")}
    save_file(state, tmp_path / "part.safetensors")
    target = abstract(lambda: Transformer(CONFIG, rngs=nnx.Rngs(1)))
    with pytest.raises(ValueError, match="strict=False: the abstract parameter blocks.attn.in_proj.bias is not"):
        interop.load(target, tmp_path / "part.safetensors", strict=False)
    concrete = Transformer(CONFIG, rngs=nnx.Rngs(1))
    before = interop.to_numpy_state_dict(concrete)
    interop.load(concrete, tmp_path / "part.safetensors", strict=False)  # layer 1 keeps its values
    got = interop.to_numpy_state_dict(concrete)
    _assert_same(got, {k: state.get(k, before[k]) for k in before})


# ------------------------------------------------------------------------- 8 simulated devices, in a subprocess
@pytest.fixture(scope="module")
def report() -> dict:
    return eight_device_report(WORKER)


SHARDED_RUNS = ["orbax_model", "orbax_optimizer", "orbax_concrete", "safetensors_abstract", "safetensors_concrete"]


@pytest.mark.slow
@pytest.mark.parametrize("run", SHARDED_RUNS)
def test_sharded_restore_has_the_models_shardings_and_the_saved_values(report, run):
    arrays = report[run]
    assert len(arrays) >= 15
    for path, a in arrays.items():
        assert a["spec"] == a["want_spec"], f"{path}: {a['spec']} != {a['want_spec']}"
        assert a["shard_shapes"] == a["want_shard_shapes"], path
        assert a["n_devices"] == 8, path
        assert a["max_abs_diff"] == 0.0, path  # bit for bit
    # the packed qkv kernel (or its AdamW moments), (layers, D, 3D), split 4 ways on the model axis
    kernel = next(a for path, a in arrays.items() if path.endswith("blocks/attn/in_proj/kernel"))
    assert kernel["spec"] == [None, None, "model"] and kernel["shard_shapes"] == [[2, 32, 24]]


@pytest.mark.slow
def test_sharded_restore_resumes_training_on_another_mesh(report):
    """Saved on data=4 x model=2, restored on data=2 x model=4: the next step's loss (dropout on) agrees."""
    assert report["step"] == 1
    saved, restored = report["resume_loss"]
    assert abs(restored - saved) <= TRAIN_REL * saved


@pytest.mark.slow
def test_no_device_is_handed_a_whole_sharded_array(report):
    """Orbax: every array was assembled from per-device pieces of the shard's shape, and no host block of a split
    array's full shape was sent to a device. safetensors: every block the read callback returned had the shard's
    shape."""
    arrays = {**report["orbax_model"], **report["orbax_optimizer"]}
    split = {tuple(a["shape"]) for a in arrays.values() if a["shard_shapes"] != [a["shape"]]}
    whole = {tuple(a["shape"]) for a in arrays.values() if a["shard_shapes"] == [a["shape"]]}
    assert len(split) >= 5
    record = report["orbax_record"]
    assert len(record["assembled"]) == len(arrays)
    for a in record["assembled"]:
        assert a["pieces"] == [a["shard_shape"]], a
    assert not (split - whole) & {tuple(s) for s in record["host_puts"]}
    callbacks = report["safetensors_record"]["callbacks"]
    assert len(callbacks) == len(report["safetensors_abstract"])
    for c in callbacks:
        assert c["blocks"] == [c["shard_shape"]], c
    assert any(c["shard_shape"] != c["shape"] for c in callbacks)
