"""The step loop that `flax-impl train` and `flax-impl finetune` share: timed optimizer steps, the loss history,
held-out evaluation and a checkpoint every `eval_every` steps, a stop on a non-finite loss, and Ctrl-C.

Ctrl-C (`CtrlC`) stops after the current step with a checkpoint of it (exit 130); a second one raises
KeyboardInterrupt at once, the last checkpoint kept (`interrupted_early`). A checkpoint that cannot be written
(a full disk) ends the run with exit 2 and one line naming the previous checkpoint, which stays intact. What
differs per command (how a batch is drawn, the step function, what counts as a bad held-out result, the labels)
comes in as arguments.
"""

from __future__ import annotations

import math
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax_impl.apps import args as shared, checkpoint as ck
from flax_impl.apps.progress import Progress
from flax_impl.checkpoint_dir import step_folders

INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT


class CtrlC:
    """While active (main thread only): the first SIGINT is noted (`requested`) for the loop to stop after its
    step; it also restores Python's handler, so a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.requested, self.previous = False, None

    def _note(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def resume_line(argv: list[str]) -> str:
    """The command line that continues a run: `flax-impl` + `argv` (the one given), with --resume added unless
    it is there, shell-quoted."""
    return shlex.join(["flax-impl", *argv, *([] if "--resume" in argv else ["--resume"])])


def interrupted_early(command: str, out: Path, resume: str) -> int:
    """Report a KeyboardInterrupt that ended the run outside a step (a second Ctrl-C, or one before training).

    Args:
        command: the command's name (`train`, `finetune`), for the message.
        out: the run's output folder.
        resume: the command line that continues the run.

    Returns:
        INTERRUPTED (130), after a line on stderr naming the checkpoint kept (and how to resume) or saying that
        none was written.
    """
    found = step_folders(out / ck.CKPT)
    kept = f"the checkpoint of step {max(found)} is kept" if found else "no checkpoint was written"
    print(f"flax-impl {command}: interrupted: {kept}", file=sys.stderr)
    if found:
        print(f"resume with: {resume}", file=sys.stderr)
    return INTERRUPTED


class StepLoop:
    """One run's model, optimizer, loss history and newest checkpoint, and the loop over its steps.

    Args:
        command: the command's name (`train`, `finetune`), for messages.
        out: the run's output folder (OUT/checkpoint/<step>).
        model: the model being trained.
        optimizer: its `nnx.Optimizer`; its step counter is where the run starts.
        meta: the run's options, written into each checkpoint's metadata with the history.
        ckpt: the checkpoint to resume (`flax_impl.apps.checkpoint.prepare`), or None for a fresh run; restored
            into the model's own arrays (a sharded model keeps its shardings), with its loss history.
        export: also write the safetensors copy of the weights with each checkpoint.
    """

    def __init__(self, command: str, out: Path, model: Any, optimizer: Any, meta: dict[str, Any], ckpt: Any, *,
                 export: bool) -> None:
        from flax_impl.checkpoint import restore_checkpoint

        self.command, self.out, self.model, self.optimizer = command, out, model, optimizer
        self.meta, self.export = meta, export
        self.history: dict[str, list[float]] = {"train_step": [], "train_loss": [], "eval_step": [], "eval_loss": []}
        if ckpt is not None:
            restore_checkpoint(ckpt.path.parent, model, optimizer, step=ckpt.step)
            self.history = ckpt.metadata["history"]
        self.start = int(optimizer.step[...])
        self.saved = (self.start, ckpt.path) if ckpt else (0, None)  # the newest checkpoint: (step, folder)
        self.t_first: float | None = None  # the first step's seconds (it compiles)
        self.tokens, self.t_tokens = 0, 0.0  # tokens and seconds of the steps after the first
        self.reason = ""  # why `run` stopped on a non-finite value

    def save(self, step: int) -> str | None:
        """Checkpoint `step`; None if done, else the one-line error (a full disk), the previous one intact."""
        try:
            path = ck.save_run(self.out, self.model, self.optimizer, step, {**self.meta, "history": self.history},
                               self.export)
        except OSError as e:
            saved = self.saved
            kept = f"the checkpoint of step {saved[0]} is intact ({saved[1]})" if saved[1] else "none was written"
            return f"cannot write the checkpoint of step {step}: {e}; {kept}"
        self.saved = (step, path)
        return None

    def held_out_loss(self, batches: list[Any], sums: Callable[[Any], tuple[Any, Any]]) -> float:
        """Mean held-out loss per weighted token, in eval mode (train mode again after).

        Args:
            batches: the held-out batches.
            sums: one batch -> (sum of weights x CE, sum of weights).

        Returns:
            The total of the first sums over the total of the second (at least 1).
        """
        self.model.eval()
        totals = [sums(b) for b in batches]
        self.model.train()
        return float(sum(s for s, _ in totals) / max(sum(c for _, c in totals), 1.0))

    def run(self, stop: int, *, ctrl_c: CtrlC, batch_at: Callable[[int], dict[str, Any]],
            step_fn: Callable[[Any, Any, dict[str, Any]], dict[str, Any]], eval_every: int,
            held_out: Callable[[int], tuple[float | None, str]], schedule: Callable[[int], Any], label: str,
            idle_rate: str, show: bool = True) -> int:
        """Train from `self.start` to `stop`, evaluating and checkpointing every `eval_every` steps and at `stop`.

        Args:
            stop: the step to stop after.
            ctrl_c: the active `CtrlC`: when it was pressed, the loop stops before the next step.
            batch_at: step index -> that step's batch (a dict with `inputs`, whose size counts the tokens).
            step_fn: (model, optimizer, batch) -> metrics with `loss` and `grad_norm`.
            eval_every: evaluate and checkpoint after every this many steps.
            held_out: the step just done -> (held-out loss, or None without a held-out set; the reason to stop,
                or "" when the results are finite).
            schedule: step index -> learning rate, for the line written at each evaluation.
            label: what the progress display calls the phase (`training`).
            idle_rate: the progress display's rate before the second step has been timed.
            show: whether this process shows the progress display and the evaluation lines.

        Returns:
            0 when every step ran; 1 on a non-finite loss or held-out result (`self.reason` says which and
            when); INTERRUPTED after Ctrl-C; 2 when a checkpoint could not be written (the error printed).
        """
        progress = Progress(stop, initial=self.start) if show else None
        if progress:
            progress.step(f"{label} (the first step compiles)", 0)
        code = 0
        for step in range(self.start, stop):
            if ctrl_c.requested:
                code = INTERRUPTED
                break
            batch = batch_at(step)
            t0 = time.perf_counter()
            metrics = step_fn(self.model, self.optimizer, batch)
            loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
            dt = time.perf_counter() - t0
            if self.t_first is None:
                self.t_first = dt
            else:
                self.tokens, self.t_tokens = self.tokens + batch["inputs"].size, self.t_tokens + dt
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                code, self.reason = 1, f"non-finite loss {loss} (gradient norm {gnorm}) at step {step + 1}"
                break
            self.history["train_step"].append(step + 1)
            self.history["train_loss"].append(loss)
            if progress:
                rate = f"{self.tokens / self.t_tokens:,.0f} tok/s" if self.t_tokens else idle_rate
                progress.step(label, detail=f"step {step + 1}  loss {loss:.4f}  {rate}")
            if (step + 1) % eval_every == 0 or step + 1 == stop:
                eval_loss, reason = held_out(step + 1)
                if reason:
                    code, self.reason = 1, reason
                    break
                if eval_loss is not None:
                    self.history["eval_step"].append(step + 1)
                    self.history["eval_loss"].append(eval_loss)
                if error := self.save(step + 1):
                    if progress:
                        progress.close()
                    return shared.fail(self.command, error)
                held = "" if eval_loss is None else f"  held-out {eval_loss:.4f}"
                if progress:
                    progress.write(f"step {step + 1:>5}  train {loss:.4f}{held} nats/token  "
                                   f"lr {float(schedule(step)):.2e}  |g| {gnorm:.2f}  -> {self.saved[1]}")
        if progress:
            progress.close()
        return code

    def interrupted(self, stop: int, resume: str, *, show: bool = True) -> int:
        """After `run` returned INTERRUPTED: checkpoint the last step done (if newer than the newest checkpoint).

        Args:
            stop: the step the run was to stop after.
            resume: the command line that continues the run.
            show: whether this process prints the report.

        Returns:
            INTERRUPTED (130), after a line on stderr naming the step, the checkpoint and how to resume; 2 when
            the checkpoint could not be written (the error printed).
        """
        history, saved = self.history, self.saved
        done = history["train_step"][-1] if history["train_step"] else self.start
        if done > saved[0] and (error := self.save(done)):
            return shared.fail(self.command, error)
        saved = self.saved
        last = f" (train loss {history['train_loss'][-1]:.4f})" if history["train_loss"] else ""
        where = f"checkpoint {saved[1]}" if saved[1] else "no checkpoint (no step was trained)"
        if show:
            print(f"flax-impl {self.command}: interrupted after step {done} of {stop}{last}: {where}",
                  file=sys.stderr)
            if saved[1]:
                print(f"resume with: {resume}", file=sys.stderr)
        return INTERRUPTED

    def diverged(self, *, show: bool = True) -> int:
        """After `run` returned 1: the one line on stderr (if `show`) naming why and the last good checkpoint.

        Returns:
            1.
        """
        if show:
            print(f"flax-impl {self.command}: stopped: {self.reason}. Lower --lr or raise --warmup. The last good "
                  f"checkpoint is intact: {self.saved[1] or 'none was written'}", file=sys.stderr)
        return 1

    def rate(self) -> float:
        """Tokens per second over the steps after the first (0.0 before the second step)."""
        return self.tokens / self.t_tokens if self.t_tokens else 0.0


def plot_path(option: str | None, out: Path) -> Path | None:
    """Where --plot asks for the loss plot: OUT/loss.png when not given, None for "none" (any case)."""
    return out / "loss.png" if option is None else None if option.lower() == "none" else Path(option)


def plot_history(path: Path, history: dict[str, list[float]], title: str, *, alpha: float,
                 baseline: float | None = None) -> bool:
    """Write the loss plot of a run's history as a PNG: the per-step training loss, the held-out losses (if any)
    and a horizontal `baseline` (the unigram entropy, if given).

    Args:
        path: the PNG to write (its folder is created).
        history: `StepLoop.history`.
        title: the plot's title.
        alpha: the opacity of the per-step training curve.
        baseline: the unigram entropy of the held-out text, drawn as a dashed line; None: no line.

    Returns:
        False (nothing written) when matplotlib is not installed, else True.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["train_step"], history["train_loss"], lw=0.8, alpha=alpha, label="train (per step)")
    if history["eval_step"]:
        ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", label=f"unigram entropy {baseline:.3f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
