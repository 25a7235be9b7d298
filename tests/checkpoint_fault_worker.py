"""One "process lifetime" of `flax-impl train`'s checkpointing, for tests/test_checkpoint_faults.py: recover what
OUT holds, then save the next step. Run in-process (`lifetime`) or as a real process (`python
checkpoint_fault_worker.py OUT FILES`) that FLAX_IMPL_FAULT kills with `os._exit` at a save point.

FILES is a folder of prepared checkpoint contents, `<step>/model.safetensors` and `<step>/train_state.npz`: the
training step itself is not what is tested, only that some complete checkpoint survives every kill.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flax_impl.apps import checkpoint as ck


def lifetime(out: Path, files: dict[int, dict[str, bytes]]) -> int:
    """Recover OUT, then save the step after the recovered one (1 if none); returns the step saved."""
    found = ck.recover(out)
    step = 1 if found is None else int(ck.read_manifest(found)["step"]) + 1
    ck.save_checkpoint(out, files[step], {"step": step})
    return step


def read_files(folder: Path) -> dict[int, dict[str, bytes]]:
    return {int(d.name): {f.name: f.read_bytes() for f in d.iterdir()} for d in folder.iterdir()}


if __name__ == "__main__":
    print(lifetime(Path(sys.argv[1]), read_files(Path(sys.argv[2]))))
