"""Text every machine has without a download: the Python standard library's own source, read from the running
interpreter, tokenized, split into train / held-out by file, and cut into fixed-length windows.

Pure Python + numpy. Deterministic: files in sorted order of their relative paths, every `heldout_every`-th
file held out (so no file is in both splits), windows drawn from a numpy Generator seeded by (seed, step).
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flax_impl.tokenizer import EOS_ID, ByteTokenizer, TokenizerLike

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "turtledemo"})
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def stdlib_root() -> Path:
    """The running interpreter's standard library directory (sysconfig's "stdlib" path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root: str | os.PathLike, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    """Files under `root` with one of `suffixes`, sorted by relative path, skipping third-party packages, test
    suites and caches (`SKIP_DIRS`). A file given as `root` is returned alone."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"corpus path {str(root)!r} is neither a file nor a directory")
    found = [
        p
        for p in root.rglob("*")
        if p.suffix in suffixes and p.is_file() and not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
    ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@dataclass(frozen=True)
class Corpus:
    """Token streams (1-D int32): `train` and `heldout`, each file's tokens followed by EOS; the file counts."""

    train: np.ndarray
    heldout: np.ndarray
    n_train_files: int
    n_heldout_files: int
    source: str


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    max_bytes: int = 4_000_000,
    heldout_every: int = 10,
    tokenizer: TokenizerLike | None = None,
) -> Corpus:
    """Read up to `max_bytes` of text (default source: `stdlib_root()`), files in sorted order; file i goes to the
    held-out split when i % heldout_every == heldout_every - 1. A single file is split by bytes instead: its last
    1 / heldout_every is held out. Raises ValueError for an empty corpus or an empty split."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes={max_bytes} must be >= 1")
    if heldout_every < 2:
        raise ValueError(f"heldout_every={heldout_every} must be >= 2")
    tok = tokenizer if tokenizer is not None else ByteTokenizer()
    root = stdlib_root() if path is None else Path(path)
    files = text_files(root)
    texts, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        total += len(data)
        if data.strip():
            texts.append(data.decode("utf-8", errors="replace"))
    if not texts:
        raise ValueError(f"the corpus {str(root)!r} has no text ({len(files)} file(s) with suffixes {TEXT_SUFFIXES})")
    if len(texts) == 1:
        cut = len(texts[0]) - max(1, len(texts[0]) // heldout_every)
        train_texts, held_texts = [texts[0][:cut]], [texts[0][cut:]]
    else:
        held = [i % heldout_every == heldout_every - 1 for i in range(len(texts))]
        if not any(held):
            held[-1] = True
        train_texts = [t for t, h in zip(texts, held, strict=True) if not h]
        held_texts = [t for t, h in zip(texts, held, strict=True) if h]

    def stream(parts: list[str]) -> np.ndarray:
        ids = [i for t in parts for i in (*tok.encode(t), EOS_ID)]
        return np.asarray(ids, dtype=np.int32)

    return Corpus(stream(train_texts), stream(held_texts), len(train_texts), len(held_texts), str(root))


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequencies of `tokens`, in nats: -sum p log p. A model that ignores context and
    predicts these frequencies scores exactly this cross-entropy on the same tokens."""
    counts = np.bincount(np.asarray(tokens).ravel()).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def sample_windows(stream: np.ndarray, batch_size: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(batch_size, length) windows of `stream` at uniformly random starts."""
    if stream.size < length:
        raise ValueError(f"a stream of {stream.size} tokens is shorter than one window of {length}")
    starts = rng.integers(0, stream.size - length + 1, size=batch_size)
    return np.stack([stream[s : s + length] for s in starts])  # (B, length)


def even_windows(stream: np.ndarray, n: int, length: int) -> np.ndarray:
    """(n, length) windows at evenly spaced starts covering `stream` (for a fixed held-out set)."""
    if stream.size < length:
        raise ValueError(f"a stream of {stream.size} tokens is shorter than one window of {length}")
    starts = np.linspace(0, stream.size - length, n).astype(np.int64)
    return np.stack([stream[s : s + length] for s in starts])  # (n, length)
