"""Weight conversion both ways: torch keys, bit-exact round trips, strict errors, safetensors checkpoints."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import small_config
from safetensors.torch import load_file as torch_load_file

import flax_impl as fi
import torch_ref as tr
from flax_impl import interop


def assert_same_params(a, b):
    sa, sb = fi.to_numpy_state_dict(a), fi.to_numpy_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_keys_are_the_twins_and_round_trip_is_bit_exact(scan, position):
    cfg = small_config(position=position, input_norm=True)
    model = fi.Transformer(cfg, flax_config=fi.FlaxConfig(scan_layers=scan), rngs=nnx.Rngs(0))
    twin = tr.Transformer(cfg)
    sd = tr.from_numpy_state_dict(fi.to_numpy_state_dict(model))
    assert set(sd) == set(twin.state_dict())
    for k, v in twin.state_dict().items():
        assert tuple(sd[k].shape) == tuple(v.shape), k
    twin.load_state_dict(sd)  # strict by default in torch
    back = fi.Transformer(cfg, flax_config=fi.FlaxConfig(scan_layers=scan), rngs=nnx.Rngs(1))
    fi.load_torch_state_dict(back, twin.state_dict())
    assert_same_params(model, back)
    # and the torch side is bit-exact too
    for k, v in twin.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k].numpy(), err_msg=k)


def test_scanned_and_unrolled_share_the_checkpoint_format():
    cfg = small_config(n_layers=3)
    scanned = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    unrolled = fi.Transformer(cfg, flax_config=fi.FlaxConfig(scan_layers=False), rngs=nnx.Rngs(5))
    fi.load_torch_state_dict(unrolled, fi.to_numpy_state_dict(scanned))
    assert_same_params(scanned, unrolled)


def test_expected_torch_keys_for_the_lesson_layout():
    cfg = small_config(position="learned", input_norm=True, n_layers=2)
    keys = set(fi.to_numpy_state_dict(fi.Transformer(cfg, rngs=nnx.Rngs(0))))
    for k in [
        "input.embed.weight",
        "input.pos.weight",
        "input.norm.weight",
        "input.norm.bias",
        "blocks.0.attn.in_proj_weight",
        "blocks.0.attn.in_proj_bias",
        "blocks.1.attn.out_proj.weight",
        "blocks.1.ln1.weight",
        "blocks.1.ln2.bias",
        "blocks.0.ff.0.weight",
        "blocks.0.ff.3.bias",
        "final_norm.weight",
    ]:
        assert k in keys, k


def test_strict_errors_name_every_bad_key():
    cfg = small_config()
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    sd = fi.to_numpy_state_dict(model)
    del sd["blocks.1.ln2.weight"]
    sd["blocks.0.attn.bias_k"] = np.zeros(3, np.float32)
    sd["blocks.0.ff.0.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        fi.load_torch_state_dict(model, sd)
    msg = str(info.value)
    assert "missing key: blocks.1.ln2.weight" in msg
    assert "unexpected key: blocks.0.attn.bias_k" in msg
    assert "shape mismatch: blocks.0.ff.0.weight" in msg and "(5, 5)" in msg


def test_non_strict_loads_what_matches():
    cfg = small_config()
    src, dst = fi.Transformer(cfg, rngs=nnx.Rngs(0)), fi.Transformer(cfg, rngs=nnx.Rngs(1))
    before = fi.to_numpy_state_dict(dst)
    sd = fi.to_numpy_state_dict(src)
    del sd["final_norm.weight"]
    fi.load_torch_state_dict(dst, sd, strict=False)
    after = fi.to_numpy_state_dict(dst)
    np.testing.assert_array_equal(after["final_norm.weight"], before["final_norm.weight"])
    np.testing.assert_array_equal(after["blocks.1.ff.3.weight"], sd["blocks.1.ff.3.weight"])


def test_bf16_torch_tensors_load():
    cfg = small_config()
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    sd = {k: v.to(torch.bfloat16) for k, v in tr.from_numpy_state_dict(fi.to_numpy_state_dict(model)).items()}
    fi.load_torch_state_dict(model, sd)
    got = fi.to_numpy_state_dict(model)["input.embed.weight"]
    np.testing.assert_array_equal(got, sd["input.embed.weight"].float().numpy())


def test_save_load_safetensors_both_frameworks(tmp_path):
    cfg = small_config(position="learned")
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    path = tmp_path / "model.safetensors"
    fi.save(model, path)
    twin = tr.Transformer(cfg)
    twin.load_state_dict(torch_load_file(str(path)))  # the torch side reads it with safetensors.torch
    back = fi.Transformer(cfg, rngs=nnx.Rngs(3))
    fi.load(back, path)
    assert_same_params(model, back)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = small_config()
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    path = tmp_path / "model.safetensors"
    fi.save(model, path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        fi.save(fi.Transformer(cfg, rngs=nnx.Rngs(1)), path)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("scan", [True, False])
def test_load_model_builds_no_random_model_and_gives_the_saved_weights(tmp_path, monkeypatch, scan):
    """load_model reads the config from the file, builds the model abstractly (no parameter initialiser runs), and
    places the saved weights; the rng streams are those of a model built with the same seed; files are 0644."""
    cfg = small_config(position="learned", causal=True)
    flax_config = fi.FlaxConfig(scan_layers=scan)
    model = fi.Transformer(cfg, flax_config=flax_config, rngs=nnx.Rngs(0))
    path = tmp_path / "model.safetensors"
    fi.save(model, path)
    assert path.stat().st_mode & 0o777 == 0o644
    abstract = []
    build = interop.build_abstract

    def watched(factory):
        module = build(factory)
        abstract.append(all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for _, v in params(module)))
        return module

    monkeypatch.setattr(interop, "build_abstract", watched)
    back = fi.load_model(path, flax_config=flax_config, seed=0)
    assert abstract == [True]  # built with no parameter allocated: each is placed once, from the file
    assert_same_params(model, back)

    def rng_state(m):
        flat = nnx.to_flat_state(nnx.state(m, nnx.Not(nnx.Param)))
        return {p: np.asarray(jax.random.key_data(v[...]) if p[-1] == "key" else v[...]) for p, v in flat}

    want, got = rng_state(model), rng_state(back)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    ids = np.asarray([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(model.eval() or model(ids)))
    bare = tmp_path / "bare.safetensors"
    from safetensors.numpy import save_file

    save_file(fi.to_numpy_state_dict(model), str(bare))
    with pytest.raises(ValueError, match="carries no flax_impl config"):
        fi.load_model(bare)


def params(module):
    return nnx.to_flat_state(nnx.state(module, nnx.Param))


def test_count_params_both_sides():
    cfg = small_config(position="learned")
    assert fi.count_params(fi.Transformer(cfg, rngs=nnx.Rngs(0))) == tr.count_params(tr.Transformer(cfg))
