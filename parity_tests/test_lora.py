"""LoRA on our own model (flax_impl.lora), each property against its formula: the adapted forward, the init law,
the dropout law, merge and unmerge, targets by name, scanned = unrolled, the KV cache. Against transformers +
peft (PEFT folders both ways, 10 AdamW steps): parity_tests/test_lora_peft.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_config

import flax_impl as fi
from flax_impl import lora
from flax_impl.config import TrainConfig
from flax_impl.tolerances import DROPOUT_SIGMAS, EXACT, RECOMPILED, SHORT_SUM

# Llama-like: grouped-query (in_proj columns [q 32 | k 16 | v 16]), gated MLP, RoPE.
CFG = small_config(causal=True, position="rope", norm="rmsnorm", mlp="gated", n_kv_heads=2, bias=False)
TARGETS = ("q_proj", "v_proj", "down_proj")  # q and v of in_proj (k between them untouched), the MLP's down


def _model(scan: bool = True, config: lora.LoraConfig | None = None, seed: int = 0) -> fi.Transformer:
    """A Llama-like model with adapters whose B is random (a fresh B is zero and would hide every mistake)."""
    model = fi.Transformer(CFG, flax_config=fi.FlaxConfig(scan_layers=scan), rngs=nnx.Rngs(seed))
    model.eval()
    config = config or lora.LoraConfig(r=4, alpha=8, targets=TARGETS, model_type="llama")
    lora.apply_lora(model, config, rngs=nnx.Rngs(seed + 1))
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        for key in layer.lora:
            b = layer.lora[key].b
            b[...] = jnp.asarray(rng.standard_normal(b.get_value().shape).astype(np.float32) * 0.3)
    return model


def _ids(B: int = 2, L: int = 9, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (B, L)))


def test_api_smoke():
    """The public names work together: adapt, forward, an optimizer over the adapters only, merge, a plain copy."""
    model = _model()
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, fi.LoraParam))}
    assert names == {
        f"blocks.{site}.lora.{part}.{ab}"
        for site, part in (("attn.in_proj", "q_proj"), ("attn.in_proj", "v_proj"), ("ff.down", "down_proj"))
        for ab in "ab"
    }
    assert fi.lora_config(model).targets == TARGETS
    optimizer = fi.make_lora_optimizer(model, TrainConfig(total_steps=10, warmup_steps=1))
    opt_paths = [p for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))]
    assert opt_paths and all("lora" in p for p in opt_paths if "mu" in p or "nu" in p)
    plain = fi.merged_model(model)
    assert not nnx.state(plain, fi.LoraParam) and fi.lora_config(plain) is None
    assert fi.lora_config(model) is not None  # the adapted model is left as it is


def test_fresh_adapters_change_nothing_and_follow_peft_init():
    """B starts at zero (outputs bit-equal), A at kaiming-uniform(a=sqrt(5)) as peft: U(-1/sqrt(D_in), 1/sqrt(D_in)),
    variance bound^2 / 3, drawn afresh for each layer of a scanned stack."""
    model = fi.Transformer(CFG, rngs=nnx.Rngs(0))
    model.eval()
    before = np.asarray(model(_ids()))
    fi.apply_lora(model, fi.LoraConfig(r=16, targets="all-linear", model_type="llama"), rngs=nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(model(_ids())), before, rtol=0, atol=EXACT)
    for _, layer in lora.lora_layers(model):
        for part in layer.lora.values():
            a, b = np.asarray(part.a[...]), np.asarray(part.b[...])  # (n_layers, D_in, r), (n_layers, r, D_out)
            bound = 1 / np.sqrt(a.shape[1])
            assert not b.any() and np.abs(a).max() <= bound
            n = a.size  # the sample variance of n uniform draws has a relative spread of ~sqrt(0.8 / n)
            assert abs(a.var() / (bound**2 / 3) - 1) < DROPOUT_SIGMAS * np.sqrt(0.8 / n)
            assert not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapted_linear_matches_the_formula(use_rslora):
    """y = x W + b, plus (x A_p) B_p s on each part's columns, in float64: q columns [0, 32) and v columns
    [48, 64) of in_proj move, k columns [32, 48) stay bit-equal to the base layer's; s = alpha / r or
    alpha / sqrt(r)."""
    config = lora.LoraConfig(r=4, alpha=6, targets=TARGETS, model_type="llama", use_rslora=use_rslora)
    model = _model(scan=False, config=config)
    layer = model.blocks[0].attn.in_proj
    x = np.random.default_rng(1).standard_normal((3, 5, CFG.d_model)).astype(np.float32)
    y = np.asarray(layer(jnp.asarray(x)), np.float64)
    W = np.asarray(layer.kernel[...], np.float64)
    want = x @ W
    s = 6 / (np.sqrt(4) if use_rslora else 4)
    for key, (start, stop) in {"q_proj": (0, 32), "v_proj": (48, 64)}.items():
        A, B = (np.asarray(getattr(layer.lora[key], ab)[...], np.float64) for ab in "ab")
        want[..., start:stop] += (x @ A) @ B * s
    scale = np.abs(want).max()
    np.testing.assert_allclose(y, want, rtol=0, atol=SHORT_SUM * scale)
    base = np.asarray(nnx.Linear.__call__(layer, jnp.asarray(x)))
    np.testing.assert_array_equal(y[..., 32:48], base[..., 32:48].astype(np.float64))
    assert np.abs(y - base).max() > 1e3 * SHORT_SUM * scale


def test_merge_then_unmerge():
    """Merged: the same outputs up to roundoff (one rounding of W + s A B per element), adapters skipped (changing
    them changes nothing); unmerged: each kernel within one rounding of the sum of its value before merging:
    |W' - W| <= ulp(max(|W|, |W + s A B|))."""
    model = _model()
    ids = _ids()
    adapted = np.asarray(model(ids))
    kernels = {p: np.asarray(layer.kernel[...]) for p, layer in lora.lora_layers(model)}
    fi.merge_lora(model)
    merged = np.asarray(model(ids))
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=RECOMPILED * np.abs(adapted).max())
    for _, layer in lora.lora_layers(model):
        for part in layer.lora.values():
            part.b[...] = part.b[...] * 2
    np.testing.assert_array_equal(np.asarray(model(ids)), merged)
    for _, layer in lora.lora_layers(model):
        for part in layer.lora.values():
            part.b[...] = part.b[...] / 2  # exact: a power of two
    summed = {p: np.asarray(layer.kernel[...]) for p, layer in lora.lora_layers(model)}
    fi.unmerge_lora(model)
    for p, layer in lora.lora_layers(model):
        back, w = np.asarray(layer.kernel[...]), kernels[p]
        assert not np.array_equal(summed[p], w)
        assert (np.abs(back - w) <= np.spacing(np.maximum(np.abs(w), np.abs(summed[p])))).all()
    np.testing.assert_allclose(np.asarray(model(ids)), adapted, rtol=0, atol=RECOMPILED * np.abs(adapted).max())


def test_merged_model_is_plain_and_computes_the_same():
    model = _model()
    ids = _ids()
    plain = fi.merged_model(model)
    assert not lora.lora_layers(plain)
    assert type(plain.blocks.attn.in_proj) is nnx.Linear
    want = np.asarray(model(ids))
    np.testing.assert_allclose(np.asarray(plain(ids)), want, rtol=0, atol=RECOMPILED * np.abs(want).max())
