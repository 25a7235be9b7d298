"""flax_impl.lora against transformers + peft: 10 LoRA AdamW steps on the same folder and batches give the same
losses and adapters; our PEFT folders load in peft, peft's load in ours, a merged folder loads in transformers.

Reference: transformers' eager attention, float32, peft's LoRA layers, torch.optim.AdamW with LambdaLR and
clip_grad_norm_ (as torch_ref.train). Tiny models from parity_tests/hf_helpers.SPECS, every parameter perturbed;
nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from hf_helpers import SPECS, assert_rows_close, perturb
from safetensors.numpy import load_file

import flax_impl as fi
import flax_impl.hf as fh
from flax_impl import train as ftrain
from flax_impl.config import TrainConfig
from flax_impl.hf.adapters import peft_state_dict
from flax_impl.tolerances import EXACT, HF_FORWARD_REL, TRAIN_REL, row_error
from flax_impl.validation import IGNORE_INDEX
from torch_ref.train import lr_lambda

STEPS, B, L, PAD = 10, 4, 12, 0
# Llama: q and v of the packed in_proj (k between them untouched), o, up and down (gate untouched); GPT-2: its
# fused c_attn, both c_proj (attention and MLP) and c_fc, with rsLoRA's alpha / sqrt(r).
LORA = {
    "llama": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    "gpt2": peft.LoraConfig(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
}
# As parity_tests/test_train.py: clipping active, weight decay that matters in 10 steps, a warmup and a decay.
TCFG = TrainConfig(learning_rate=1e-2, warmup_steps=3, total_steps=STEPS, weight_decay=0.1, clip_norm=1.0)


def _hf_model(family: str, folder: Path | None = None) -> torch.nn.Module:
    spec = SPECS[family]
    model_cls = getattr(transformers, spec.model_cls)
    if folder is not None:
        return model_cls.from_pretrained(folder, attn_implementation="eager").eval()
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    return model_cls._from_config(config, attn_implementation="eager", **spec.model_kwargs).eval()


def _peft_folder(family: str, folder: Path, out: Path, config: peft.LoraConfig, seed: int = 3) -> Path:
    """A PEFT adapter made by peft on the transformers model of `folder`, lora_B moved off its zero init."""
    task = "CAUSAL_LM" if SPECS[family].lm else None
    model = peft.get_peft_model(_hf_model(family, folder), dataclasses.replace(config, task_type=task))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def completion_batches(vocab: int, n: int, seed: int = 11) -> list[dict]:
    """n right-padded prompt + completion batches (B, L): ids, mask, and transformers' labels (the ids on
    completion tokens, -100 on the prompt and the padding)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, vocab, (B, L))
        labels = ids.copy()
        mask = np.ones((B, L), np.int64)
        for b in range(B):
            prompt, real = rng.integers(2, 5), rng.integers(7, L + 1)  # row lengths 7..12, prompts 2..4
            mask[b, real:], ids[b, real:], labels[b, real:] = 0, PAD, IGNORE_INDEX
            labels[b, :prompt] = IGNORE_INDEX
        out.append({"ids": ids, "mask": mask, "labels": labels})
    return out


def ours_batch(batch: dict) -> dict:
    """transformers' shifted loss as ours: position t predicts labels[t + 1]; weight 1 where that is not -100."""
    targets = np.concatenate([batch["labels"][:, 1:], np.full((B, 1), IGNORE_INDEX)], axis=1)
    return {
        "inputs": batch["ids"].astype(np.int32),
        "targets": targets.astype(np.int32),
        "weights": (targets != IGNORE_INDEX).astype(np.float32),
        "attention_mask": batch["mask"].astype(np.int32),
    }


def train_peft(model: torch.nn.Module, batches: list[dict]) -> tuple[np.ndarray, dict]:
    """10 steps of torch.optim.AdamW over the adapters (all decayed), LambdaLR, clip_grad_norm_."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=TCFG.learning_rate, betas=(TCFG.b1, TCFG.b2), eps=TCFG.eps, weight_decay=TCFG.weight_decay,
        foreach=False,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TCFG))
    model.train()
    log = []
    for batch in batches:
        opt.zero_grad()
        kw = {k: torch.from_numpy(v) for k, v in batch.items()}
        loss = model(input_ids=kw["ids"], attention_mask=kw["mask"], labels=kw["labels"]).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, TCFG.clip_norm)
        opt.step()
        sched.step()
        log.append((loss.item(), norm.item()))
    state = peft.get_peft_model_state_dict(model)
    return np.array(log), {k: v.detach().numpy().copy() for k, v in state.items()}


@dataclasses.dataclass
class Trained:
    family: str
    folder: Path  # the transformers model
    start: Path  # the PEFT adapter both sides start from
    ours: fi.Transformer
    ours_log: np.ndarray  # (STEPS, 2): loss, pre-clip gradient norm
    peft_log: np.ndarray
    adapters_before: dict  # peft keys -> arrays
    peft_after: dict
    frozen_before: dict  # our frozen parameters before training, path -> array
    optimizer: nnx.Optimizer


@pytest.fixture(scope="module", params=sorted(LORA))
def trained(request, tmp_path_factory) -> Trained:
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    torch.manual_seed(0)
    hf = _hf_model(family)
    perturb(hf, seed=1)
    hf.save_pretrained(root / "model")
    start = _peft_folder(family, root / "model", root / "start", LORA[family])
    batches = completion_batches(hf.config.vocab_size, STEPS)

    theirs = peft.PeftModel.from_pretrained(_hf_model(family, root / "model"), start, is_trainable=True)
    peft_log, peft_after = train_peft(theirs, batches)

    _, ours = fh.from_pretrained(root / "model")
    fi.load_peft_adapter(ours, start, model_type=family)
    before = peft_state_dict(ours)
    frozen = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Not(fi.LoraParam)))}
    optimizer = fi.make_lora_optimizer(ours, TCFG)
    ours.train()
    log = []
    for batch in batches:
        m = ftrain.train_step(ours, optimizer, ours_batch(batch))
        log.append((float(m["loss"]), float(m["grad_norm"])))
    ours.eval()
    return Trained(family, root / "model", start, ours, np.array(log), peft_log, before, peft_after, frozen, optimizer)


def test_ten_lora_steps_match_peft(trained):
    """Loss and pre-clip gradient norm at each step, every adapter after 10 steps (relative to its largest entry);
    every adapter moved far beyond the tolerance, and the clip was active."""
    np.testing.assert_allclose(trained.ours_log[:, 0], trained.peft_log[:, 0], rtol=TRAIN_REL, atol=0)
    np.testing.assert_allclose(trained.ours_log[:, 1], trained.peft_log[:, 1], rtol=TRAIN_REL, atol=0)
    assert (trained.peft_log[:, 1] > TCFG.clip_norm).any(), "the clip should be active in some steps"
    ours = peft_state_dict(trained.ours)
    assert sorted(ours) == sorted(trained.peft_after)
    for key, want in trained.peft_after.items():
        scale = np.abs(want).max()
        err = np.abs(ours[key] - want).max()
        assert err <= TRAIN_REL * scale, f"{key}: max |flax - peft| = {err:.3g}, scale {scale:.3g}"
        moved = np.abs(ours[key] - trained.adapters_before[key]).max()
        assert moved > 1e3 * TRAIN_REL * scale, f"{key} barely moved ({moved:.3g})"


def test_frozen_weights_stay_bit_exact_and_have_no_optimizer_state(trained):
    after = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(trained.ours, nnx.Not(fi.LoraParam)))}
    assert after.keys() == trained.frozen_before.keys()
    for path, value in trained.frozen_before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=str(path))
    moments = [p for p, _ in nnx.to_flat_state(nnx.state(trained.optimizer.opt_state)) if "mu" in p or "nu" in p]
    n_adapters = len(nnx.to_flat_state(nnx.state(trained.ours, fi.LoraParam)))
    assert len(moments) == 2 * n_adapters and all("lora" in p for p in moments)


def _outputs(model, batch: dict) -> np.ndarray:
    """Logits (B, L, V) of ours or of a transformers / peft model, at every position."""
    if isinstance(model, fi.Transformer):
        forward = nnx.jit(lambda m, i, a: m.logits(m(i, a)))
        return np.asarray(forward(model, jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"])))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch["ids"]), attention_mask=torch.from_numpy(batch["mask"]))
    return out.logits.numpy()


def test_trained_adapter_loads_in_peft(trained, tmp_path):
    """save_peft_adapter -> peft.PeftModel.from_pretrained on the transformers model: our logits."""
    fi.save_peft_adapter(trained.ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    want = LORA[trained.family]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (want.r, want.lora_alpha, want.use_rslora)
    theirs = peft.PeftModel.from_pretrained(_hf_model(trained.family, trained.folder), tmp_path).eval()
    batch = completion_batches(theirs.config.vocab_size, 1, seed=5)[0]
    real = batch["mask"].astype(bool)
    assert_rows_close(_outputs(trained.ours, batch)[real], _outputs(theirs, batch)[real], msg="peft's logits")


def test_merged_folder_loads_in_transformers(trained, tmp_path):
    """save_pretrained(merged_model(...)) writes a plain Hugging Face folder with the adapters folded in."""
    fh.save_pretrained(fi.merged_model(trained.ours), tmp_path, model_type=trained.family)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    batch = completion_batches(merged.config.vocab_size, 1, seed=6)[0]
    real = batch["mask"].astype(bool)
    ours, theirs = _outputs(trained.ours, batch), _outputs(merged, batch)
    assert_rows_close(ours[real], theirs[real], msg="the merged folder's logits")
    base = _outputs(_hf_model(trained.family, trained.folder), batch)
    assert row_error(base[real], theirs[real]) > 1e3 * HF_FORWARD_REL  # the adapters changed the model


# Every other family through its table: peft's adapter on its transformers model, read into ours (the same
# logits), written back bit-exact. BLOOM's per-head query_key_value permutes LoRA B's rows; BERT has no LM head.
OTHERS = {
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "mpt": ["Wqkv", "up_proj"],
    "qwen2": ["k_proj", "gate_proj"],
    "mistral": ["q_proj", "o_proj"],
    "bert": ["query", "value", "output.dense"],
}


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_peft_adapter_of_each_family_reads_into_ours(family, tmp_path):
    torch.manual_seed(0)
    hf = _hf_model(family)
    perturb(hf, seed=1)
    hf.save_pretrained(tmp_path / "model")
    start = _peft_folder(family, tmp_path / "model", tmp_path / "start", peft.LoraConfig(r=2, lora_alpha=4,
                         target_modules=OTHERS[family]))  # fmt: skip
    _, ours = fh.from_pretrained(tmp_path / "model")
    fi.load_peft_adapter(ours, start, model_type=family)
    theirs = peft.PeftModel.from_pretrained(_hf_model(family, tmp_path / "model"), start).eval()
    batch = completion_batches(hf.config.vocab_size, 1, seed=5)[0]
    real = batch["mask"].astype(bool)
    if SPECS[family].lm:
        got, want = _outputs(ours, batch), _outputs(theirs, batch)
    else:
        got = np.asarray(ours(jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"])))
        with torch.no_grad():
            kw = dict(input_ids=torch.from_numpy(batch["ids"]), attention_mask=torch.from_numpy(batch["mask"]))
            want = theirs(**kw).last_hidden_state.numpy()
    assert_rows_close(got[real], want[real], msg=f"{family} with peft's adapter")
    fi.save_peft_adapter(ours, tmp_path / "back")
    original = load_file(start / "adapter_model.safetensors")
    saved = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for key, value in original.items():
        np.testing.assert_allclose(saved[key], value, rtol=0, atol=EXACT, err_msg=key)
