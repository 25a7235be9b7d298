"""The applications: the `flax-impl` command (`parity`, `bench`, `train`) and what only they need.

Apart from the library on purpose: these modules may import argparse, torch and torch_ref (the twins); the
library (`flax_impl.*` outside this package) imports none of them.
"""
