"""Weight layouts: how one or more of our tensors are stored as one or more checkpoint tensors.

A `Layout` is a pair of exact inverses built from permutations, splits and concatenations only (so a round trip
is bit-exact), plus the checkpoint shapes computed from ours without touching data (so a checkpoint is checked
from its header before any tensor is read). Every function takes a list of tensors (ours in the order of the
`Key.ours` templates, theirs in the order of `Key.parts`) and the `Dims` of the model: head counts, and the
family's resolved config.json values for layouts that depend on the config (Falcon's qkv).

Our tensors are torch_ref's state-dict tensors (nn.Linear layout, (out, in)). Axes: D model width, N heads,
K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Arrays = list[np.ndarray]
Shapes = list[tuple[int, ...]]


@dataclass(frozen=True)
class Dims:
    """What a layout may read: N query heads, K kv heads, H head dim, and `hf`: every config.json key the family's
    table names (its Fields, Requires and converters' reads), transformers' default filled in, kinds checked."""

    N: int
    K: int
    H: int
    hf: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    """How our tensors (one or several) are stored as the checkpoint's tensors (one or several).

    `to_ours(theirs, dims)` -> ours and `to_hf(ours, dims)` -> theirs are exact inverses; `hf_shapes(our_shapes,
    dims)` gives the checkpoint shapes from ours. Lists are ordered as `Key.ours` (ours) and `Key.parts` (theirs;
    one tensor when the key has no parts)."""

    name: str
    to_ours: Callable[[Arrays, Dims], Arrays]
    to_hf: Callable[[Arrays, Dims], Arrays]
    hf_shapes: Callable[[Shapes, Dims], Shapes]


def _qkv_sizes(d: Dims) -> list[int]:
    return [d.N * d.H, d.K * d.H, d.K * d.H]


def _split_rows(a: np.ndarray, sizes: list[int]) -> Arrays:
    return np.split(a, np.cumsum(sizes)[:-1], axis=0)


def _per_head_to_ours(a: np.ndarray, d: Dims) -> np.ndarray:
    rest = a.shape[1:]
    return a.reshape(d.N, 3, d.H, *rest).swapaxes(0, 1).reshape(3 * d.N * d.H, *rest)  # rows (3, N, H)


def _per_head_to_hf(a: np.ndarray, d: Dims) -> np.ndarray:
    rest = a.shape[1:]
    return a.reshape(3, d.N, d.H, *rest).swapaxes(0, 1).reshape(3 * d.N * d.H, *rest)  # rows (N, 3, H)


def _grouped_to_ours(a: np.ndarray, d: Dims) -> np.ndarray:
    """Falcon's new_decoder_architecture: rows (K, G + 2, H), G = N / K query heads then the kv head's k and v."""
    G, rest = d.N // d.K, a.shape[1:]
    g = a.reshape(d.K, G + 2, d.H, *rest)
    q, k, v = g[:, :G].reshape(d.N * d.H, *rest), g[:, G], g[:, G + 1]  # query head n = kv head n // G
    return np.concatenate([q, k.reshape(d.K * d.H, *rest), v.reshape(d.K * d.H, *rest)], axis=0)


def _grouped_to_hf(a: np.ndarray, d: Dims) -> np.ndarray:
    G, rest = d.N // d.K, a.shape[1:]
    q, k, v = _split_rows(a, _qkv_sizes(d))
    q = q.reshape(d.K, G, d.H, *rest)
    k, v = k.reshape(d.K, 1, d.H, *rest), v.reshape(d.K, 1, d.H, *rest)
    return np.concatenate([q, k, v], axis=1).reshape(-1, *rest)  # rows (K, G + 2, H)


# CodeGen's qkv_proj: rows viewed as (4, 3, D / 4), the 3 in the order q, v, k (its `mp_num = 4` model-parallel
# groups, written into transformers' CodeGenAttention).
_CODEGEN_GROUPS = 4
_CODEGEN_ORDER = (0, 2, 1)  # HF part index -> ours (q, v, k) -> (q, k, v); the permutation is its own inverse


def _codegen_to_ours(a: np.ndarray, d: Dims) -> np.ndarray:
    rest, D = a.shape[1:], d.N * d.H
    g = a.reshape(_CODEGEN_GROUPS, 3, D // _CODEGEN_GROUPS, *rest)[:, list(_CODEGEN_ORDER)]
    return g.swapaxes(0, 1).reshape(3 * D, *rest)  # rows (3, groups, D / groups) = [q; k; v]


def _codegen_to_hf(a: np.ndarray, d: Dims) -> np.ndarray:
    rest, D = a.shape[1:], d.N * d.H
    g = a.reshape(3, _CODEGEN_GROUPS, D // _CODEGEN_GROUPS, *rest).swapaxes(0, 1)
    return g[:, list(_CODEGEN_ORDER)].reshape(3 * D, *rest)


def _falcon_kind(d: Dims) -> str:
    """Falcon's fused query_key_value by its config: "grouped" (new_decoder_architecture), "identity" (classic
    multi-query: [q (N H); k (H); v (H)]) or "per_head" (classic multi-head: (N, 3, H))."""
    if d.hf["new_decoder_architecture"]:
        return "grouped"
    return "identity" if d.hf["multi_query"] else "per_head"


def _falcon_to_ours(a: np.ndarray, d: Dims) -> np.ndarray:
    kind = _falcon_kind(d)
    return _grouped_to_ours(a, d) if kind == "grouped" else _per_head_to_ours(a, d) if kind == "per_head" else a


def _falcon_to_hf(a: np.ndarray, d: Dims) -> np.ndarray:
    kind = _falcon_kind(d)
    return _grouped_to_hf(a, d) if kind == "grouped" else _per_head_to_hf(a, d) if kind == "per_head" else a


def _one(to_ours: Callable[[np.ndarray, Dims], np.ndarray], to_hf: Callable[[np.ndarray, Dims], np.ndarray]):
    """A layout of one tensor on each side whose shape it keeps."""
    return (lambda a, d: [to_ours(a[0], d)]), (lambda a, d: [to_hf(a[0], d)]), (lambda s, d: list(s))


LAYOUTS: dict[str, Layout] = {
    # Same tensor, same layout (nn.Linear (out, in) on both sides, embeddings, norms, biases).
    "identity": Layout("identity", lambda a, d: [a[0]], lambda a, d: [a[0]], lambda s, d: list(s)),
    # GPT-2's Conv1D stores its weight (in, out), the transpose of nn.Linear's (out, in).
    "conv1d": Layout("conv1d", lambda a, d: [a[0].T], lambda a, d: [a[0].T], lambda s, d: [s[0][::-1]]),
    # Separate q, k, v projections (Llama-family q_proj/k_proj/v_proj, BERT query/key/value), weights
    # (N*H | K*H, D) or biases: ours is one in_proj with rows [q (N*H); k (K*H); v (K*H)].
    "qkv_concat": Layout(
        "qkv_concat",
        lambda a, d: [np.concatenate(a, axis=0)],
        lambda a, d: _split_rows(a[0], _qkv_sizes(d)),
        lambda s, d: [(n, *s[0][1:]) for n in _qkv_sizes(d)],
    ),
    # BLOOM's and GPT-NeoX's fused query_key_value is per head: its 3*N*H rows are viewed as (N, 3, H).
    "qkv_per_head": Layout("qkv_per_head", *_one(_per_head_to_ours, _per_head_to_hf)),
    # Falcon's new_decoder_architecture: rows (K, N/K + 2, H), each kv head's query heads then its k and v.
    "qkv_grouped": Layout("qkv_grouped", *_one(_grouped_to_ours, _grouped_to_hf)),
    # Falcon's query_key_value in each of its three layouts, chosen by config.json (see `_falcon_kind`).
    "qkv_falcon": Layout("qkv_falcon", *_one(_falcon_to_ours, _falcon_to_hf)),
    # CodeGen's qkv_proj: rows (4, 3, D/4) with the parts in the order q, v, k.
    "qkv_codegen": Layout("qkv_codegen", *_one(_codegen_to_ours, _codegen_to_hf)),
    # Two of ours (equal shapes) stored as one tensor, rows concatenated: Phi-3's gate_up_proj = [gate; up].
    "concat_rows": Layout(
        "concat_rows",
        lambda a, d: np.split(a[0], 2, axis=0),
        lambda a, d: [np.concatenate(a, axis=0)],
        lambda s, d: [(sum(x[0] for x in s), *s[0][1:])],
    ),
}
