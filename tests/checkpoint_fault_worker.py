"""One "process lifetime" of a checkpoint directory's writer, for tests/test_checkpoint_faults.py: see which steps
OUT holds, then save the next one by `flax_impl.checkpoint_dir.write_step` (keeping one step, as `flax-impl
train` does) with the files of a real Orbax step: SOURCE/<step>/ holds what `flax_impl.checkpoint.save_checkpoint`
wrote for that step, less its checksums.json. Run in-process (`lifetime`) or as a real process (`python
checkpoint_fault_worker.py OUT SOURCE`) that FLAX_IMPL_FAULT kills with `os._exit` at a save point.

Only the standard library and flax_impl.checkpoint_dir are imported, so that a process starts in a fraction of a
second; the test reads the steps back with Orbax.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from flax_impl import checkpoint_dir as cd


def lifetime(out: Path, source: Path) -> int:
    """Save the step after the newest one in OUT (1 if none); returns the step saved."""
    steps = cd.step_folders(out)
    step = max(steps) + 1 if steps else 1
    cd.write_step(out, step, lambda folder: shutil.copytree(source / str(step), folder, dirs_exist_ok=True), keep=1)
    return step


if __name__ == "__main__":
    print(lifetime(Path(sys.argv[1]), Path(sys.argv[2])))
