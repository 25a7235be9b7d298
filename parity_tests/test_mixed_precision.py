"""bfloat16 compute with float32 parameters (dtype="bfloat16", param_dtype="float32") against torch_ref under
torch.autocast("cpu", dtype=torch.bfloat16), and the float32 islands: LayerNorm, softmax and RoPE angles.

Tolerance: BF16_REL (tolerances.py), element-wise, relative to the reference's largest |y|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from helpers import POSITIONS, small_config, twins

import flax_impl as fi
import torch_ref.positions as torch_positions
from flax_impl.tolerances import BF16_REL, ENCODER

BF16 = fi.FlaxConfig(dtype="bfloat16", param_dtype="float32")


def _ids_and_mask(seed: int, B: int = 2, L: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 97, (B, L))
    mask = (np.arange(L)[None, :] < np.array([[L], [L - 5]])).astype(np.int32)  # row 1 right-padded
    return ids, mask


def _rel_err(got: np.ndarray, want: np.ndarray, keep: np.ndarray) -> float:
    return float(np.abs(got - want)[keep].max() / np.abs(want).max())


@pytest.mark.parametrize(
    "position,norm_first", [(p, True) for p in POSITIONS if p != "none"] + [("rope", False), ("sinusoidal", False)]
)
def test_bf16_encoder_matches_torch_autocast(position, norm_first):
    """Same float32 weights; Flax computes in bf16, torch under autocast. Both are within BF16_REL of each other
    and of torch in float32, while the float32 Flax path is thousands of times closer (ENCODER)."""
    kw = dict(position=position, norm_first=norm_first)
    flax_bf16, twin = twins("Transformer", small_config(**kw), seed=3, flax_config=BF16)
    flax_f32 = fi.Transformer(small_config(**kw), rngs=nnx.Rngs(3))
    flax_f32.eval()
    ids, mask = _ids_and_mask(seed=3)
    out = flax_bf16(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    y_bf16 = np.asarray(out.astype(jnp.float32))
    y_f32 = np.asarray(flax_f32(jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        t_f32 = twin(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t_bf16 = twin(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
    keep = mask.astype(bool)  # padded query rows are compared too in the fp32 suite; here only real tokens
    # autocast really ran in bf16 (float32 paths differ by ~1e-6, a quarter of bf16's u = 2^-8 is 1e-3)
    assert _rel_err(t_bf16, t_f32, keep) > 2.0**-10, "autocast did not change the numerics: nothing tested"
    assert _rel_err(y_bf16, t_bf16, keep) <= BF16_REL
    assert _rel_err(y_bf16, t_f32, keep) <= BF16_REL
    np.testing.assert_allclose(y_f32, t_f32, rtol=0, atol=ENCODER)
    assert ENCODER < 1e-3 * BF16_REL * np.abs(t_f32).max()


def _rope_angles_in_bf16(
    x, positions, *, base=10_000.0, style="half", fraction=1.0, scale=1.0, inv_freq=None, factor=1.0
):
    """A deliberately wrong torch RoPE: positions and angles rounded to bf16 (the compute dtype)."""
    assert style == "half" and fraction == 1.0 and factor == 1.0
    H = x.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / base ** (torch.arange(0, H, 2, dtype=torch.float64) / H) / scale  # (H/2,)
    inv_freq = torch.as_tensor(inv_freq, dtype=torch.float64)
    angle = (torch.as_tensor(positions).to(torch.bfloat16)[:, None] * inv_freq.to(torch.bfloat16)).float()
    cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]  # (L, 1, H/2)
    a, b = x.float()[..., : H // 2], x.float()[..., H // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


def test_bf16_tolerance_catches_rope_angles_in_bf16(rng, monkeypatch):
    """At positions 1000..1015 a RoPE whose angles are rounded to bf16 (ulp(1000) = 4 rad) is far outside
    BF16_REL; the real one (angles in float32 on both sides) is inside. Block level, unit-scale inputs."""
    flax_block, twin = twins("TransformerBlock", small_config(position="rope"), seed=1, flax_config=BF16)
    x = rng.standard_normal((2, 16, 32)).astype(np.float32)
    pos = np.arange(1000, 1016)
    y = np.asarray(flax_block(jnp.asarray(x), positions=jnp.asarray(pos)).astype(jnp.float32))
    keep = np.ones(y.shape, bool)

    def torch_out() -> np.ndarray:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return twin(torch.from_numpy(x), None, torch.from_numpy(pos)).float().numpy()

    assert _rel_err(y, torch_out(), keep) <= BF16_REL
    monkeypatch.setattr(torch_positions, "apply_rope", _rope_angles_in_bf16)
    assert _rel_err(y, torch_out(), keep) > 4 * BF16_REL


def _primitives(jaxpr, found: list) -> list:
    """(primitive name, input dtypes) of every equation, nested jaxprs (scan, custom_jvp, pjit) included."""
    for eqn in jaxpr.eqns:
        found.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _primitives(sub.jaxpr, found)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _primitives(sub, found)
    return found


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_bf16_keeps_params_float32_and_norms_softmax_rope_in_float32(position):
    """Parameters stay float32; every matmul takes bf16 operands; every exp (softmax), cos / sin (RoPE angles),
    rsqrt (LayerNorm) and reduction (LayerNorm statistics, softmax max and sum) runs in float32."""
    cfg = small_config(position=position, input_norm=True)
    model = fi.Transformer(cfg, flax_config=BF16, rngs=nnx.Rngs(0))
    model.eval()
    dtypes = {str(v[...].dtype) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert dtypes == {"float32"}
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((2, 8), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids, jnp.ones((2, 8), jnp.int32)))(state)
    prims = _primitives(jaxpr.jaxpr, [])
    matmuls = [d for name, d in prims if name == "dot_general"]
    assert len(matmuls) == 6 and all(d == ("bfloat16", "bfloat16") for d in matmuls), matmuls  # in/out, qk, pv, ff
    islands = {"exp", "rsqrt", "reduce_sum", "reduce_max"} | ({"cos", "sin"} if position == "rope" else set())
    seen = {name for name, _ in prims}
    assert islands <= seen
    bad = [(name, d) for name, d in prims if name in islands and set(d) != {"float32"}]
    assert not bad, f"computed below float32: {bad}"
    # 1 input norm + 2 per block (a scanned stack is traced once) + the final norm
    assert sum(name == "rsqrt" for name, _ in prims) == 4
