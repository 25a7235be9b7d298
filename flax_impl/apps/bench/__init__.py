"""The benchmark commands: `flax-impl bench` (`encoder`: the encoder's forward and train step, Flax against the
PyTorch peers of `peers`; `encoder_sides` runs the Flax side) and `flax-impl bench-decode` (`decode`: cached
generation, Flax against torch_ref and transformers; `decode_sides`); `common` holds what both share: the machine,
the thread policy, timing in rounds, the ceilings, tables and plots, the command loop. Nothing here imports torch
at import time. Method: docs/benchmarks.md."""
