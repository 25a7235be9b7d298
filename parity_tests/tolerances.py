"""The parity suite's tolerances live in flax_impl/tolerances.py (shared with `flax-impl parity`)."""

from flax_impl.tolerances import *  # noqa: F403
