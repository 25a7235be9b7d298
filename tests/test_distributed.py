"""Sharded encoder on a (data, model) mesh of 8 simulated CPU devices vs the same encoder on one device.

The 8-device runs happen in a subprocess (distributed_worker.py, XLA_FLAGS=--xla_force_host_platform_device_count=8)
so that this process, and the rest of the suite, keeps one device. The subprocess runs once per session and
reports numbers; the assertions are here. The expected layout below is the Megatron rule written out by hand
(Shoeybi et al., 2019), not read from flax_impl.sharding.
"""

from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import eight_device_report

from flax_impl import distributed as dist
from flax_impl.sharding import constrain
from flax_impl.tolerances import ENCODER, GRAD_REL, TRAIN_REL

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
WORKER = Path(__file__).with_name("distributed_worker.py")

# (spec per array axis) for every parameter of the worker's scanned encoder; blocks.* have the layer axis first.
M = "model"
EXPECTED = {
    "input.embed.weight": (M, None),  # (V, D): vocab-parallel
    "blocks.attn.in_proj.kernel": (None, None, M),  # (layers, D, 3D): column-parallel
    "blocks.attn.in_proj.bias": (None, M),
    "blocks.attn.out_proj.kernel": (None, M, None),  # (layers, D, D): row-parallel
    "blocks.attn.out_proj.bias": (None, None),
    "blocks.ff.0.kernel": (None, None, M),  # (layers, D, F): column-parallel
    "blocks.ff.0.bias": (None, M),
    "blocks.ff.3.kernel": (None, M, None),  # (layers, F, D): row-parallel
    "blocks.ff.3.bias": (None, None),
    "blocks.ln1.scale": (None, None),
    "blocks.ln1.bias": (None, None),
    "blocks.ln2.scale": (None, None),
    "blocks.ln2.bias": (None, None),
    "final_norm.scale": (None,),
    "final_norm.bias": (None,),
}


@pytest.fixture(scope="module")
def report() -> dict:
    return eight_device_report(WORKER)


def _normalised(spec, ndim: int, model_size: int) -> tuple:
    """A spec padded to ndim; a size-1 mesh axis splits nothing, so it reads as None (JAX drops it too)."""
    spec = [None if a == M and model_size == 1 else a for a in spec] + [None] * (ndim - len(spec))
    return tuple(spec)


@pytest.mark.slow
@pytest.mark.parametrize("data,model", MESHES)
def test_parameters_and_optimizer_state_really_are_sharded(report, data, model):
    run = report["meshes"][f"{data}x{model}"]
    assert set(run["params"]) == set(EXPECTED), "every parameter must have a stated layout"
    for path, want in EXPECTED.items():
        p = run["params"][path]
        assert _normalised(p["spec"], len(p["shape"]), model) == _normalised(want, len(want), model), path
        shard = [n // model if a == M else n for n, a in zip(p["shape"], want, strict=True)]
        assert p["shard_shapes"] == [shard], f"{path}: shards {p['shard_shapes']}, expected {shard}"
        assert p["n_devices"] == 8
        assert p["distinct_blocks"] == (model if M in want else 1), path
        # the optimizer's momentum is laid out exactly like its parameter
        assert run["optimizer"][f"opt_state.0.trace.{path}"] == p, path


@pytest.mark.slow
@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_init_forward_and_train_step_equal_one_device(report, data, model):
    run = report["meshes"][f"{data}x{model}"]
    assert run["init_max_abs_diff"] == 0.0  # the same random bits, whatever the sharding
    assert run["forward_max_abs_diff"] <= ENCODER
    assert _normalised(run["forward_spec"], 3, 1) == (("data" if data > 1 else None), None, None)
    assert abs(run["loss"] - report["ref_loss"]) <= TRAIN_REL * report["ref_loss"]
    assert abs(run["grad_norm"] - report["ref_grad_norm"]) <= GRAD_REL * report["ref_grad_norm"]
    # SGD with momentum, one step: the update is -lr * grad, compared relative to each tensor's largest entry
    assert set(run["update_rel_err"]) == set(EXPECTED)
    worst = max(run["update_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= GRAD_REL, f"{worst[0]}: relative update difference {worst[1]:.3g}"


@pytest.mark.slow
def test_unsplittable_shapes_fail_clearly(report):
    errors = report["errors"]
    assert errors["n_heads"] == "n_heads=2 is not divisible by the mesh's model axis size 4"
    assert errors["d_ff"] == "d_ff=66 is not divisible by the mesh's model axis size 4"
    assert errors["vocab_size"] == "vocab_size=66 is not divisible by the mesh's model axis size 4"
    assert errors["mesh_size"].startswith("mesh data=3 x model=2 needs 6 devices, but 8 are available")
    assert "batch size (3,)" in errors["batch"] and "data axis size 2" in errors["batch"]


@pytest.mark.slow
def test_cli_train_with_mesh_matches_single_device(report):
    """`flax-impl train --mesh data=4,model=2` runs, and its 4 training losses and held-out loss equal those of
    the unsharded run (same seed, same batches, dropout off)."""
    single, mesh = report["cli"]["single"], report["cli"]["mesh"]
    assert len(single) == len(mesh) == 5
    np.testing.assert_allclose(mesh, single, rtol=TRAIN_REL, atol=0)


@pytest.mark.slow
def test_cli_bench_with_mesh_runs_and_reports(report):
    """`flax-impl bench --mesh data=4,model=2` runs sharded over the 8 simulated devices and reports it."""
    bench = report["bench"]
    assert bench["mesh"] == {"data": 4, "model": 2} and bench["jax_device_count"] == 8
    flax_rows = [r for r in bench["results"] if r["framework"] == "flax"]
    assert {r["mode"] for r in flax_rows} == {"forward", "train"}
    assert all(r["tokens_per_s"]["median"] > 0 for r in bench["results"])


# ------------------------------------------------------------------------- in this process (one device)
def test_parse_mesh():
    assert dist.parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert dist.parse_mesh(" model=8 ") == {"data": 1, "model": 8}
    assert dist.parse_mesh("data=8") == {"data": 8, "model": 1}
    for bad, match in [("data=4,tensor=2", "'tensor=2'"), ("data=0", "data='0'"), ("data=2,data=2", "twice"),
                       ("4x2", "'4x2'"), ("model=two", "model='two'")]:
        with pytest.raises(ValueError, match=match):
            dist.parse_mesh(bad)


def test_make_mesh_checks_the_device_count():
    n = jax.device_count()
    mesh = dist.make_mesh(n, 1)
    assert mesh.axis_names == ("data", "model") and mesh.shape["data"] == n
    with pytest.raises(ValueError, match=f"data={2 * n} x model=1 needs {2 * n} devices, but {n} are available"):
        dist.make_mesh(2 * n, 1)
    with pytest.raises(ValueError, match="model=0"):
        dist.make_mesh(1, 0)


def test_cli_rejects_a_mesh_that_does_not_fit_before_any_work(tmp_path, capsys):
    from flax_impl.apps.cli import main as cli_main

    n = jax.device_count()
    out = tmp_path / "run"
    assert cli_main(["train", "--steps", "2", "--warmup", "0", "--out", str(out), "--mesh", f"data={2 * n}"]) == 2
    assert f"mesh data={2 * n} x model=1 needs {2 * n} devices" in capsys.readouterr().err
    assert cli_main(["train", "--steps", "2", "--warmup", "0", "--out", str(out), "--mesh", "data=2;model=1"]) == 2
    assert "mesh axis size data='2;model=1' must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_constrain_is_the_identity_without_a_mesh():
    x = jax.numpy.arange(6.0).reshape(1, 2, 3)
    assert constrain(x, ("data", None, None)) is x
    mesh = dist.make_mesh(jax.device_count(), 1)
    with jax.set_mesh(mesh):  # under a mesh it is a real constraint, and checks its spec against the array
        with pytest.raises(ValueError, match="3 entries for an array of shape"):
            constrain(x[0], ("data", None, None))
