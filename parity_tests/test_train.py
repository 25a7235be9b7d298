"""Training parity: optax AdamW (flax_impl.train) vs torch.optim.AdamW (torch_ref.train) step for step, the
schedule and the weight-decay groups against their formulas, dropout threading (the command: tests/test_train_cli.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from helpers import small_config

import flax_impl as fi
import torch_ref as tr
from flax_impl import train as ftrain
from flax_impl.config import TrainConfig
from flax_impl.tokenizer import MASK_ID, PAD_ID
from flax_impl.tolerances import ELEMENTWISE, GRAD_REL, TRAIN_REL
from torch_ref import train as ttrain

STEPS = 10


def _batches(cfg, n: int, seed: int = 7, B: int = 4, L: int = 16) -> list[dict]:
    """n objective batches from random regular ids (4..V-1), rows 1 and 3 right-padded with PAD_ID."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(4, cfg.vocab_size, size=(B, L + 1 if cfg.causal else L))
        tokens[1, -5:] = PAD_ID
        tokens[3, -9:] = PAD_ID
        out.append(ftrain.make_batch(tokens, cfg, TCFG, rng))
    return out


# Clipping active (initial gradient norms are ~3-10), weight decay large enough to matter in 10 steps, lr high
# enough that the parameters move far beyond the tolerance.
TCFG = TrainConfig(learning_rate=1e-2, warmup_steps=3, total_steps=STEPS, weight_decay=0.1, clip_norm=1.0)


def _twins(cfg, seed: int = 0):
    model = fi.Transformer(cfg, rngs=nnx.Rngs(seed))
    twin = tr.Transformer(cfg)
    twin.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(model)))
    return model, twin


def _train_both(cfg, tcfg, batches):
    model, twin = _twins(cfg)
    before = fi.to_numpy_state_dict(model)
    opt = ftrain.make_optimizer(model, tcfg)
    topt, sched = ttrain.make_optimizer(twin, tcfg)
    model.train()
    twin.train()
    flax_log, torch_log = [], []
    for batch in batches:
        m = ftrain.train_step(model, opt, batch)
        flax_log.append((float(m["loss"]), float(m["grad_norm"])))
        torch_log.append(tuple(ttrain.train_step(twin, topt, sched, batch, tcfg.clip_norm).values()))
    return model, twin, before, np.array(flax_log), np.array(torch_log)


@pytest.mark.parametrize(
    "position,causal", [("sinusoidal", False), ("rope", False), ("alibi", False), ("rope", True)]
)
def test_ten_steps_match_torch(position, causal):
    """Same weights, same batches (with padding), dropout off: equal loss and gradient norm at each of 10 steps,
    equal parameters at the end, compared relative to each tensor's largest entry. Excluded: the key third of
    `in_proj_bias` without RoPE, whose gradient is exactly zero (softmax shift invariance) and so pure roundoff
    that AdamW normalises into different ~lr steps (proved in the next test). RoPE runs with rope_base=10, so
    that every rotary pair turns by > 1 rad within L=16 and the key bias gets a real gradient on every pair; with
    base 1e4 the slowest pairs barely turn and their key-bias gradient is a near-cancellation (next test)."""
    extra = {"rope_base": 10.0} if position == "rope" else {}
    cfg = small_config(position=position, causal=causal, padding_idx=PAD_ID, **extra)
    model, twin, before, flog, tlog = _train_both(cfg, TCFG, _batches(cfg, STEPS))
    np.testing.assert_allclose(flog[:, 0], tlog[:, 0], rtol=TRAIN_REL, atol=0)  # loss at every step
    np.testing.assert_allclose(flog[:, 1], tlog[:, 1], rtol=TRAIN_REL, atol=0)  # pre-clip gradient norm
    assert (flog[:, 1] > TCFG.clip_norm).any(), "the clip should be active in some steps"
    after = fi.to_numpy_state_dict(model)
    tstate = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
    assert after.keys() == tstate.keys()
    for key, value in after.items():
        value, want, start = value, tstate[key], before[key]
        if key.endswith("in_proj_bias") and position != "rope":  # key bias: roundoff gradient, see below
            keep = np.r_[0 : cfg.d_model, 2 * cfg.d_model : 3 * cfg.d_model]
            value, want, start = value[keep], want[keep], start[keep]
        scale = np.abs(want).max()
        err = np.abs(value - want).max()
        assert err <= TRAIN_REL * scale, f"{key}: max |flax - torch| = {err:.3g}, scale {scale:.3g}"
        moved = np.abs(value - start).max()
        assert moved > 1e3 * TRAIN_REL * scale, f"{key} barely moved ({moved:.3g}): the test would prove nothing"


@pytest.mark.parametrize("position", ["sinusoidal", "alibi", "rope"])
def test_key_bias_gradient_is_roundoff_unless_rope(position):
    """Why the parameter comparison above skips the key third of `in_proj_bias` (except with RoPE): scores
    q_i . (k_j + b_k) shift by q_i . b_k, the same for every key j (ALiBi and masks add per-pair terms that do not
    involve b_k), and softmax ignores a per-row shift; so d loss / d b_k = 0 exactly and each side computes only
    roundoff. AdamW normalises it (m / sqrt(v)) into steps of size ~lr and random sign, different in each
    framework: b_k drifts differently but never changes an output or a loss. RoPE rotates b_k by R_j, which
    depends on j, so there b_k has a real gradient; but on pairs whose angle barely changes over L positions it
    is a near-cancellation with a large relative roundoff, which AdamW's per-element normalisation amplifies to
    ~1e-4 relative parameter differences after 10 steps: hence rope_base=10 in the test above."""
    cfg = small_config(position=position, padding_idx=PAD_ID)
    model, twin = _twins(cfg)
    batch = _batches(cfg, 1)[0]
    grads = nnx.grad(ftrain.loss_fn)(model, batch)
    ttrain.loss_fn(twin, batch).backward()
    D = cfg.d_model
    flax_g = np.asarray(grads["blocks"]["attn"]["in_proj"]["bias"][...])  # (n_layers, 3D)
    for i in range(cfg.n_layers):
        torch_g = twin.blocks[i].attn.in_proj_bias.grad.numpy()
        for g in (flax_g[i], torch_g):
            scale = np.abs(g).max()
            assert np.abs(g[:D]).max() > 1e3 * GRAD_REL * scale  # query bias: a real gradient
            key_grad = np.abs(g[D : 2 * D])
            if position == "rope":  # a real gradient, but tiny on the slowest pairs (10000^(-3/4) rad/position)
                assert key_grad.max() > 1e3 * GRAD_REL * scale and key_grad.min() < 1e-3 * scale
            else:
                assert key_grad.max() <= GRAD_REL * scale  # zero up to roundoff
        keep = np.r_[0:D, 2 * D : 3 * D] if position != "rope" else np.arange(3 * D)
        atol = GRAD_REL * np.abs(torch_g).max()
        np.testing.assert_allclose(flax_g[i][keep], torch_g[keep], rtol=0, atol=atol)


def test_adamw_update_matches_the_formula_on_both_sides():
    """Three AdamW steps on a Linear(3 -> 2) with a linear loss sum(G_t * W): both sides follow
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    - lr wd p, wd on the weight only. eps = 0.1 makes eps-inside-the-sqrt (optax's eps_root) or a missing bias
    correction fail by far more than the tolerance."""
    tcfg = TrainConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, end_lr_ratio=1.0, weight_decay=0.3,
                       b1=0.8, b2=0.9, eps=0.1, clip_norm=None)
    rng = np.random.default_rng(5)
    W0, b0 = rng.standard_normal((2, 3)), rng.standard_normal(2)  # torch layout
    G = [(rng.standard_normal((2, 3)), rng.standard_normal(2)) for _ in range(3)]
    # The formula, float64.
    p, m, v = [W0.copy(), b0.copy()], [0.0, 0.0], [0.0, 0.0]
    for t, grads in enumerate(G, start=1):
        for i, (g, wd) in enumerate(zip(grads, (tcfg.weight_decay, 0.0), strict=True)):
            m[i] = tcfg.b1 * m[i] + (1 - tcfg.b1) * g
            v[i] = tcfg.b2 * v[i] + (1 - tcfg.b2) * g**2
            step = (m[i] / (1 - tcfg.b1**t)) / (np.sqrt(v[i] / (1 - tcfg.b2**t)) + tcfg.eps)
            p[i] = p[i] - tcfg.learning_rate * (step + wd * p[i])
    # optax, on a plain pytree with Flax's layout (kernel = W.T).
    tx = ftrain.make_tx(tcfg)
    params = {"lin": {"kernel": jnp.asarray(W0.T, jnp.float32), "bias": jnp.asarray(b0, jnp.float32)}}
    state = tx.init(params)
    for gW, gb in G:
        grads = {"lin": {"kernel": jnp.asarray(gW.T, jnp.float32), "bias": jnp.asarray(gb, jnp.float32)}}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    # torch.optim.AdamW through torch_ref's groups and schedule.
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(W0, dtype=torch.float32))
        lin.bias.copy_(torch.as_tensor(b0, dtype=torch.float32))
    opt, sched = ttrain.make_optimizer(lin, tcfg)
    for gW, gb in G:
        opt.zero_grad()
        (lin.weight * torch.as_tensor(gW, dtype=torch.float32)).sum().add(
            (lin.bias * torch.as_tensor(gb, dtype=torch.float32)).sum()
        ).backward()
        opt.step()
        sched.step()
    for got_W, got_b in (
        (np.asarray(params["lin"]["kernel"]).T, np.asarray(params["lin"]["bias"])),
        (lin.weight.detach().numpy(), lin.bias.detach().numpy()),
    ):
        np.testing.assert_allclose(got_W, p[0], rtol=0, atol=ELEMENTWISE)
        np.testing.assert_allclose(got_b, p[1], rtol=0, atol=ELEMENTWISE)


def test_schedule_matches_formula_and_lambdalr():
    tcfg = TrainConfig(learning_rate=0.5, warmup_steps=4, total_steps=12, end_lr_ratio=0.2)
    peak, end = 0.5, 0.1
    expected = {0: 0.0, 2: 0.25, 4: peak, 8: end + (peak - end) * 0.5, 12: end, 20: end}  # cos(pi/2) = 0 at 8
    sched = ftrain.lr_schedule(tcfg)
    lam = ttrain.lr_lambda(tcfg)
    for t, want in expected.items():
        assert float(sched(t)) == pytest.approx(want, rel=1e-6, abs=1e-7)
        assert peak * lam(t) == pytest.approx(want, rel=1e-12, abs=1e-12)
    # LambdaLR drives torch's optimizer through the same values, update after update.
    opt, sch = ttrain.make_optimizer(torch.nn.Linear(2, 2), tcfg)
    for t in range(15):
        assert opt.param_groups[0]["lr"] == pytest.approx(float(sched(t)), rel=1e-6, abs=1e-7)
        opt.step()
        sch.step()


def test_weight_decay_groups_match_on_both_sides():
    cfg = small_config(position="learned", input_norm=True)
    model, twin = _twins(cfg)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    mask = ftrain.decay_mask(params)
    # Flag every decayed parameter with ones and the rest with zeros, then read them back by torch key.
    flags = jax.tree.map(lambda m, p: np.full(p.shape, float(m), np.float32), mask, params)
    nnx.update(model, flags)
    flax_decayed = {k for k, v in fi.to_numpy_state_dict(model).items() if v.all()}
    groups = ttrain.param_groups(twin, 0.1)
    torch_decayed = set(groups[0]["names"])
    linear = ("in_proj_weight", "out_proj.weight", "ff.0.weight", "ff.3.weight")
    expected = {k for k in twin.state_dict() if k.endswith(linear)}
    assert flax_decayed == torch_decayed == expected
    assert len(expected) == 4 * cfg.n_layers
    assert set(groups[1]["names"]) == set(twin.state_dict()) - expected
    # The rule is the user's to change: e.g. also decay the embeddings.
    custom = ftrain.decay_mask(nnx.state(model, nnx.Param), lambda path: path[-1] in ("kernel", "weight"))
    assert bool(custom["input"]["embed"]["weight"]) and not bool(mask["input"]["embed"]["weight"])
    # ... and the optimiser honours it: with lr = 0 nothing moves, with decay only the decayed set shrinks.
    tcfg = TrainConfig(learning_rate=1.0, warmup_steps=0, total_steps=10, end_lr_ratio=1.0, weight_decay=0.5)
    fresh, _ = _twins(cfg)
    start = fi.to_numpy_state_dict(fresh)
    opt = ftrain.make_optimizer(fresh, tcfg, decay=lambda path: path[-1] == "weight")
    zero = jax.tree.map(np.zeros_like, nnx.state(fresh, nnx.Param))
    opt.update(fresh, zero)  # zero gradient: the Adam part is 0/(0 + eps) = 0, only weight decay acts
    end = fi.to_numpy_state_dict(fresh)
    for key in start:
        factor = 0.5 if key in ("input.embed.weight", "input.pos.weight") else 1.0  # p * (1 - lr * wd)
        np.testing.assert_array_equal(end[key], (start[key] * np.float32(factor)) if factor != 1 else start[key])
    assert bool(custom["input"]["embed"]["weight"]) and not bool(mask["input"]["embed"]["weight"])


@pytest.mark.parametrize("causal", [False, True])
def test_loss_ignores_padding(causal):
    """A padded row scores exactly what the same row scores alone, unpadded."""
    cfg = small_config(position="alibi", causal=causal, padding_idx=PAD_ID)
    model, twin = _twins(cfg)
    model.eval()
    twin.eval()
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, cfg.vocab_size, size=(1, 17 if causal else 16))
    tokens[0, -5:] = PAD_ID
    padded = ftrain.make_batch(tokens, cfg, TrainConfig(mask_prob=0.5), np.random.default_rng(0))
    n = 11  # real tokens (inputs) / real targets in the row
    alone = {k: v[:, :n] for k, v in padded.items() if k != "attention_mask"}
    assert "attention_mask" in padded and padded["weights"][0, n:].sum() == 0
    for loss in (ftrain.loss_fn, lambda m, b: ttrain.loss_fn(m, b).item()):
        mod = model if loss is ftrain.loss_fn else twin
        a, b = float(loss(mod, padded)), float(loss(mod, alone))
        assert a == pytest.approx(b, rel=TRAIN_REL)
        assert math.isfinite(a) and a > 0


def test_masked_token_batch_follows_bert_recipe():
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 260, size=(64, 128))
    tokens[:, -8:] = PAD_ID
    b = ftrain.masked_token_batch(tokens, vocab_size=260, rng=np.random.default_rng(1), mask_prob=0.15)
    sel = b["weights"] > 0
    real = tokens != PAD_ID
    assert not (sel & ~real).any()  # padding is never a target
    frac = sel.sum() / real.sum()
    n = real.sum()
    assert abs(frac - 0.15) < 5 * math.sqrt(0.15 * 0.85 / n)
    is_mask = b["inputs"] == MASK_ID
    assert not (is_mask & ~sel).any()
    assert abs(is_mask.sum() / sel.sum() - 0.8) < 0.03
    assert (b["inputs"][~sel] == tokens[~sel]).all()
    assert (b["targets"] == tokens).all() and (b["inputs"][sel] >= 3).all()
    again = ftrain.masked_token_batch(tokens, vocab_size=260, rng=np.random.default_rng(1), mask_prob=0.15)
    assert all((again[k] == b[k]).all() for k in b)


def test_dropout_masks_fresh_every_step_and_reproducible_from_seed():
    cfg = small_config(position="rope", dropout=0.2)
    batch = _batches(cfg, 1)[0]
    # lr so small that the weights do not move measurably: loss differences come from the masks alone.
    tcfg = TrainConfig(learning_rate=1e-12, warmup_steps=0, total_steps=10, weight_decay=0.0)

    def losses(seed: int, dropout: float) -> list[float]:
        model = fi.Transformer(cfg.replace(dropout=dropout), rngs=nnx.Rngs(seed))
        opt = ftrain.make_optimizer(model, tcfg)
        model.train()
        return [float(ftrain.train_step(model, opt, batch)["loss"]) for _ in range(4)]

    a, again, other, off = losses(0, 0.2), losses(0, 0.2), losses(1, 0.2), losses(0, 0.0)
    assert a == again  # bit-identical: same seed, same masks
    assert len(set(a)) == 4  # a fresh mask at every step
    assert np.ptp(off) < 1e-5 < np.ptp(a)  # without dropout the same batch scores the same
    assert not np.allclose(a, other), "another seed must give other masks"


@pytest.mark.slow
def test_loss_falls_with_dropout_on_both_sides():
    cfg = small_config(position="sinusoidal", dropout=0.1)
    tcfg = TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=30, weight_decay=0.01)
    batches = _batches(cfg, 3, seed=11)  # cycled: memorisable
    model, twin = _twins(cfg)
    opt = ftrain.make_optimizer(model, tcfg)
    topt, sched = ttrain.make_optimizer(twin, tcfg)
    model.train()
    twin.train()
    fl, tl = [], []
    for t in range(30):
        fl.append(float(ftrain.train_step(model, opt, batches[t % 3])["loss"]))
        tl.append(ttrain.train_step(twin, topt, sched, batches[t % 3], tcfg.clip_norm)["loss"])
    for log in (fl, tl):
        assert np.mean(log[-3:]) < 0.7 * np.mean(log[:3]), log


def test_batches_reject_bad_token_ids():
    """Batch builders use Embed's id check: an id outside [0, V) or a float id fails before any work."""
    good = np.full((2, 8), 10, np.int64)
    with pytest.raises(IndexError, match="token id 260 .*num_embeddings=260"):
        ftrain.masked_token_batch(good + 250, vocab_size=260, rng=np.random.default_rng(0))
    with pytest.raises(IndexError, match="token id -1"):
        ftrain.next_token_batch(good - 11, vocab_size=260)
    with pytest.raises(TypeError, match="integers"):
        ftrain.next_token_batch(good.astype(np.float32), vocab_size=260)


# ------------------------------------------------------------------------------------- training inputs (issue 19)
@pytest.fixture(scope="module")
def loss_twins():
    model, twin = _twins(small_config(n_layers=1))
    model.eval()
    twin.eval()
    return model, twin


def _plain_batch(V: int, B: int = 2, L: int = 6) -> dict:
    rng = np.random.default_rng(2)
    ids = rng.integers(4, V, (B, L))
    return {"inputs": ids, "targets": np.roll(ids, 1, axis=1), "weights": np.ones((B, L), np.float32)}


def test_ignore_index_counts_for_nothing_on_both_twins(loss_twins):
    """A target of -100 (torch's and HF's ignore index) adds nothing and counts nothing, whatever its weight:
    the loss equals the one with weight 0 there, the same on both twins."""
    model, twin = loss_twins
    batch = _plain_batch(model.config.vocab_size)
    ignored = {**batch, "targets": batch["targets"].copy()}
    ignored["targets"][0, 2] = ignored["targets"][1, 5] = -100
    zero_w = {**batch, "weights": batch["weights"].copy()}
    zero_w["weights"][0, 2] = zero_w["weights"][1, 5] = 0.0
    f_ign, f_w = float(ftrain.loss_fn(model, ignored)), float(ftrain.loss_fn(model, zero_w))
    t_ign, t_w = ttrain.loss_fn(twin, ignored).item(), ttrain.loss_fn(twin, zero_w).item()
    assert f_ign == f_w and t_ign == t_w
    assert f_ign == pytest.approx(t_ign, rel=TRAIN_REL)
    assert f_ign != pytest.approx(float(ftrain.loss_fn(model, batch)), rel=1e-3)  # the ignored terms mattered


@pytest.mark.parametrize(
    "key, change, error, words",
    [
        ("targets", lambda b: b["targets"].__setitem__((1, 3), -1), IndexError, r"holds -1 at \(1, 3\)"),
        ("targets", lambda b: b["targets"].__setitem__((0, 0), 97), IndexError, r"holds 97 at \(0, 0\).*vocab_size=97"),
        ("weights", lambda b: b["weights"].__setitem__((0, 1), -0.5), ValueError, r"holds -0.5 at \(0, 1\)"),
        ("weights", lambda b: b["weights"].__setitem__((1, 1), np.nan), ValueError, "finite and >= 0"),
        ("weights", lambda b: b.__setitem__("weights", b["weights"][:, :4]), ValueError, r"shape \(2, 4\)"),
        ("targets", lambda b: b.__setitem__("targets", b["targets"] + 0.5), TypeError, "integer token ids"),
        ("inputs", lambda b: b.pop("weights"), ValueError, r"lacks \['weights'\]"),
    ],
)
def test_bad_training_batches_fail_first_and_alike(loss_twins, key, change, error, words):
    model, twin = loss_twins
    batch = {k: v.copy() for k, v in _plain_batch(model.config.vocab_size).items()}
    change(batch)
    for loss in (ftrain.loss_fn, ttrain.loss_fn, ftrain.eval_step):
        with pytest.raises(error, match=words):
            loss(twin if loss is ttrain.loss_fn else model, batch)


def test_train_step_checks_before_jit_and_a_traced_bad_target_is_nan(loss_twins):
    model, _ = loss_twins
    batch = _plain_batch(model.config.vocab_size)
    bad = {**batch, "targets": batch["targets"].copy()}
    bad["targets"][0, 0] = -3
    with pytest.raises(IndexError, match="holds -3"):
        ftrain.train_step(model, None, bad)  # refused before the optimizer is even looked at
    traced = nnx.jit(ftrain.loss_fn)
    assert np.isfinite(float(traced(model, batch)))
    assert np.isnan(float(traced(model, bad)))  # never a finite wrong loss


def test_float16_parameters_are_refused_with_the_reason():
    cfg = small_config(n_layers=1)
    model = fi.Transformer(cfg, flax_config=fi.FlaxConfig(param_dtype="float16"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="param_dtype of .*='float16' does not train.*param_dtype='float32'"):
        ftrain.make_optimizer(model, TrainConfig())
    with pytest.raises(ValueError, match="dtype of .*='float16' does not train.*underflow"):
        ttrain.make_optimizer(tr.Transformer(cfg).half(), TrainConfig())
    with pytest.raises(TypeError, match="tcfg=.* must be a TrainConfig, got dict"):
        ftrain.make_optimizer(fi.Transformer(cfg, rngs=nnx.Rngs(0)), {"learning_rate": 1e-3})
