"""Token embedding with torch.nn.Embedding's semantics: padding_idx, N(0, 1) init, tied output logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import checkify

from flax_impl._kernels.matmul import dot_general
from flax_impl.sharding import VOCAB_ROWS, param_metadata
from flax_impl.validation import check_bool, check_int


def check_ids(ids: object, num_embeddings: int) -> None:
    """Check token ids against an embedding of `num_embeddings` rows, before any lookup.

    Concrete values (numpy arrays, lists, un-traced jax arrays) are checked in full. A tracer (under `jit`) has
    no values to inspect: only its dtype is checked.

    Args:
        ids: token ids of any shape (...).
        num_embeddings: V, the number of rows.

    Raises:
        TypeError: `ids` are not integers.
        IndexError: an id is outside [0, V); the message names the first such id and counts them.
        ValueError: num_embeddings is not an integer >= 1 (a TypeError for a non-integer).
    """
    num_embeddings = check_int("num_embeddings", num_embeddings, low=1)
    if isinstance(ids, jax.core.Tracer):
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        return
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype} (value {arr.ravel()[:1]!r}...)")
    if arr.size == 0:
        return
    bad = (arr < 0) | (arr >= num_embeddings)
    if bad.any():
        first = int(arr[bad].ravel()[0])
        raise IndexError(
            f"token id {first} is out of range for an embedding of num_embeddings={num_embeddings} "
            f"(valid ids are 0..{num_embeddings - 1}); {int(bad.sum())} id(s) out of range"
        )


def _embed_args(num_embeddings: object, features: object, padding_idx: object) -> tuple[int, int, int | None]:
    """Embed's sizes checked by type and range; a negative padding_idx counted from the end, as torch does."""
    V = check_int("num_embeddings", num_embeddings, low=1)
    D = check_int("features", features, low=1)
    padding_idx = check_int("padding_idx", padding_idx, low=-V, high=V, none_ok=True)
    return V, D, None if padding_idx is None else padding_idx % V


class Embed(nnx.Module):
    """Lookup table `weight` (V, D): ids (...) -> weight[ids] (..., D).

    Like torch.nn.Embedding: initialised N(0, 1); the `padding_idx` row starts at zero and receives exactly
    zero gradient (its forward value is whatever the row holds). Concrete ids outside [0, V) raise IndexError
    and float ids raise TypeError, before any work. Under `jit` ids are tracers and cannot be inspected: the
    unchecked path returns a NaN row for any out-of-range id (never another token's row); with `checked=True`
    the traced path emits a `checkify` check instead, so `checkify.checkify(f)` reports the bad id.

    Args:
        num_embeddings: V >= 1, the number of rows.
        features: D >= 1, the width of a row.
        padding_idx: the row that starts at zero and gets no gradient, in [-V, V) (negative counts from the
            end, as torch); None: no such row.
        checked: under `jit`, emit a `checkify` check for out-of-range ids.
        param_dtype: dtype of `weight`.
        rngs: `rngs.params()` draws the initial table.

    Raises:
        TypeError: V, D or padding_idx not an integer, checked not a bool (`ArgumentTypeError`).
        ValueError: V or D < 1, or `padding_idx` outside [-V, V).

    Example:
        >>> emb = Embed(10, 4, padding_idx=0, rngs=nnx.Rngs(0))
        >>> emb(jnp.array([[0, 3, 9]])).shape
        (1, 3, 4)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        padding_idx: int | None = None,
        checked: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_embeddings, features, padding_idx = _embed_args(num_embeddings, features, padding_idx)
        checked = check_bool("checked", checked)
        self.num_embeddings = num_embeddings
        self.features = features
        self.padding_idx = padding_idx
        self.checked = checked
        w = jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype)
        if padding_idx is not None:
            w = w.at[padding_idx].set(0)
        self.weight = nnx.Param(w, **param_metadata(VOCAB_ROWS))  # vocab-parallel under a mesh

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Look up rows: ids (...) -> weight[ids] (..., D).

        Args:
            ids: integer token ids, any shape (...); usually (B, L).

        Returns:
            (..., D) in `weight`'s dtype. Under `jit`, an out-of-range id gives a NaN row.

        Raises:
            TypeError: non-integer ids.
            IndexError: a concrete id outside [0, V).
        """
        check_ids(ids, self.num_embeddings)
        ids = jnp.asarray(ids)
        weight = self.weight[...]
        if isinstance(ids, jax.core.Tracer) and self.checked:
            checkify.check(
                jnp.all((ids >= 0) & (ids < self.num_embeddings)),
                f"token id out of range [0, {self.num_embeddings})",
            )
        # Negative ids would wrap in jnp.take: send them past the end so that mode="fill" gives NaN.
        safe = jnp.where(ids < 0, self.num_embeddings, ids)
        out = jnp.take(weight, safe, axis=0, mode="fill", fill_value=jnp.nan)  # (..., D)
        if self.padding_idx is not None:
            out = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(out), out)
        return out

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output logits: x @ weight.T.

        Args:
            x: (..., D), usually (B, L, D).

        Returns:
            (..., V) in x's dtype.
        """
        weight = self.weight[...].astype(x.dtype)  # (V, D)
        return dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))  # float32 sums below float32
