"""Tiny transformers models for parity_tests/test_hf.py: how each family is built (SPECS), the right-padded
batch, and both sides' outputs and gradients of one test loss. Nothing is downloaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flax_impl as fi
import flax_impl.hf as fh

B, L = 2, 12
N_REAL = (L, 7)  # real tokens per row: row 1 is right-padded


@dataclasses.dataclass(frozen=True)
class Spec:
    """How the test builds one family with transformers: config class + kwargs, model class (+ its kwargs),
    whether it has an LM head, whether ids come with token types, and the id at padded positions."""

    config_cls: str
    kwargs: dict
    model_cls: str
    lm: bool = True
    token_types: bool = False
    pad_id: int = 0
    model_kwargs: dict = dataclasses.field(default_factory=dict)


TINY = dict(vocab_size=100, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(
    TINY,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
# Each family's tiny model also exercises what is special about it: GPT-2's Conv1D layout; BERT's post-LN, token
# types and padding_idx; Llama's biases (attention_bias, mlp_bias), linear RoPE scaling and a non-default theta;
# Mistral's sliding window (5 < L); Qwen2's q/k/v-only biases and tied head; BLOOM's per-head qkv with 6 heads
# (not a power of two: Press et al.'s slope order); MPT's 6 heads (its own slope code) and untied head.
SPECS = {
    "gpt2": Spec(
        "GPT2Config",
        dict(TINY, n_embd=32, n_head=4, n_layer=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "GPT2LMHeadModel",
    ),
    "bert": Spec(
        "BertConfig",
        dict(
            TINY,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        ),
        "BertModel",
        lm=False,
        token_types=True,
        model_kwargs=dict(add_pooling_layer=False),
    ),
    "llama": Spec(
        "LlamaConfig",
        dict(
            LLAMA_LIKE,
            attention_bias=True,
            mlp_bias=True,
            pad_token_id=0,
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0),
        ),
        "LlamaForCausalLM",
    ),
    "mistral": Spec("MistralConfig", dict(LLAMA_LIKE, sliding_window=5), "MistralForCausalLM"),
    "qwen2": Spec("Qwen2Config", dict(LLAMA_LIKE, tie_word_embeddings=True), "Qwen2ForCausalLM"),
    "bloom": Spec("BloomConfig", dict(TINY, hidden_size=48, n_head=6, n_layer=2), "BloomForCausalLM"),
    "mpt": Spec(
        "MptConfig",
        dict(
            TINY,
            d_model=48,
            n_heads=6,
            n_layers=2,
            max_seq_len=64,
            tie_word_embeddings=False,
        ),
        "MptForCausalLM",
    ),
}
FAMILIES = sorted(SPECS)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms to 1 and biases to 0: move every parameter off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Right-padded ids (B, L), the mask (1 = real token) and token types (BERT) or None."""

    ids: np.ndarray
    mask: np.ndarray
    types: np.ndarray | None

    @property
    def real(self) -> np.ndarray:
        return self.mask.astype(bool)


def make_batch(spec: Spec, vocab: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, L), np.int64)
    for b, n in enumerate(N_REAL):
        mask[b, :n] = 1
    ids = np.where(mask == 1, rng.integers(0, vocab, (B, L)), spec.pad_id)
    ids[0, 3] = spec.pad_id  # the padding id also occurs as a real token (a padding_idx row gets no gradient)
    types = rng.integers(0, 2, (B, L)) if spec.token_types else None
    return Batch(ids, mask, types)


@dataclasses.dataclass
class Built:
    family: str
    hf: torch.nn.Module  # the transformers model (eval, float32, eager attention)
    folder: Path  # where transformers saved it
    cfg: fi.TransformerConfig
    ours: fi.Transformer
    batch: Batch
    theirs_out: tuple  # (last_hidden_state, logits or None), numpy
    theirs_grads: dict  # checkpoint key -> gradient of the test loss
    ours_out: tuple
    ours_grads: dict  # the same keys, through flax_impl.hf.to_hf_state_dict


def hf_outputs(model: torch.nn.Module, spec: Spec, batch: Batch):
    """(last_hidden_state, logits or None) of a transformers model."""
    kw = dict(input_ids=torch.from_numpy(batch.ids), attention_mask=torch.from_numpy(batch.mask))
    if batch.types is not None:
        kw["token_type_ids"] = torch.from_numpy(batch.types)
    hidden = model.base_model(**kw).last_hidden_state
    logits = model.get_output_embeddings()(hidden) if spec.lm else None
    return hidden, logits


def loss_weights(cfg: fi.TransformerConfig, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed random weights of the test loss sum(hidden * Wh) + sum(logits * Wl), zero at padded positions."""
    rng = np.random.default_rng(7)
    wh = rng.standard_normal((B, L, cfg.d_model)).astype(np.float32) * mask[..., None]
    wl = rng.standard_normal((B, L, cfg.vocab_size)).astype(np.float32) * mask[..., None]
    return wh, wl


def run_theirs(model: torch.nn.Module, spec: Spec, batch: Batch, wh, wl):
    model.zero_grad()
    hidden, logits = hf_outputs(model, spec, batch)
    loss = (hidden * torch.from_numpy(wh)).sum()
    if spec.lm:
        loss = loss + (logits * torch.from_numpy(wl)).sum()
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
    return (hidden.detach().numpy(), None if logits is None else logits.detach().numpy()), grads


def run_ours(model: fi.Transformer, family: str, spec: Spec, batch: Batch, wh, wl):
    """Hidden states, logits and the gradients of the same loss, in one compiled program."""
    types = None if batch.types is None else jnp.asarray(batch.types)

    def loss(m):
        h = m(jnp.asarray(batch.ids), jnp.asarray(batch.mask), token_type_ids=types)
        logits = m.logits(h) if spec.lm else None
        out = jnp.sum(h * wh) + (jnp.sum(logits * wl) if spec.lm else 0.0)
        return out, (h, logits)

    (_, (h, logits)), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return (np.asarray(h), None if logits is None else np.asarray(logits)), fh.to_hf_state_dict(holder, family)
