"""The one progress display of the applications (`flax-impl bench`, `train`, `parity`).

On a terminal: one status line on stderr, `[#####.....]  P%  Ts  phase  detail` (P: percent done, T: seconds
elapsed), rewritten in place. Elsewhere (a log file, CI): one plain line each time the phase changes, so logs stay
short; the detail is shown only on a terminal. Results go to stdout through `write`, which keeps them apart from
the status line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
LINE_WIDTH = 110


class Progress:
    """A progress bar over `total` units of work.

    Args:
        total: units of work in all (at least 1 is assumed).
        initial: units already done (a resumed run).
        stream: where the status line goes (default sys.stderr); a terminal gets it rewritten in place.
    """

    def __init__(self, total: int, *, initial: int = 0, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done = max(total, 1), min(max(initial, 0), max(total, 1))
        self.start, self.tty = time.perf_counter(), self.stream.isatty()
        self.phase, self.shown = "", False

    def step(self, phase: str, n: int = 1, *, detail: str = "") -> None:
        """Count `n` more units done (0: only announce `phase`) and show the bar.

        Args:
            phase: what is being done; off a terminal, a line is written when it changes.
            n: units finished by this call.
            detail: shown after the phase on a terminal only (e.g. the latest loss).
        """
        self.done = min(self.done + n, self.total)
        frac = self.done / self.total
        filled = int(BAR_WIDTH * frac)
        elapsed = time.perf_counter() - self.start
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * frac:3.0f}% {elapsed:5.0f}s  "
        if self.tty:
            self.stream.write("\r" + (line + phase + ("  " + detail if detail else ""))[:LINE_WIDTH].ljust(LINE_WIDTH))
            self.stream.flush()
            self.shown = True
        elif phase != self.phase:
            self.stream.write(line + phase + "\n")
            self.stream.flush()
        self.phase = phase

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print `text` as a line of its own (to stdout by default), clearing the status line first."""
        if self.tty and self.shown:
            self.stream.write("\r" + " " * LINE_WIDTH + "\r")
            self.stream.flush()
            self.shown = False
        print(text, file=sys.stdout if file is None else file, flush=True)

    def close(self) -> None:
        """End the status line (a terminal keeps the last bar on screen)."""
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False
