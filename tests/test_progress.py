"""The applications' progress display (flax_impl.apps.progress): rewritten in place on a terminal, plain lines at a
steady interval in a log."""

from __future__ import annotations

import io
import signal
import sys

import pytest

from flax_impl.apps import progress as progress_module
from flax_impl.apps.progress import Progress, check_interrupted, interruptible


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock(monkeypatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    return now


def test_a_log_gets_plain_lines_when_the_phase_changes_and_every_interval(monkeypatch):
    now, log = _clock(monkeypatch), io.StringIO()
    bar = Progress(100, stream=log, every=10.0)
    bar.step("compiling", 0)
    for i in range(1, 31):  # one step a second
        now[0] += 1.0
        bar.step("training", detail=f"step {i}")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    ends = ["0s  compiling", "1s  training  step 1", "11s  training  step 11", "21s  training  step 21"]
    assert len(lines) == len(ends) and all(line.endswith(end) for line, end in zip(lines, ends, strict=True))
    assert lines[-1].startswith("[#####...................]  21%    21s  ")  # 24 x 0.21 -> 5 of 24 filled


def test_a_terminal_gets_one_line_rewritten_in_place(monkeypatch, capsys):
    now, term = _clock(monkeypatch), Terminal()
    bar = Progress(4, stream=term, every=10.0)
    for i in range(4):
        now[0] += 30.0
        bar.step("training", detail=f"step {i + 1}")
    bar.write("a result")
    bar.close()
    text = term.getvalue()
    assert text.count("\r") == 4 + 2 and text.count("\n") == 0  # 4 bars, then cleared before the result
    assert "step 4" in text and capsys.readouterr().out == "a result\n"


def test_a_ctrl_c_lost_in_a_callback_is_raised_at_the_next_step(monkeypatch):
    """A SIGINT whose KeyboardInterrupt lands in a callback Python ignores exceptions of (here `__del__`; in the
    commands JAX's garbage-collection callback) is noted, and the next progress step raises it."""

    class Finalised:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)  # the handler runs here; __del__ swallows its KeyboardInterrupt

    lost = []
    monkeypatch.setattr(sys, "unraisablehook", lost.append)  # where Python sends what __del__ raises
    before = signal.getsignal(signal.SIGINT)
    with interruptible() as interrupted:
        assert not interrupted()
        Finalised()  # dropped at once: the raise is lost, and not reported as "Exception ignored"
        assert lost == []
        sys.unraisablehook(type("U", (), {"exc_value": ValueError("x")})())  # others are still reported
        assert [str(u.exc_value) for u in lost] == ["x"]
        with pytest.raises(KeyboardInterrupt):
            Progress(2, stream=io.StringIO()).step("next phase")
    assert signal.getsignal(signal.SIGINT) is before
    assert interrupted()  # still known after the context, for the command's exit
    check_interrupted()  # cleared on exit: nothing raised


def test_a_plain_ctrl_c_still_raises_at_once():
    with interruptible(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
