"""The sides of `flax-impl bench-decode`, all with one model's weights (`decode.SIDES` says what each runs).

The Flax model is built with random weights (`flax_impl.Transformer(cfg, flax_config=FlaxConfig(dtype=...,
param_dtype=...), rngs=nnx.Rngs(seed))`); transformers loads the same weights from the folder
`flax_impl.hf.save_pretrained` writes, torch_ref gets them through `torch_ref.from_numpy_state_dict(
flax_impl.to_numpy_state_dict(model))`. Nothing is downloaded. Every side decodes greedily with no stop token,
so each generates exactly the tokens asked for.
"""

from __future__ import annotations

import numpy as np

from flax_impl.config import TransformerConfig


class Sides:
    """One model on every side asked for, in `dtype` (weights and compute).

    Args:
        cfg: the architecture.
        model_type: the Hugging Face family written for transformers ("gpt2" or "llama").
        dtype: "float32" or "bfloat16".
        sides: names from `decode.SIDES`.
        seed: the Flax model's parameter seed.
        folder: an empty temporary folder for the Hugging Face copy (read before this returns).
    """

    def __init__(self, cfg: TransformerConfig, model_type: str, dtype: str, sides: list[str], seed: int,
                 folder: str):
        from flax import nnx

        import flax_impl as fi

        self.flax = fi.Transformer(cfg, flax_config=fi.FlaxConfig(dtype=dtype, param_dtype=dtype),
                                   rngs=nnx.Rngs(seed))
        self.flax.eval()
        self.params, self.models = fi.count_params(self.flax), {}
        if set(sides) - {"flax"}:
            import torch

            self.torch, torch_dtype = torch, getattr(torch, dtype)
        if "torch_ref" in sides:
            import torch_ref

            state = {k: np.asarray(v, np.float32) for k, v in fi.to_numpy_state_dict(self.flax).items()}  # exact
            self.twin = torch_ref.Transformer(cfg).eval()
            self.twin.load_state_dict(torch_ref.from_numpy_state_dict(state))
            self.twin.to(torch_dtype)
        hf = [s for s in sides if s.startswith("hf-")]
        if hf:
            import transformers

            import flax_impl.hf

            transformers.utils.logging.disable_progress_bar()  # the bench's own progress line is enough
            flax_impl.hf.save_pretrained(self.flax, folder, model_type=model_type)
            for side in hf:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, attn_implementation="eager" if side == "hf-eager" else "sdpa", dtype=torch_dtype).eval()
                gen = model.generation_config  # nothing stops generation: exactly the tokens asked for
                gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = None, None, 0
                if side == "hf-compile":
                    gen.cache_implementation = "static"
                    gen.compile_config = transformers.CompileConfig(fullgraph=True, mode="default")
                    gen.compile_config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
                self.models[side] = model

    def generate(self, side: str, ids: np.ndarray, n: int) -> np.ndarray:
        """Side `side`'s greedy continuation of prompts ids (B, P) (no padding) by n tokens: (B, n) int."""
        if side == "flax":
            import flax_impl as fi

            return np.asarray(fi.generate(self.flax, ids, max_new_tokens=n).tokens)
        torch = self.torch
        with torch.inference_mode():
            if side == "torch_ref":
                import torch_ref

                tokens = torch_ref.generate(self.twin, ids.tolist(), max_new_tokens=n).tokens
                return tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
            ids_t = torch.from_numpy(ids.astype(np.int64))
            out = self.models[side].generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t),
                                             max_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].numpy()
