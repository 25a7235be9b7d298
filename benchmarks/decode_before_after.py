"""One side of a before/after comparison of Flax decoding at the real size, for two checkouts of the library.

The model: 30 x 576, 9 / 3 heads, F 1,536, V 49,152, tied head, random weights (the `--size real` model of
`flax-impl bench-decode`), float32 and bfloat16, batch 1 and 8, prompts of 128 random tokens, greedy. First
token = the time of generate(max_new_tokens=1); decode ms/token = (generate(17) - generate(1)) / 16; medians of 3
calls after the two compiling calls. Prints one JSON line (stdout), progress on stderr.

Run it once per checkout, alternating, on the same machine (the checkout is whatever `flax_impl` imports):

    for i in 1 2; do
      PYTHONPATH=/path/to/old python benchmarks/decode_before_after.py > old-$i.json
      PYTHONPATH=/path/to/new python benchmarks/decode_before_after.py > new-$i.json
    done

It uses only names both the old (commit c020210) and the current library have.
"""

import json
import sys
import time

import numpy as np
from flax import nnx

import flax_impl as fi

Model = getattr(fi, "Transformer", None) or fi.TransformerEncoder  # the old name, before the rename
CONFIG = dict(d_model=576, n_heads=9, n_kv_heads=3, n_layers=30, d_ff=1536, vocab_size=49152, dropout=0.0,
              max_len=2048, position="rope", activation="silu", causal=True, norm="rmsnorm", mlp="gated",
              bias=False, norm_eps=1e-5)  # fmt: skip


def timed(model: object, prompts: np.ndarray, n: int) -> tuple[float, np.ndarray]:
    """Seconds of one generate(max_new_tokens=n) call and its tokens (B, n)."""
    start = time.perf_counter()
    tokens = np.asarray(fi.generate(model, prompts, max_new_tokens=n).tokens)
    return time.perf_counter() - start, tokens


def main() -> None:
    out = {"module": fi.__file__, "cells": {}}
    rng = np.random.default_rng(0)
    for dtype in ("float32", "bfloat16"):
        flax_config = fi.FlaxConfig(dtype=dtype, param_dtype=dtype)
        model = Model(fi.TransformerConfig(**CONFIG), flax_config=flax_config, rngs=nnx.Rngs(0))
        model.eval()
        for B in (1, 8):
            prompts = rng.integers(1, CONFIG["vocab_size"], (B, 128)).astype(np.int32)
            first = [timed(model, prompts, 1)[0], timed(model, prompts, 17)[0]]  # each compiles its program
            ones, seventeens = [], []
            for _ in range(3):
                ones.append(timed(model, prompts, 1)[0])
                t, tokens = timed(model, prompts, 17)
                seventeens.append(t)
            t1, t17 = float(np.median(ones)), float(np.median(seventeens))
            cell = {"first_token_ms": 1e3 * t1, "decode_ms_per_token": 1e3 * (t17 - t1) / 16,
                    "first_calls_s": first, "tokens_row0": tokens[0, :8].tolist()}  # fmt: skip
            out["cells"][f"{dtype} B{B}"] = cell
            print(dtype, B, cell, file=sys.stderr, flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
