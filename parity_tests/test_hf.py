"""flax_impl.hf against transformers: tiny random models of each family (built by transformers, every parameter
perturbed, saved to a folder) load into ours with the same hidden states, logits and gradients; ours saves back
bit-exactly to a folder transformers loads; bad folders and configs fail with one clear error.

Reference: transformers' eager attention (attn_implementation="eager"), float32, right-padded batches compared at
real positions only. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

import flax_impl as fi
import flax_impl.hf as fh
from flax_impl.hf.tolerances import HF_FORWARD
from flax_impl.tolerances import EXACT, GRAD_REL

B, L = 2, 12
N_REAL = (L, 7)  # real tokens per row: row 1 is right-padded


@dataclasses.dataclass(frozen=True)
class Spec:
    """How the test builds one family with transformers: config class + kwargs, model class, whether it has an
    LM head, and the id used for padding positions."""

    config_cls: str
    kwargs: dict
    model_cls: str
    lm: bool = True
    pad_id: int = 0


_TINY = dict(vocab_size=100)
SPECS = {
    "gpt2": Spec(
        "GPT2Config",
        dict(
            _TINY,
            n_embd=32,
            n_head=4,
            n_layer=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "GPT2LMHeadModel",
    ),
    # 6 heads: not a power of two, so the ALiBi slope order (Press et al.'s) is exercised.
    "bloom": Spec(
        "BloomConfig",
        dict(_TINY, hidden_size=48, n_head=6, n_layer=2, bos_token_id=1, eos_token_id=2),
        "BloomForCausalLM",
    ),
}
FAMILIES = sorted(SPECS)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms to 1 and biases to 0: move every parameter off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _batch(vocab: int, pad_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, L))
    mask = np.zeros((B, L), np.int64)
    for b, n in enumerate(N_REAL):
        mask[b, :n] = 1
    return np.where(mask == 1, ids, pad_id), mask


@dataclasses.dataclass
class Built:
    family: str
    hf: torch.nn.Module  # the transformers model (eval, float32, eager attention)
    folder: Path  # where transformers saved it
    cfg: fi.TransformerConfig
    ours: fi.TransformerEncoder
    ids: np.ndarray
    mask: np.ndarray
    theirs_out: tuple  # (last_hidden_state, logits or None), numpy
    theirs_grads: dict  # checkpoint key -> gradient of the test loss
    ours_out: tuple
    ours_grads: dict  # the same keys, through flax_impl.hf.to_hf_state_dict


def _hf_outputs(model: torch.nn.Module, spec: Spec, ids: np.ndarray, mask: np.ndarray):
    """(last_hidden_state, logits or None) of a transformers model."""
    hidden = model.base_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    logits = model.get_output_embeddings()(hidden) if spec.lm else None
    return hidden, logits


def _loss_weights(cfg: fi.TransformerConfig, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random weights of the test loss sum(hidden * Wh) + sum(logits * Wl), zero at padded positions."""
    rng = np.random.default_rng(7)
    wh = rng.standard_normal((B, L, cfg.d_model)).astype(np.float32) * mask[..., None]
    wl = rng.standard_normal((B, L, cfg.vocab_size)).astype(np.float32) * mask[..., None]
    return wh, wl


def _theirs(model: torch.nn.Module, spec: Spec, ids, mask, wh, wl):
    model.zero_grad()
    hidden, logits = _hf_outputs(model, spec, ids, mask)
    loss = (hidden * torch.from_numpy(wh)).sum()
    if spec.lm:
        loss = loss + (logits * torch.from_numpy(wl)).sum()
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    return (hidden.detach().numpy(), None if logits is None else logits.detach().numpy()), grads


def _ours(model: fi.TransformerEncoder, family: str, spec: Spec, ids, mask, wh, wl):
    """Hidden states, logits and the gradients of the same loss, in one compiled program."""

    def loss(m):
        h = m(jnp.asarray(ids), jnp.asarray(mask))
        logits = m.logits(h) if spec.lm else None
        out = jnp.sum(h * wh) + (jnp.sum(logits * wl) if spec.lm else 0.0)
        return out, (h, logits)

    (_, (h, logits)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return (np.asarray(h), None if logits is None else np.asarray(logits)), fh.to_hf_state_dict(holder, family)


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory) -> Built:
    family = request.param
    spec = SPECS[family]
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, spec.model_cls)._from_config(config, attn_implementation="eager").eval()
    _perturb(model, seed=1)
    folder = tmp_path_factory.mktemp(f"hf-{family}")
    model.save_pretrained(folder)
    cfg, ours = fh.from_pretrained(folder)
    ids, mask = _batch(cfg.vocab_size, spec.pad_id)
    wh, wl = _loss_weights(cfg, mask)
    theirs_out, theirs_grads = _theirs(model, spec, ids, mask, wh, wl)
    ours_out, ours_grads = _ours(ours, family, spec, ids, mask, wh, wl)
    return Built(family, model, folder, cfg, ours, ids, mask, theirs_out, theirs_grads, ours_out, ours_grads)


def test_forward_matches_transformers(built):
    real = built.mask.astype(bool)
    assert np.abs(built.theirs_out[0][real]).max() > 0.5  # non-trivial outputs
    for ours, theirs in zip(built.ours_out, built.theirs_out, strict=True):
        if theirs is not None:
            np.testing.assert_allclose(ours[real], theirs[real], rtol=0, atol=HF_FORWARD)


def test_gradients_match_transformers(built):
    """d/dparams of sum(hidden * Wh) + sum(logits * Wl) over real positions, for every parameter."""
    assert sorted(built.ours_grads) == sorted(built.theirs_grads)
    for k, g in built.theirs_grads.items():
        scale = np.abs(g).max()
        assert scale > 0, k
        np.testing.assert_allclose(built.ours_grads[k], g, rtol=0, atol=GRAD_REL * scale, err_msg=k)


def test_round_trip_is_bit_exact(built, tmp_path):
    fh.save_pretrained(built.ours, tmp_path, model_type=built.family)
    original, saved = load_file(built.folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(saved) == sorted(original)
    for k, v in original.items():
        assert saved[k].dtype == v.dtype and np.array_equal(saved[k], v), k


def test_saved_folder_loads_in_transformers(built, tmp_path):
    spec = SPECS[built.family]
    fh.save_pretrained(built.ours, tmp_path, model_type=built.family)
    auto = transformers.AutoModelForCausalLM if spec.lm else transformers.AutoModel
    reloaded = auto.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == spec.model_cls
    with torch.no_grad():
        got = _hf_outputs(reloaded, spec, built.ids, built.mask)
    for want, g in zip(built.theirs_out, got, strict=True):
        if want is not None:
            np.testing.assert_allclose(g.numpy(), want, rtol=0, atol=EXACT)


# ---------------------------------------------------------------------------------------------------------------
# The tables against the installed transformers.


def _class_defaults(cls) -> dict:
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in base}


@pytest.mark.parametrize("family", FAMILIES)
def test_table_defaults_and_coverage_match_transformers(family):
    """Every Field/Require default is the config class's own, and every field of the class is mapped, refused,
    or listed as changing neither weights nor the eval-mode forward."""
    fam = fh.FAMILIES[family]
    defaults = _class_defaults(getattr(transformers, SPECS[family].config_cls))
    for entry in (*fam.config, *fam.require):
        root = entry.hf.split(".")[0]
        if root in defaults and "." not in entry.hf:
            assert entry.default == defaults[root], f"{family} {entry.hf}: {entry.default!r} vs {defaults[root]!r}"
    for req in fam.require:
        assert req.ok(req.default, {}), f"{family} refuses transformers' default {req.hf}={req.default!r}"
    covered = {e.hf.split(".")[0] for e in (*fam.config, *fam.require)} | set(fam.ignored_hf)
    assert sorted(set(defaults) - covered) == []


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def _copy(built: Built, dst: Path, **config_changes) -> Path:
    shutil.copytree(built.folder, dst)
    path = dst / "config.json"
    hf = json.loads(path.read_text())
    hf.update(config_changes)
    path.write_text(json.dumps(hf))
    return dst


def test_unsupported_model_type(built, tmp_path):
    folder = _copy(built, tmp_path / "m", model_type="t5")
    with pytest.raises(ValueError, match=r"model_type='t5' is not supported; supported: \['"):
        fh.from_pretrained(folder)


UNSUPPORTED = {
    "bloom": ({"apply_residual_connection_post_layernorm": True}, ""),
    "gpt2": ({"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True}, "scale_attn_by_inverse"),
}


def test_unsupported_options_fail_before_weights_are_read(built, tmp_path):
    changes, _ = UNSUPPORTED[built.family]
    folder = _copy(built, tmp_path / "m", **changes)
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")  # never read: the config fails first
    with pytest.raises(ValueError) as err:
        fh.from_pretrained(folder)
    for key, value in changes.items():
        assert f"{key}={value!r}" in str(err.value)


def test_missing_files(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a local folder"):
        fh.from_pretrained(tmp_path / "absent")
    folder = _copy(built, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        fh.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        fh.from_pretrained(folder)


def test_sharded_checkpoint_loads_the_same_weights(built, tmp_path):
    built.hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, ours = fh.from_pretrained(tmp_path)
    want, got = fi.to_numpy_state_dict(built.ours), fi.to_numpy_state_dict(ours)
    for k, v in want.items():
        assert np.array_equal(got[k], v), k
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are not in"):
        fh.from_pretrained(tmp_path)


def test_mismatched_checkpoint_lists_every_key_in_one_error(built, tmp_path):
    folder = _copy(built, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    dropped, bent = names[0], names[-1]
    del tensors[dropped]
    tensors[bent] = np.concatenate([tensors[bent], tensors[bent]], axis=0)
    tensors["extra.weight"] = np.zeros((3,), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        fh.from_pretrained(folder)
    msg = str(err.value)
    prefix = fh.FAMILIES[built.family].prefix
    assert f"missing key: {dropped.removeprefix(prefix)}" in msg
    assert "unexpected key: extra.weight" in msg
    assert f"shape mismatch: {bent.removeprefix(prefix)}" in msg


def test_save_refuses_a_config_the_family_cannot_hold(built, tmp_path):
    cfg = built.cfg.replace(position="sinusoidal", embed_scale=True)
    model = fi.TransformerEncoder(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"model_type='{built.family}' cannot represent") as err:
        fh.save_pretrained(model, tmp_path / "out", model_type=built.family)
    assert "position='sinusoidal'" in str(err.value) and "embed_scale=True" in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"model_type='nope' is not supported"):
        fh.save_pretrained(built.ours, tmp_path / "out", model_type="nope")
