"""`python -m flax_impl` is the `flax-impl` command."""

import sys

from flax_impl.cli import main

sys.exit(main())
