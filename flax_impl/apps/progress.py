"""The one progress display of the applications (`flax-impl bench`, `train`, `parity`).

On a terminal: one status line on stderr, `[#####.....]  P%  Ts  phase  detail` (P: percent done, T: seconds
elapsed), rewritten in place. Elsewhere (a log file, CI): the same line as a plain line of its own (no carriage
return) each time the phase changes, and at most every `every` seconds while it does not, so that a log shows
steady progress and stays short. Results go to stdout through `write`, which keeps them apart from the status
line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

BAR_WIDTH = 24
LINE_WIDTH = 110
LOG_EVERY = 10.0  # seconds between two lines of one phase off a terminal

_interrupted = False  # a SIGINT arrived while `interruptible` was active


def _note_sigint(signum: int, frame: object) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
    """Ctrl-C that cannot be lost: while active, a SIGINT raises KeyboardInterrupt as Python's own handler does
    and is also noted, because a raise that lands in a callback whose exceptions Python ignores (a garbage
    collection callback, a finalizer: JAX runs some) vanishes; `check_interrupted` (called by every
    `Progress.step`, and by the commands once their work is done) raises it again, and Python's "Exception
    ignored" report of the lost one is not printed. Outside the main thread it does nothing (signals go to the
    main thread only).

    Yields:
        A function that says whether a SIGINT arrived while the context was active (usable after it ends).
    """
    global _interrupted
    _interrupted = False
    seen = [False]
    try:
        previous = signal.signal(signal.SIGINT, _note_sigint)
    except ValueError:  # not the main thread
        yield lambda: False
        return
    hook = sys.unraisablehook

    def quiet(unraisable: Any) -> None:  # the lost KeyboardInterrupt is noted: no "Exception ignored" traceback
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield lambda: seen[0] or _interrupted
    finally:
        seen[0] = _interrupted
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        _interrupted = False


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a SIGINT was noted by `interruptible` (see there)."""
    if _interrupted:
        raise KeyboardInterrupt


class Progress:
    """A progress bar over `total` units of work.

    Args:
        total: units of work in all (at least 1 is assumed).
        initial: units already done (a resumed run).
        stream: where the status line goes (default sys.stderr); a terminal gets it rewritten in place.
        every: off a terminal, the most seconds between two lines of the same phase.
    """

    def __init__(self, total: int, *, initial: int = 0, stream: TextIO | None = None, every: float = LOG_EVERY):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done = max(total, 1), min(max(initial, 0), max(total, 1))
        self.start, self.tty = time.perf_counter(), self.stream.isatty()
        self.phase, self.shown, self.every, self.logged = "", False, every, self.start

    def step(self, phase: str, n: int = 1, *, detail: str = "") -> None:
        """Count `n` more units done (0: only announce `phase`) and show the bar.

        Args:
            phase: what is being done; off a terminal, a line is written when it changes.
            n: units finished by this call.
            detail: shown after the phase (e.g. the latest loss).

        Raises:
            KeyboardInterrupt: a Ctrl-C was noted and its first raise was lost (`interruptible`).
        """
        check_interrupted()
        self.done = min(self.done + n, self.total)
        frac = self.done / self.total
        filled = int(BAR_WIDTH * frac)
        now = time.perf_counter()
        line = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {100 * frac:3.0f}% {now - self.start:5.0f}s  "
        line += phase + ("  " + detail if detail else "")
        if self.tty:
            self.stream.write("\r" + line[:LINE_WIDTH].ljust(LINE_WIDTH))
            self.stream.flush()
            self.shown = True
        elif phase != self.phase or now - self.logged >= self.every:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.logged = now
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
