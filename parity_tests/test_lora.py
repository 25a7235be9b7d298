"""LoRA on our own model (flax_impl.lora), each property against its formula: the adapted forward, the init law,
the dropout law, merge and unmerge, targets by name, scanned = unrolled, the KV cache. Against transformers +
peft (PEFT folders both ways, 10 AdamW steps): parity_tests/test_lora_peft.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import small_config
from jax.sharding import NamedSharding, PartitionSpec

import flax_impl as fi
from flax_impl import distributed as dist, lora, train as ftrain
from flax_impl.config import TrainConfig
from flax_impl.tolerances import DECODE_REL, DROPOUT_SIGMAS, EXACT, RECOMPILED, SHORT_SUM, TRAIN_REL

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
    """The public names work together: adapt, the adapters' names, a plain copy (the optimizer: the mesh test and
    parity_tests/test_lora_peft.py)."""
    model = _model()
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, fi.LoraParam))}
    assert names == {
        f"blocks.{site}.lora.{part}.{ab}"
        for site, part in (("attn.in_proj", "q_proj"), ("attn.in_proj", "v_proj"), ("ff.down", "down_proj"))
        for ab in "ab"
    }
    assert fi.lora_config(model).targets == TARGETS
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


def test_scanned_stack_equals_its_unstacked_form():
    """`unstacked()` slices the stacked adapters with the layers (the form `generate` decodes with)."""
    model = _model()
    flat = model.unstacked()
    assert isinstance(flat.blocks, nnx.List) and len(lora.lora_layers(flat)) == 2 * CFG.n_layers
    want = np.asarray(model(_ids()))
    np.testing.assert_allclose(np.asarray(flat(_ids())), want, rtol=0, atol=RECOMPILED * np.abs(want).max())


def test_cached_decoding_with_adapters_equals_the_full_forward():
    """Prefill + one-token steps through the KV cache = the full forward, and `generate` (which decodes with the
    unstacked form) chooses from the full forward's logits; relative to each row's largest logit."""
    model = _model()
    ids = _ids(B=1, L=7)
    full = np.asarray(model.logits(model(ids)))[0]  # (L, V)
    cache = model.init_cache(batch=1, max_len=8)
    h, cache = model(ids[:, :5], cache=cache)
    rows = [np.asarray(model.logits(h))[0]]
    for t in (5, 6):
        h, cache = model(ids[:, t : t + 1], cache=cache)
        rows.append(np.asarray(model.logits(h))[0])
    cached = np.concatenate(rows)
    assert (np.abs(cached - full) <= DECODE_REL * np.abs(full).max(axis=-1, keepdims=True)).all()
    out = fi.generate(model, [[3, 4, 5]], max_new_tokens=3, return_logits=True)
    seq = jnp.asarray([[3, 4, 5, *out.tokens[0, :2].tolist()]])
    want = np.asarray(model.logits(model(seq)))[0, 2:]  # the logits each step chose from
    assert (np.abs(out.logits[0] - want) <= DECODE_REL * np.abs(want).max(axis=-1, keepdims=True)).all()
    np.testing.assert_array_equal(out.tokens[0], want.argmax(-1))


def _identity_lora(rate: float) -> lora.LoraLinear:
    """A 64 -> 64 Linear of zero weights with two adapters, on columns [0, 32) and [32, 64), A = I and B = I
    restricted to the span, s = 1: its output is dropout(x), exactly (sums with zeros only)."""
    D = 64
    config = lora.LoraConfig(r=D, alpha=D, dropout=rate)
    base = nnx.Linear(D, D, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    layer = lora.LoraLinear(base, (("q", 0, 32), ("v", 32, 64)), config, layers=None, deterministic=False,
                            rngs=nnx.Rngs(params=0, dropout=1))  # fmt: skip
    for key, start in (("q", 0), ("v", 32)):
        layer.lora[key].a[...] = jnp.eye(D)
        layer.lora[key].b[...] = jnp.eye(D)[:, start : start + 32]
    return layer


def test_adapter_dropout_follows_its_law():
    """Each adapter drops its own input (peft: one nn.Dropout per adapted module): the adapted part equals
    x / (1 - p) where kept and 0 where dropped, the dropped fraction is p within DROPOUT_SIGMAS binomial standard
    deviations, the two adapters' masks are independent (both dropped: p^2), a new call draws a new mask, eval
    mode is the identity; stacked adapters hold one dropout key per layer."""
    p = 0.3
    layer = _identity_lora(p)
    x = jnp.asarray(np.random.default_rng(2).uniform(1, 2, (64, 8, 64)).astype(np.float32))  # no zeros
    delta = np.asarray(layer(x))
    kept = delta != 0
    np.testing.assert_array_equal(delta[kept], np.asarray(x)[kept] * np.float32(1 / (1 - p)))  # Dropout's scale
    n = kept.size
    assert abs((~kept).mean() - p) <= DROPOUT_SIGMAS * np.sqrt(p * (1 - p) / n)
    both = ~kept[..., :32] & ~kept[..., 32:]  # column j of q and of v read the same x_j
    assert abs(both.mean() - p * p) <= DROPOUT_SIGMAS * np.sqrt(p * p * (1 - p * p) / both.size)
    assert not np.array_equal(np.asarray(layer(x)) != 0, kept)
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))
    model = _model(config=lora.LoraConfig(r=2, dropout=0.1, targets=("o_proj",), model_type="llama"))
    keys = model.blocks.attn.out_proj.lora["o_proj"].dropout.rngs.key[...]
    assert keys.shape == (CFG.n_layers,) and not np.array_equal(*map(jax.random.key_data, keys))
    assert model.blocks.attn.out_proj.lora["o_proj"].dropout.deterministic  # the model's mode (eval)


@pytest.mark.parametrize("target", ["out_proj", "ff.3"])
def test_adapter_dropout_draws_a_new_mask_each_call_inside_the_model(target):
    """The attention's out_proj runs in a recompute region and the plain MLP's second Linear under nnx.remat:
    an adapter's dropout stream must still advance there (else every step reuses one mask)."""
    cfg = CFG if target == "out_proj" else small_config(causal=True)
    model = fi.Transformer(cfg, rngs=nnx.Rngs(0))
    fi.apply_lora(model, lora.LoraConfig(r=2, dropout=0.5, targets=(target,)), rngs=nnx.Rngs(1))
    for _, layer in lora.lora_layers(model):
        for part in layer.lora.values():  # random: a B of ones adds one shift to every feature, which LayerNorm drops
            part.b[...] = jax.random.normal(jax.random.key(0), part.b.get_value().shape)
    model.train()
    assert cfg.dropout == cfg.attention_dropout == 0.0  # the adapters' dropout is the only randomness
    step = nnx.jit(lambda m, i: m(i))
    first, second = np.asarray(step(model, _ids())), np.asarray(step(model, _ids()))
    assert np.abs(first - second).max() > 1e-3


def test_our_names_and_all_linear():
    """Without model_type, targets are our module names: one adapter over all of in_proj."""
    model = _model(config=lora.LoraConfig(r=2, targets=("in_proj", "ff.down")))
    spans = {p[-1]: layer.spans for p, layer in lora.lora_layers(model)}
    assert spans == {"in_proj": (("in_proj", 0, 64),), "down": (("down", 0, 32),)}
    model = _model(config=lora.LoraConfig(r=2, targets="all-linear", model_type="llama"))
    assert {k for _, layer in lora.lora_layers(model) for k in layer.lora} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip


@pytest.mark.parametrize(
    "config,match",
    [
        (dict(targets=("qq_proj",)), r"\['qq_proj'\] name no projection.*'q_proj'"),
        (dict(targets=("lm_head",)), "embeddings, norms and LM head are not targets"),
        (dict(targets=r"model\.layers\.0\.self_attn\.q_proj"), r"in layers \[0\] only"),
        (dict(model_type="gpt3"), "model_type='gpt3' is not supported"),
        (dict(model_type="phi3"), r"model_type='phi3' is not supported: its .*gate_up_proj stores several"),
    ],
)
def test_bad_targets_are_refused_before_the_model_changes(config, match):
    model = fi.Transformer(CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        fi.apply_lora(model, fi.LoraConfig(**{"model_type": "llama", **config}), rngs=nnx.Rngs(0))
    assert not lora.lora_layers(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(r=0), "r=0"), (dict(alpha=0), "alpha=0"), (dict(dropout=1.0), "dropout=1.0"), (dict(targets=()), "targets")],
)
def test_bad_lora_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fi.LoraConfig(**kwargs)


def test_misuse_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="carries LoRA adapters already"):
        fi.apply_lora(model, fi.LoraConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="LoraConfig"):
        fi.apply_lora(fi.Transformer(CFG, rngs=nnx.Rngs(0)), dict(r=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA adapter"):
        fi.make_lora_optimizer(fi.Transformer(CFG, rngs=nnx.Rngs(0)), TrainConfig())
    ours = _model(config=lora.LoraConfig(r=2, targets=("in_proj",)))
    with pytest.raises(ValueError, match="PEFT keys need a family"):
        fi.save_peft_adapter(ours, "/nonexistent/never-written")


def test_adapters_on_a_mesh_are_replicated_and_train_as_on_one_device():
    """apply_lora on a sharded model places the adapters replicated on its mesh; sharded_train_step with the
    adapters' optimizer differentiates them only and computes train_step's losses. (One device here; the suite's
    8-device runs are tests/test_distributed.py.)"""
    config = lora.LoraConfig(r=2, targets=("q_proj", "down_proj"), model_type="llama")
    tcfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=3, weight_decay=0.1, clip_norm=1.0)
    batches = [ftrain.next_token_batch(np.asarray(_ids(B=2, L=9, seed=s)), vocab_size=CFG.vocab_size) for s in (3, 4)]
    mesh = dist.make_mesh(1, 1)
    sharded = dist.create_sharded_model(CFG, mesh, seed=0)
    fi.apply_lora(sharded, config, rngs=nnx.Rngs(1))
    for _, var in nnx.to_flat_state(nnx.state(sharded, fi.LoraParam)):
        sharding = var.get_value().sharding
        assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh and sharding.spec == PartitionSpec()
    tx = ftrain.make_tx(tcfg, decay=lora.lora_decay)
    optimizer = dist.create_sharded_optimizer(sharded, tx, mesh, wrt=fi.LoraParam)
    got = [float(dist.sharded_train_step(sharded, optimizer, b, mesh=mesh)["loss"]) for b in batches]
    plain = fi.Transformer(CFG, rngs=nnx.Rngs(0))
    fi.apply_lora(plain, config, rngs=nnx.Rngs(1))
    plain_optimizer = fi.make_lora_optimizer(plain, tcfg)
    want = [float(ftrain.train_step(plain, plain_optimizer, b)["loss"]) for b in batches]
    np.testing.assert_allclose(got, want, rtol=TRAIN_REL, atol=0)


def test_peft_folder_round_trip_and_refusals(tmp_path):
    """Our folder read back (into the unscanned form) holds the same tensors, bit for bit; options we do not
    implement, a foreign peft_type and missing / unexpected keys are refused before the model changes."""
    import dataclasses
    import json

    from safetensors.numpy import load_file, save_file

    from flax_impl.hf.adapters import peft_state_dict

    model = _model()
    fi.save_peft_adapter(model, tmp_path)
    again = fi.Transformer(CFG, flax_config=fi.FlaxConfig(scan_layers=False), rngs=nnx.Rngs(5))
    read = fi.load_peft_adapter(again, tmp_path, model_type="llama")
    assert read == dataclasses.replace(fi.lora_config(model), targets=tuple(sorted(TARGETS)))  # peft sorts them
    want, got = peft_state_dict(model), peft_state_dict(again)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], v) for k, v in want.items())

    def refused(match: str, config: dict | None = None, tensors: dict | None = None) -> None:
        folder = tmp_path / "bad"
        folder.mkdir(exist_ok=True)
        config = {**json.loads((tmp_path / "adapter_config.json").read_text()), **(config or {})}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors or load_file(tmp_path / "adapter_model.safetensors"), folder / "adapter_model.safetensors")
        fresh = fi.Transformer(CFG, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=match):
            fi.load_peft_adapter(fresh, folder, model_type="llama")
        assert not lora.lora_layers(fresh)

    refused(r"use_dora=True: DoRA.*\n.*rank_pattern=\{'q_proj': 2\}", dict(use_dora=True, rank_pattern={"q_proj": 2}))
    refused("peft_type='PREFIX_TUNING'", dict(peft_type="PREFIX_TUNING"))
    tensors = dict(want)
    lost = tensors.pop("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] = lost
    refused(r"missing key: .*layers\.1\.mlp\.down_proj\.lora_B.*\n  unexpected key: .*up_proj", tensors=tensors)
