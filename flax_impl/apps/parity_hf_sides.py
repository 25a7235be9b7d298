"""The two sides of `flax-impl parity --hf`: the Flax model and transformers' model of one local folder, run on
one batch. Each side gives every layer's output, the model's output (logits, or the last hidden state of an
encoder), the gradients of one scalar loss keyed as the checkpoint, and, for causal models, cached decoding.

transformers runs with `attn_implementation="eager"` (PITFALLS: SDPA builds its masks differently), in float32,
float64 (the referee) or bfloat16. Its hidden states are read by hooks on its layer list (the input of the first
layer, then each layer's output), so nothing depends on what a family's `output_hidden_states` includes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

TORCH_DTYPES = ("float32", "float64", "bfloat16")


@dataclass(frozen=True)
class Batch:
    """Token ids (B, L), each row starting with the config's bos_token_id when it has one (as a tokenizer
    writes it: trained models grow their largest activations at the first token), the last row right-padded by
    a quarter of L; `mask` (B, L), 1 = real token; `w` the loss weights, zero at padded positions."""

    ids: np.ndarray
    mask: np.ndarray
    w: np.ndarray

    @property
    def real(self) -> np.ndarray:
        return self.mask.astype(bool)


@dataclass
class Side:
    """One run: `hidden` n_layers + 1 arrays (B, L, D) (the input of layer 0, then each layer's output);
    `out` (B, L, V) logits or (B, L, D) the last hidden state; `grads` checkpoint key -> gradient of
    sum(out * w) (empty when not asked for)."""

    hidden: list[np.ndarray]
    out: np.ndarray
    grads: dict[str, np.ndarray]


def make_batch(cfg: Any, bos: int | None, batch: int, length: int, seed: int, out_width: int) -> Batch:
    """The random batch both sides run (see `Batch`); `out_width` is V (logits) or D (an encoder's output)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int64)
    if bos is not None and 0 <= bos < cfg.vocab_size:
        ids[:, 0] = bos
    mask = np.ones((batch, length), np.int64)
    mask[-1, length - max(1, length // 4) :] = 0
    w = rng.standard_normal((batch, length, out_width)).astype(np.float32) * mask[..., None]
    return Batch(ids, mask, w)


def load_theirs(hf_path: str, causal: bool, dtype: str = "float32") -> Any:
    """transformers' model of the folder in eval mode, eager attention, in `dtype` (one of TORCH_DTYPES)."""
    import torch
    import transformers

    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # neither its load report (e.g. BertModel's unused pooler) nor its own bar
    logging.disable_progress_bar()
    try:
        model = auto.from_pretrained(hf_path, attn_implementation="eager", dtype=getattr(torch, dtype))
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    return model.eval()


def _layer_list(module: Any, n_layers: int) -> Any:
    """transformers' list of its n_layers decoder / encoder layers (the ModuleList of that length)."""
    import torch

    found = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers]
    if len(found) != 1:
        raise ValueError(f"cannot find the one list of {n_layers} layers in {type(module).__name__}")
    return found[0]


def run_theirs(model: Any, batch: Batch, n_layers: int, *, grads: bool = True) -> Side:
    """transformers' hidden states, output and (optionally) gradients, in the model's dtype (hidden states and
    output returned as float64, bfloat16 widened exactly; gradients as computed, float32 or float64)."""
    import torch

    layers, captured = _layer_list(model, n_layers), []

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    def hook(module: Any, args: tuple, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook) for layer in layers]
    model.zero_grad(set_to_none=True)
    try:
        with torch.set_grad_enabled(grads):
            res = model(input_ids=torch.from_numpy(batch.ids), attention_mask=torch.from_numpy(batch.mask))
            out = res.logits if hasattr(res, "logits") else res.last_hidden_state
            if grads:
                (out * torch.from_numpy(batch.w).to(out.dtype)).sum().backward()
    finally:
        for h in handles:
            h.remove()

    def wide(t: Any) -> np.ndarray:
        return t.detach().to(torch.float64).numpy()

    grad = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None} if grads else {}
    return Side([wide(h) for h in captured], wide(out), grad)


def run_ours(model: Any, model_type: str, batch: Batch, *, grads: bool = True) -> Side:
    """Our hidden states, output and (optionally) gradients of sum(out * w), in one compiled program; the
    gradients keyed as the checkpoint (`flax_impl.hf.to_hf_state_dict`)."""
    import jax.numpy as jnp
    from flax import nnx

    from flax_impl import hf

    ids, mask, w = jnp.asarray(batch.ids), jnp.asarray(batch.mask), jnp.asarray(batch.w)
    causal = model.config.causal

    def loss(m: Any) -> tuple:
        hidden = m.hidden_states(ids, mask)  # (N + 1, B, L, D)
        h = m(ids, mask)  # (B, L, D)
        out = m.logits(h) if causal else h  # (B, L, V) or (B, L, D)
        return jnp.sum(out.astype(jnp.float32) * w), (hidden, out)

    if grads:
        (_, (hidden, out)), g = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        graph, _, rest = nnx.split(model, nnx.Param, ...)
        keyed = hf.to_hf_state_dict(nnx.merge(graph, g, rest), model_type)
        grad = {k: np.asarray(v) for k, v in keyed.items()}  # float32: widened one tensor at a time when compared
    else:
        _, (hidden, out) = nnx.jit(loss)(model)
        grad = {}
    wide = np.asarray(hidden.astype(jnp.float32), np.float64)
    return Side(list(wide), np.asarray(out.astype(jnp.float32), np.float64), grad)


@dataclass
class Decoded:
    """Cached greedy decoding of each batch row's real tokens as a prompt: `tokens` (B, T) our `generate`
    chose, `ours` (B, T, V) the logits it chose them from, `theirs` (B, T, V) transformers' full forward (no
    cache) over prompt + tokens, at the positions that predict each of them."""

    tokens: np.ndarray
    ours: np.ndarray
    theirs: np.ndarray


def decode(model: Any, ref: Any, batch: Batch, steps: int) -> Decoded:
    """Our `flax_impl.generate` (KV cache, one compiled loop) against transformers' uncached forward."""
    import torch

    import flax_impl as fi

    room = model.config.max_len - steps  # the longest prompt that leaves room for `steps` tokens
    prompts = [row[m.astype(bool)][:room].tolist() for row, m in zip(batch.ids, batch.mask, strict=True)]
    out = fi.generate(model, prompts, max_new_tokens=steps, return_logits=True)
    theirs = []
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        seq = torch.tensor([prompt + tokens[:-1].tolist()])  # (1, P + T - 1): no padding, no cache
        with torch.no_grad():
            logits = ref(input_ids=seq).logits[0, len(prompt) - 1 :]  # (T, V)
        theirs.append(logits.to(torch.float64).numpy())
    return Decoded(np.asarray(out.tokens), np.asarray(out.logits, np.float64), np.stack(theirs))


def check_weight_files(paths: list[str]) -> None:
    """Open the safetensors header of every weight file of these folders (or files), before any heavy work:
    a truncated or corrupt file is named in one line.

    Raises:
        ValueError: "<file>: not a readable safetensors file (truncated or corrupt?): <reason>".
    """
    from safetensors import safe_open

    from flax_impl.hf import io

    files = []
    for path in paths:
        files += io.weight_files(path) if os.path.isdir(path) else [path]
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    f.get_slice(key).get_shape()
        except Exception as err:  # safetensors raises SafetensorError, a bare Exception subclass
            if isinstance(err, OSError):
                raise ValueError(f"{file}: cannot read: {err}") from None
            raise ValueError(f"{file}: not a readable safetensors file (truncated or corrupt?): {err}") from None
