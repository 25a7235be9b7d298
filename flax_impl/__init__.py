"""flax_impl: Transformer building blocks in JAX/Flax NNX, each with a PyTorch twin in torch_ref.

The public names are listed once, in `__init__.pyi` (the stub type checkers read); each is imported from its module
on first use, so that `flax_impl.config` (pure Python) can be read without jax. The
library imports neither torch, torch_ref nor argparse (weights reach torch as numpy:
`torch_ref.from_numpy_state_dict(to_numpy_state_dict(model))`); the `flax-impl` command lives in `flax_impl.apps`.

Example:
    >>> import flax_impl as fi
    >>> from flax import nnx
    >>> cfg = fi.TransformerConfig(vocab_size=260, d_model=64, n_heads=4, d_ff=256, n_layers=2)
    >>> model = fi.Transformer(cfg, rngs=nnx.Rngs(0)); model.eval()
    >>> ids, mask = fi.batch_encode(["hello", "hi"], fi.ByteTokenizer())    # (B, L) each
    >>> model(ids, mask).shape                                              # (B, L, D)
    (2, 5, 64)

Generation (causal models): `flax_impl.generate(model, prompts, max_new_tokens=...)`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

__version__ = "0.1.0"


def _read_exports() -> dict[str, str]:
    """name -> the module it is imported from, read from the `from module import name as name` lines of the stub."""
    tree = ast.parse(Path(__file__).with_suffix(".pyi").read_text(encoding="utf-8"))
    return {a.asname or a.name: n.module for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}


_EXPORTS = _read_exports()
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flax_impl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
