"""Fine-tuning step for step against PyTorch: the same tiny Hugging Face folder (Llama and GPT-2, every parameter
perturbed), the same batches (chat, instruction and text records tokenized by the folder's own tokenizer and chat
template; loss on the completion tokens only; padded and packed rows in alternate steps; 2 micro-batches
accumulated per step), 10 AdamW steps through `flax_impl.apps.finetune_step.train_step` and through transformers
(eager attention) + torch.optim.AdamW + LambdaLR + clip_grad_norm_, with the same weight-decay groups; full
fine-tuning, and LoRA with peft's adapters on the torch side (both starting from one PEFT folder): the loss and
pre-clip gradient norm of every step and every final weight (or adapter) within TRAIN_REL (but for GPT-2's key
bias, whose gradient is exactly zero without RoPE: each side's roundoff, which AdamW normalises into different
steps; proved in parity_tests/test_train.py::test_key_bias_gradient_is_roundoff_unless_rope).

The torch side builds its packed mask from the segment ids itself (a float (B, 1, L, L) mask: same segment, not
padding, j <= i), and feeds `position_ids` restarting per segment: an independent statement of what packing means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import CHATS, make_folder

from flax_impl.apps import finetune_step as fs
from flax_impl.apps.finetune_batches import pack_rows, pad_rows, step_batch
from flax_impl.apps.finetune_data import Tokens, tokenize
from flax_impl.apps.finetune_template import ChatTemplate, load_chat_template, special_tokens
from flax_impl.config import TrainConfig
from flax_impl.tolerances import TRAIN_REL
from flax_impl.validation import IGNORE_INDEX

SEQ_LEN, B, A, STEPS = 128, 2, 2, 10
TCFG = TrainConfig(learning_rate=1e-2, warmup_steps=3, total_steps=STEPS, end_lr_ratio=0.1, weight_decay=0.1,
                   clip_norm=0.5)


def examples(folder):
    from tokenizers import Tokenizer

    tok = Tokens(Tokenizer.from_file(str(folder / "tokenizer.json")), 1,
                 ChatTemplate(load_chat_template(folder), special_tokens(folder)), 300)
    return [tokenize(r, tok, f"record {i}") for i, r in enumerate(CHATS)]


def batches(folder):
    """10 steps of (A, B, L) numpy batches: even steps padded rows, odd steps packed rows."""
    ex = examples(folder)
    padded, packed = pad_rows(ex, SEQ_LEN, pad_id=1), pack_rows(ex, SEQ_LEN, pad_id=1)
    assert len(packed) < len(padded)  # several examples share a row
    return [step_batch(packed if s % 2 else padded, s // 2, batch_size=B, accumulate=A, seed=0) for s in range(STEPS)]


# LoRA (peft's names): Llama on q, v, o, up and down (k and gate untouched); GPT-2 on its fused c_attn and both
# c_proj, with rsLoRA's alpha / sqrt(r). Both sides start from one PEFT folder whose lora_B peft initialised to zero
# and this test moved off it (a zero B would hide a wrong A gradient in the first step).
LORA = {"llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
        "gpt2": dict(r=4, lora_alpha=6, target_modules=["c_attn", "c_proj"], use_rslora=True)}


def make_adapter(folder, family):
    """A PEFT adapter folder for `folder`'s model, made by peft, lora_B random."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **LORA[family]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder / "adapter")
    return folder / "adapter"


def run_ours(folder, steps, family, adapter=None):
    """10 steps of the command's step function: every weight, or the adapters of `adapter` only."""
    import flax_impl as fi
    import flax_impl.hf

    _, model = flax_impl.hf.from_pretrained(folder)
    if adapter is not None:
        fi.load_peft_adapter(model, adapter, model_type=family)
    model.train()
    optimizer = fi.make_optimizer(model, TCFG) if adapter is None else fi.make_lora_optimizer(model, TCFG)
    metrics = [fs.train_step(model, optimizer, micro) for micro in steps]
    return model, np.array([(float(m["loss"]), float(m["grad_norm"])) for m in metrics])


def _torch_mask(micro):
    """The float (B, 1, L, L) additive mask of a packed batch, built here from its segment ids."""
    seg = torch.from_numpy(micro["segment_ids"]).long()
    L = seg.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & causal
    allowed |= torch.eye(L, dtype=torch.bool)  # a padding query keeps its own key (no all -inf row; weight 0)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def run_theirs(folder, steps, adapter=None):
    """The same steps in transformers + torch.optim: every weight with our weight-decay groups (2-D weights but the
    embeddings), or peft's adapters (all decayed, as flax_impl.lora.lora_decay)."""
    import peft
    import transformers

    from torch_ref.train import lr_lambda

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    if adapter is None:
        embeddings = ("embed_tokens", "wte", "wpe")
        decayed = {n for n, p in model.named_parameters() if p.ndim == 2 and not any(e in n for e in embeddings)}
        groups = [{"params": [p for n, p in model.named_parameters() if n in decayed],
                   "weight_decay": TCFG.weight_decay},
                  {"params": [p for n, p in model.named_parameters() if n not in decayed], "weight_decay": 0.0}]
    else:
        model = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True)
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": TCFG.weight_decay}]
    model.train()
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=TCFG.learning_rate, betas=(TCFG.b1, TCFG.b2), eps=TCFG.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(TCFG))
    losses = []
    for micro in steps:
        opt.zero_grad()
        count = float(micro["weights"].sum())
        total = 0.0
        for a in range(A):
            mb = {k: v[a] for k, v in micro.items()}
            if "segment_ids" in mb:
                kw = dict(attention_mask=_torch_mask(mb), position_ids=torch.from_numpy(mb["positions"]).long())
            else:
                kw = dict(attention_mask=torch.from_numpy(mb["attention_mask"]).long())
            logits = model(input_ids=torch.from_numpy(mb["inputs"]).long(), **kw).logits.float()
            targets = torch.from_numpy(mb["targets"]).long()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(),
                                                   reduction="none").view(targets.shape)
            w = torch.from_numpy(mb["weights"]) * (targets != IGNORE_INDEX)
            part = (ce * w).sum() / count
            part.backward()
            total += part.item()
        norm = torch.nn.utils.clip_grad_norm_(params, TCFG.clip_norm)
        opt.step()
        sched.step()
        losses.append((total, float(norm)))
    return model, np.array(losses)


def assert_moved_together(ours: dict, theirs: dict, start: dict) -> None:
    """Every tensor of `theirs` equals ours within TRAIN_REL of its largest entry, and moved far beyond that."""
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        value, t0 = ours[key], start[key]
        if key.endswith("attn.c_attn.bias"):  # GPT-2's key bias: a zero gradient (parity_tests/test_train.py)
            D = t.shape[0] // 3
            keep = np.r_[0:D, 2 * D : 3 * D]
            value, t, t0 = value[keep], t[keep], t0[keep]
        scale = np.abs(t).max()
        err = np.abs(value - t).max()
        assert err <= TRAIN_REL * scale, f"{key}: max |flax - torch| = {err:.3g}, scale {scale:.3g}"
        moved = np.abs(t - t0).max()
        assert moved > 1e3 * TRAIN_REL * scale, f"{key} barely moved ({moved:.3g}): the test would prove nothing"


@pytest.mark.slow  # per case 20 jitted and 20 torch micro-batch steps, two step programs compiled (~1 min)
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ten_finetuning_steps_match_transformers_and_torch_optim(family, mode, tmp_path):
    import transformers
    from safetensors.numpy import load_file

    import flax_impl.hf
    from flax_impl.hf.adapters import peft_state_dict

    folder = make_folder(tmp_path / family, family)
    steps = batches(folder)
    w = np.concatenate([s["weights"].ravel() for s in steps])
    assert 0.1 < w.mean() < 0.9  # the loss counts completions only: prompts and padding carry weight 0
    adapter = make_adapter(folder, family) if mode == "lora" else None
    ours, our_log = run_ours(folder, steps, family, adapter)
    theirs, their_log = run_theirs(folder, steps, adapter)
    print(f"{family} {mode}: per-step |loss diff| / loss =", np.abs(our_log[:, 0] - their_log[:, 0]) / their_log[:, 0])
    np.testing.assert_allclose(our_log[:, 0], their_log[:, 0], rtol=TRAIN_REL, atol=0)  # the loss of every step
    np.testing.assert_allclose(our_log[:, 1], their_log[:, 1], rtol=TRAIN_REL, atol=0)  # the pre-clip norm
    assert (their_log[:, 1] > TCFG.clip_norm).any(), "the clip should be active in some steps"
    assert their_log[-1, 0] < their_log[0, 0]  # training moved
    if mode == "lora":
        import peft

        start = load_file(adapter / "adapter_model.safetensors")
        want = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(theirs).items()}
        assert_moved_together(peft_state_dict(ours), want, start)
        return
    start = {k: v.numpy() for k, v in transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}
    final = flax_impl.hf.to_hf_state_dict(ours, family)
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    tied = {"lm_head.weight"} - set(final)  # GPT-2's head is the embedding
    assert set(final) | tied == set(state) - {k for k in state if k.endswith(".attn.bias")}
    assert_moved_together(final, {k: state[k] for k in final}, start)
