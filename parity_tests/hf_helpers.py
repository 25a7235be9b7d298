"""Tiny transformers models for the Hugging Face parity tests: how each family is built (`hf_specs`), the padded
batch, and both sides' outputs and gradients of one test loss (ours through the Flax model or its torch twin).
Nothing is downloaded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from hf_specs import FAMILIES, SPECS, VARIANTS, Spec

import flax_impl as fi
import flax_impl.hf as fh
import torch_ref as tr

__all__ = ["FAMILIES", "SPECS", "VARIANTS", "Spec"]

B, L = 3, 12
# Row 0 is full; row 1 right-padded (7 real tokens); row 2 left-padded (8 real tokens: where OPT's and RoBERTa's
# positions differ from 0 .. L - 1).
REAL = [(0, L), (0, 7), (4, L)]


def build_hf(spec: Spec, seed: int = 1) -> torch.nn.Module:
    """The family's tiny transformers model: eval mode, float32, eager attention, every parameter perturbed."""
    config = getattr(transformers, spec.config_cls)(**spec.kwargs)
    torch.manual_seed(0)
    model_cls = getattr(transformers, spec.model_cls)
    model = model_cls._from_config(config, attn_implementation="eager", **spec.model_kwargs).eval()
    perturb(model, seed=seed)
    return model


def perturb(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises norms to 1 and biases to 0: move every parameter off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@dataclasses.dataclass(frozen=True)
class Batch:
    """Padded ids (B, L) (right and left), the mask (1 = real token) and token types (BERT) or None."""

    ids: np.ndarray
    mask: np.ndarray
    types: np.ndarray | None

    @property
    def real(self) -> np.ndarray:
        return self.mask.astype(bool)


def make_batch(spec: Spec, vocab: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, L), np.int64)
    for b, (start, stop) in enumerate(REAL):
        mask[b, start:stop] = 1
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
    wh = rng.standard_normal((*mask.shape, cfg.d_model)).astype(np.float32) * mask[..., None]
    wl = rng.standard_normal((*mask.shape, cfg.vocab_size)).astype(np.float32) * mask[..., None]
    return wh, wl


def run_theirs(model: torch.nn.Module, spec: Spec, batch: Batch, wh, wl):
    """transformers' outputs and the gradients of the test loss, keyed as transformers saves each parameter."""
    model.zero_grad()
    hidden, logits = hf_outputs(model, spec, batch)
    loss = (hidden * torch.from_numpy(wh)).sum()
    if spec.lm:
        loss = loss + (logits * torch.from_numpy(wl)).sum()
    loss.backward()
    grads = {spec.saved_names.get(k, k): p.grad.numpy().copy() for k, p in model.named_parameters()}
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


def run_twin(model: fi.Transformer, family: str, spec: Spec, batch: Batch, wh, wl):
    """As `run_ours`, through the torch twin holding the Flax model's weights (no compile)."""
    twin = tr.Transformer(model.config)
    twin.load_state_dict(tr.from_numpy_state_dict(fi.to_numpy_state_dict(model)))
    twin.eval()
    types = None if batch.types is None else torch.from_numpy(batch.types)
    h = twin(torch.from_numpy(batch.ids), torch.from_numpy(batch.mask), token_type_ids=types)
    logits = twin.logits(h) if spec.lm else None
    loss = (h * torch.from_numpy(wh)).sum() + ((logits * torch.from_numpy(wl)).sum() if spec.lm else 0.0)
    loss.backward()
    holder = nnx.clone(model)
    grads = {k: np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()
             for k, p in twin.named_parameters()}  # fmt: skip
    fi.load_torch_state_dict(holder, grads)
    out = (h.detach().numpy(), None if logits is None else logits.detach().numpy())
    return out, fh.to_hf_state_dict(holder, family)
