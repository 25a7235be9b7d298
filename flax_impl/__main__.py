"""`python -m flax_impl` is the `flax-impl` command."""

import sys

from flax_impl.apps.cli import main

sys.exit(main())
