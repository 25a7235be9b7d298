"""Tokenizers for the input pipeline: the built-in `ByteTokenizer`, an adapter for any HF `tokenizers.Tokenizer`
or callable str -> list[int] (`as_tokenizer`), and the batched form `batch_encode` -> (ids, attention_mask).

Pure Python + numpy (no jax, no torch): torch_ref re-exports this file, so both twins tokenize identically.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from flax_impl.validation import check_bool, check_int

# ByteTokenizer's special ids come first, so that pad = 0 can be an Embed's padding_idx; byte b is id b + 4.
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
N_SPECIAL = 4
SPECIAL_TOKENS = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>", MASK_ID: "<mask>"}

_HF_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")


@runtime_checkable
class TokenizerLike(Protocol):
    """What the pipeline needs from a tokenizer: `encode`, `pad_id` (None if unknown), `vocab_size` (None if
    unknown). `as_tokenizer` turns the supported kinds into this."""

    pad_id: int | None
    vocab_size: int | None

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens, no download, nothing unknown: every string encodes (so there is no unk id).

    Ids: 0 = `<pad>`, 1 = `<bos>`, 2 = `<eos>`, 3 = `<mask>` (for masked-token training), then byte b -> b + 4;
    vocab_size = 260. `decode` drops the special ids and decodes the bytes with errors="replace", so a sequence
    cut in the middle of a multi-byte character decodes to U+FFFD instead of raising.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [108, 199, 173]
        >>> tok.decode(tok.encode("hé", add_bos=True, add_eos=True))
        'hé'
    """

    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    mask_id: int = MASK_ID
    vocab_size: int = 256 + N_SPECIAL

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """str -> ids: [bos] + [b + 4 for b in text.encode("utf-8")] + [eos] (bos/eos only if asked).

        Args:
            text: the string to encode.
            add_bos: start with `<bos>` (1).
            add_eos: end with `<eos>` (2).

        Returns:
            The (L,) ids as a list of int.

        Raises:
            TypeError: `text` is not a str, `add_bos` / `add_eos` not bools.
        """
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        add_bos, add_eos = check_bool("add_bos", add_bos), check_bool("add_eos", add_eos)
        ids = [b + N_SPECIAL for b in text.encode("utf-8")]
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """ids -> str, special ids dropped, invalid UTF-8 replaced by U+FFFD.

        Args:
            ids: token ids, any shape (flattened).

        Returns:
            The decoded string.

        Raises:
            ValueError: an id outside [0, 260), named.
        """
        out = bytearray()
        for i in np.asarray(ids, dtype=np.int64).ravel().tolist():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is not a ByteTokenizer id (valid ids are 0..{self.vocab_size - 1})")
            if i >= N_SPECIAL:
                out.append(i - N_SPECIAL)
        return out.decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        """A readable name for id i: `<pad>`..`<mask>`, the character for printable ASCII, else `<0xNN>`.

        Raises:
            ValueError: `i` outside [0, 260), named.
        """
        if i in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[i]
        b = i - N_SPECIAL
        if not 0 <= b < 256:
            raise ValueError(f"token id {i} is not a ByteTokenizer id (valid ids are 0..{self.vocab_size - 1})")
        return chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260, pad=0, bos=1, eos=2, mask=3, byte b -> b + 4)"


class TokenizerAdapter:
    """Wraps an encode function (and optionally decode / id_to_token) into the `TokenizerLike` interface, checking
    that every call returns non-negative integer ids. Built by `as_tokenizer`.

    Args:
        encode_fn: str -> a flat sequence of ids, or an object with `.ids` (a `tokenizers.Encoding`).
        pad_id: the id to pad with, or None if the tokenizer has none.
        vocab_size: V, or None if unknown.
        decode_fn: list[int] -> str, or None.
        id_to_token_fn: int -> the token's name, or None.
        name: the name used in error messages.
    """

    def __init__(
        self,
        encode_fn: Callable[[str], Any],
        *,
        pad_id: int | None,
        vocab_size: int | None,
        decode_fn: Callable[[list[int]], str] | None = None,
        id_to_token_fn: Callable[[int], Any] | None = None,
        name: str = "tokenizer",
    ):
        self._encode = encode_fn
        self._decode = decode_fn
        self._id_to_token = id_to_token_fn
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.name = name

    def encode(self, text: str) -> list[int]:
        """str -> the (L,) ids as a list of int.

        Raises:
            TypeError: `text` is not a str, or `encode_fn` returns something other than a flat sequence of
                integers.
            ValueError: `encode_fn` returns a negative id.
        """
        if not isinstance(text, str):
            raise TypeError(f"{self.name}.encode expects a str, got {type(text).__name__}")
        out = self._encode(text)
        out = getattr(out, "ids", out)  # tokenizers.Encoding -> its ids
        ids = np.asarray(out)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"{self.name} must return a flat list of integer ids, got {type(out).__name__} {out!r:.80}")
        ids = ids.astype(np.int64)
        if (ids < 0).any():
            raise ValueError(f"{self.name} returned a negative token id {int(ids[ids < 0][0])}")
        return ids.tolist()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """ids (any shape, flattened) -> str through `decode_fn`.

        Raises:
            TypeError: the adapter has no `decode_fn`.
        """
        if self._decode is None:
            raise TypeError(f"{self.name} was built from a callable and has no decode")
        return self._decode(np.asarray(ids, dtype=np.int64).ravel().tolist())

    def id_to_token(self, i: int) -> str | None:
        """The token's name through `id_to_token_fn`, or None without one."""
        return None if self._id_to_token is None else self._id_to_token(int(i))

    def __repr__(self) -> str:
        return f"TokenizerAdapter({self.name}, vocab_size={self.vocab_size}, pad_id={self.pad_id})"


def as_tokenizer(obj: Any, *, pad_id: int | None = None, vocab_size: int | None = None) -> TokenizerLike:
    """The `TokenizerLike` the pipeline reads, from any supported kind of tokenizer.

    Detected pad id of an HF tokenizer: its padding's pad_id, else the id of "[PAD]", "<pad>", "<|pad|>" or
    "<PAD>", else None (`batch_encode` then asks for one). Other objects: their `pad_id` or `pad_token_id`.

    Args:
        obj: a `ByteTokenizer` (returned as is), an HF `tokenizers.Tokenizer` (ids of `encode(text)`, special
            tokens as its post-processor adds them), any object with `encode(str) -> list[int]`, or any callable
            str -> list[int].
        pad_id: overrides the detected pad id.
        vocab_size: overrides the detected vocabulary size.

    Returns:
        `obj` itself if it is already a `ByteTokenizer` or `TokenizerAdapter` and nothing is overridden, else a
        `TokenizerAdapter`.

    Raises:
        TypeError: `obj` is a str or bytes, or none of the supported kinds; `pad_id` / `vocab_size` not integers.
        ValueError: `pad_id` < 0 or `vocab_size` < 1.

    Example:
        >>> tok = as_tokenizer(lambda s: [ord(c) for c in s], pad_id=0, vocab_size=128)
        >>> tok.encode("hi"), tok.pad_id
        ([104, 105], 0)
    """
    pad_id = check_int("pad_id", pad_id, low=0, none_ok=True)
    vocab_size = check_int("vocab_size", vocab_size, low=1, none_ok=True)
    if isinstance(obj, (ByteTokenizer, TokenizerAdapter)) and pad_id is None and vocab_size is None:
        return obj
    if isinstance(obj, (str, bytes)):
        raise TypeError(f"as_tokenizer got the {type(obj).__name__} {obj!r:.40}; pass a tokenizer object or a callable")
    if hasattr(obj, "encode") and hasattr(obj, "get_vocab_size") and hasattr(obj, "token_to_id"):  # HF tokenizers
        if pad_id is None:
            padding = getattr(obj, "padding", None)
            pad_id = padding.get("pad_id") if padding else None
        if pad_id is None:
            pad_id = next((obj.token_to_id(t) for t in _HF_PAD_TOKENS if obj.token_to_id(t) is not None), None)
        return TokenizerAdapter(
            obj.encode,
            pad_id=pad_id,
            vocab_size=obj.get_vocab_size() if vocab_size is None else vocab_size,
            decode_fn=obj.decode,
            id_to_token_fn=obj.id_to_token,
            name=type(obj).__name__,
        )
    if hasattr(obj, "encode") and callable(obj.encode):
        return TokenizerAdapter(
            obj.encode,
            pad_id=getattr(obj, "pad_id", getattr(obj, "pad_token_id", None)) if pad_id is None else pad_id,
            vocab_size=getattr(obj, "vocab_size", None) if vocab_size is None else vocab_size,
            decode_fn=getattr(obj, "decode", None),
            id_to_token_fn=getattr(obj, "id_to_token", None),
            name=type(obj).__name__,
        )
    if callable(obj):
        return TokenizerAdapter(obj, pad_id=pad_id, vocab_size=vocab_size, name=getattr(obj, "__name__", "callable"))
    raise TypeError(
        f"cannot use {type(obj).__name__} as a tokenizer: expected a ByteTokenizer, a tokenizers.Tokenizer, an object "
        "with encode(str) -> list[int], or a callable str -> list[int]"
    )


def token_name(tokenizer: Any, token_id: int) -> str:
    """`repr` of the token's string when the tokenizer can name it, else "" (for error messages)."""
    try:
        name = tokenizer.id_to_token(int(token_id))
    except Exception:  # noqa: BLE001 - naming is best effort, the id is always reported
        return ""
    return "" if name is None else f" ({name!r})"


def encode_checked(text: str, tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Tokenize one text, every id checked against an embedding of `vocab_size` rows before any lookup.

    Args:
        text: the string to encode.
        tokenizer: anything `as_tokenizer` accepts.
        vocab_size: V, the rows of the embedding the ids are for.

    Returns:
        (L,) int64; (0,) for a text that tokenizes to nothing.

    Raises:
        TypeError: `text` is not a str, or the tokenizer is unusable or returns non-integer ids.
        ValueError: the tokenizer returns a negative id.
        IndexError: an id >= V, naming the token, its position and V.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    vocab_size = check_int("vocab_size", vocab_size, low=1)
    tok = as_tokenizer(tokenizer)
    ids = np.asarray(tok.encode(text), dtype=np.int64).reshape(-1)  # (L,)
    bad = np.flatnonzero(ids >= vocab_size)
    if bad.size:
        p = int(bad[0])
        raise IndexError(
            f"token id {int(ids[p])}{token_name(tok, int(ids[p]))} at position {p} is out of range for an embedding "
            f"with vocabulary size {vocab_size} (valid ids 0..{vocab_size - 1}); {bad.size} of {ids.size} ids are "
            "out of range: the tokenizer and the embedding do not match"
        )
    return ids


def batch_encode(
    texts: Sequence[str], tokenizer: Any, *, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a batch into right-padded ids and the matching attention mask.

    L is the longest row, or exactly `max_len` when given (a fixed shape: one jit compile for every batch); rows
    longer than `max_len` are cut to their first `max_len` ids. An empty text is a row of padding (mask all zero).

    Args:
        texts: B strings.
        tokenizer: anything `as_tokenizer` accepts; its pad id fills the padding.
        max_len: the fixed length L >= 0, or None for the longest row.

    Returns:
        ids (B, L) int32 and attention_mask (B, L) int32 (1 = real token, 0 = pad).

    Raises:
        TypeError: `texts` is not a sequence of str, or the tokenizer is unusable or returns non-integer ids.
        ValueError: `max_len` < 0 (a TypeError if not an integer or None); the batch needs padding and the
            tokenizer has no pad id (pass `as_tokenizer(tok, pad_id=...)`); an id is negative or does not fit in
            int32.

    Example:
        >>> ids, mask = batch_encode(["hi", "hello"], ByteTokenizer())
        >>> ids.shape, mask.tolist()
        ((2, 5), [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts must be a list of str, found a {type(bad).__name__}: {bad!r:.40}")
    max_len = check_int("max_len", max_len, low=0, none_ok=True)
    tok = as_tokenizer(tokenizer)
    rows = [tok.encode(t) for t in texts]
    if max_len is not None:
        rows = [r[:max_len] for r in rows]
    L = max((len(r) for r in rows), default=0) if max_len is None else max_len
    if any(len(r) < L for r in rows) and tok.pad_id is None:
        raise ValueError(f"{tok!r} has no pad id and the batch needs padding: pass as_tokenizer(tok, pad_id=...)")
    too_big = [i for r in rows for i in r if i > np.iinfo(np.int32).max]
    if too_big:
        raise ValueError(f"token id {too_big[0]} does not fit in int32")
    ids = np.full((len(rows), L), tok.pad_id if tok.pad_id is not None else 0, dtype=np.int32)  # (B, L)
    mask = np.zeros((len(rows), L), dtype=np.int32)  # (B, L)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return ids, mask
