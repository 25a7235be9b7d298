"""The models and sides of `flax-impl bench-decode`.

One transformers model is built in-process from a config (random weights, seeded), saved with `save_pretrained`
to a temporary folder, and loaded from there by `flax_impl.hf.from_pretrained`; torch_ref's twin gets the same
weights through `torch_ref.from_numpy_state_dict(flax_impl.to_numpy_state_dict(model))`. Every side then
generates greedily from the same (B, P) prompts, with no stop token, so each generates exactly the tokens asked
for:
- "flax": `flax_impl.generate` (the decode loop compiled as one program);
- "torch_ref": `torch_ref.generate` (the same loop, eager), under `torch.inference_mode()`;
- "hf-eager", "hf-sdpa": transformers' `model.generate(do_sample=False)` with `attn_implementation` "eager" and
  "sdpa", under `torch.inference_mode()`.

A side is a callable (ids (B, P), mask (B, P), new_tokens) -> tokens (B, new_tokens) int; it returns once the
tokens are computed (numpy on the host).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

SIDES = ("flax", "torch_ref", "hf-eager", "hf-sdpa")
MODELS = ("gpt2", "llama")
Side = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def hf_config(name: str, *, d_model: int, n_heads: int, n_kv_heads: int, n_layers: int, d_ff: int, vocab: int,
              max_len: int) -> Any:
    """The transformers config of a benchmark model, without bos/eos ids (nothing stops generation).

    Args:
        name: "gpt2" (learned positions, LayerNorm, GELU MLP, multi-head attention) or "llama" (RoPE, RMSNorm,
            SwiGLU MLP, grouped-query attention with `n_kv_heads` kv heads).
        d_model, n_heads, n_kv_heads, n_layers, d_ff, vocab: the sizes D, N, K, layers, F, V.
        max_len: the longest sequence (prompt + new tokens) the model must take.
    Raises:
        ValueError: an unknown name.
    """
    import transformers

    no_ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if name == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_embd=d_model, n_head=n_heads, n_layer=n_layers, n_inner=d_ff, n_positions=max_len,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **no_ids,
        )
    if name == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
            num_hidden_layers=n_layers, intermediate_size=d_ff, max_position_embeddings=max_len,
            tie_word_embeddings=False, **no_ids,
        )
    raise ValueError(f"model {name!r}: choose from {', '.join(MODELS)}")


class DecodeModels:
    """One benchmark model on every side, with the same weights.

    Args:
        hf_cfg: a transformers config (`hf_config`).
        seed: torch seed of the random weights.
        sides: which of SIDES to build.
    """

    def __init__(self, hf_cfg: Any, *, seed: int, sides: list[str]):
        import torch
        import transformers

        import flax_impl.hf
        import torch_ref
        from flax_impl.interop import to_numpy_state_dict

        transformers.utils.logging.disable_progress_bar()  # the bench's own progress line is enough
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
        self.model_type = hf_cfg.model_type
        with tempfile.TemporaryDirectory(prefix="bench-decode-") as folder:
            hf.save_pretrained(folder)
            self.config, self.flax = flax_impl.hf.from_pretrained(folder)
            self.hf = {}
            for impl in ("eager", "sdpa"):
                if f"hf-{impl}" in sides:
                    self.hf[impl] = transformers.AutoModelForCausalLM.from_pretrained(
                        folder, attn_implementation=impl
                    ).eval()
        self.twin = None
        if "torch_ref" in sides:
            self.twin = torch_ref.Transformer(self.config).eval()
            self.twin.load_state_dict(torch_ref.from_numpy_state_dict(to_numpy_state_dict(self.flax)))
        self.params = sum(p.numel() for p in hf.parameters())

    def side(self, name: str) -> Side:
        """The generate callable of side `name` (one of SIDES)."""
        if name == "flax":
            return self._flax
        if name == "torch_ref":
            return self._torch_ref
        if name.startswith("hf-"):
            model = self.hf[name.removeprefix("hf-")]
            return lambda ids, mask, n: _hf_generate(model, ids, mask, n)
        raise ValueError(f"side {name!r}: choose from {', '.join(SIDES)}")

    def _flax(self, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        from flax_impl.generation import generate

        return np.asarray(generate(self.flax, ids, mask=mask, max_new_tokens=n).tokens)

    def _torch_ref(self, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        import torch

        import torch_ref.generation

        rows = [row[m.astype(bool)].tolist() for row, m in zip(ids, mask, strict=True)]  # ragged lists of ids
        with torch.inference_mode():
            out = torch_ref.generation.generate(self.twin, rows, max_new_tokens=n)
        return _numpy(out.tokens)


def _hf_generate(model: Any, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """transformers' greedy generate of exactly n tokens (no eos id is set, so nothing stops it early)."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)),
            max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
        )
    return out[:, ids.shape[1]:].numpy()


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor or array as numpy."""
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def agreement(reference: np.ndarray, tokens: np.ndarray) -> dict[str, Any]:
    """How far `tokens` (B, T) follow `reference` (B, T'): rows equal, and the first step where any row differs.

    Returns:
        {"equal": bool, "rows_equal": int, "rows": int, "first_difference": step index or None}.
    """
    T = min(reference.shape[1], tokens.shape[1])
    same = reference[:, :T] == tokens[:, :T]
    rows = same.all(axis=1) & (reference.shape[1] == tokens.shape[1])
    diff = np.nonzero(~same.all(axis=0))[0]
    first = int(diff[0]) if diff.size else (None if reference.shape == tokens.shape else T)
    return {"equal": bool(rows.all()), "rows_equal": int(rows.sum()), "rows": int(rows.size),
            "first_difference": first}
