"""Fine-tuning step for step against PyTorch: the same tiny Hugging Face folder (Llama and GPT-2, every parameter
perturbed), the same batches (chat, instruction and text records tokenized by the folder's own tokenizer and chat
template; loss on the completion tokens only; padded and packed rows in alternate steps; 2 micro-batches
accumulated per step), 10 AdamW steps through `flax_impl.apps.finetune_step.train_step` and through transformers
(eager attention) + torch.optim.AdamW + LambdaLR + clip_grad_norm_, with the same weight-decay groups: the loss of
every step and every final weight within TRAIN_REL (but for GPT-2's key bias, whose gradient is exactly zero
without RoPE: each side's roundoff, which AdamW normalises into different steps; proved in
parity_tests/test_train.py::test_key_bias_gradient_is_roundoff_unless_rope).

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


def run_ours(folder, steps):
    import flax_impl.hf
    from flax_impl.train import make_optimizer

    _, model = flax_impl.hf.from_pretrained(folder)
    model.train()
    optimizer = make_optimizer(model, TCFG)
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


def run_theirs(folder, steps):
    import transformers

    from torch_ref.train import lr_lambda

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").train()
    embeddings = ("embed_tokens", "wte", "wpe")
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and not any(e in n for e in embeddings)]
    rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and not any(e in n for e in embeddings))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TCFG.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=TCFG.learning_rate, betas=(TCFG.b1, TCFG.b2), eps=TCFG.eps)
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
            logits = model(torch.from_numpy(mb["inputs"]).long(), **kw).logits.float()
            targets = torch.from_numpy(mb["targets"]).long()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(),
                                                   reduction="none").view(targets.shape)
            w = torch.from_numpy(mb["weights"]) * (targets != IGNORE_INDEX)
            part = (ce * w).sum() / count
            part.backward()
            total += part.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), TCFG.clip_norm)
        opt.step()
        sched.step()
        losses.append((total, float(norm)))
    return model, np.array(losses)


@pytest.mark.slow  # 20 jitted and 20 torch micro-batch steps, two step programs compiled (~100 s on 2 busy cores)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ten_finetuning_steps_match_transformers_and_torch_optim(family, tmp_path):
    import transformers

    import flax_impl.hf

    folder = make_folder(tmp_path / family, family)
    steps = batches(folder)
    w = np.concatenate([s["weights"].ravel() for s in steps])
    assert 0.1 < w.mean() < 0.9  # the loss counts completions only: prompts and padding carry weight 0
    start = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    ours, our_log = run_ours(folder, steps)
    theirs, their_log = run_theirs(folder, steps)
    print(f"{family}: per-step |loss diff| / loss =", np.abs(our_log[:, 0] - their_log[:, 0]) / their_log[:, 0])
    np.testing.assert_allclose(our_log[:, 0], their_log[:, 0], rtol=TRAIN_REL, atol=0)  # the loss of every step
    np.testing.assert_allclose(our_log[:, 1], their_log[:, 1], rtol=TRAIN_REL, atol=0)  # the pre-clip norm
    assert (their_log[:, 1] > TCFG.clip_norm).any(), "the clip should be active in some steps"
    assert their_log[-1, 0] < their_log[0, 0]  # training moved
    final = flax_impl.hf.to_hf_state_dict(ours, family)
    state = theirs.state_dict()
    tied = {"lm_head.weight"} - set(final)  # GPT-2's head is the embedding
    assert set(final) | tied == set(state) - {k for k in state if k.endswith(".attn.bias")}
    for key, value in final.items():
        t, t0 = state[key].detach().numpy(), start[key].numpy()
        if key.endswith("attn.c_attn.bias"):  # GPT-2's key bias: a zero gradient (parity_tests/test_train.py)
            D = t.shape[0] // 3
            keep = np.r_[0:D, 2 * D : 3 * D]
            value, t, t0 = value[keep], t[keep], t0[keep]
        scale = np.abs(t).max()
        err = np.abs(value - t).max()
        assert err <= TRAIN_REL * scale, f"{key}: max |flax - torch| = {err:.3g}, scale {scale:.3g}"
        moved = np.abs(t - t0).max()
        assert moved > 1e3 * TRAIN_REL * scale, f"{key} barely moved ({moved:.3g}): the test would prove nothing"
