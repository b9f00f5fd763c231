"""How a run stops: every way out says in one line what is safe on disk and which command continues.

* Stop signals during training (SIGTERM, SIGUSR2: SLURM's preemption and pre-timeout; SIGINT: Ctrl-C) are
  remembered instead of killing the process mid-step: the loop finishes the step, writes a checkpoint and
  calls `Signals.stop`, which names the checkpoint and the command that continues the run, then exits
  (SIGTERM/SIGUSR2 through their previous handler, e.g. submitit's requeue; Ctrl-C with 130).
* A second Ctrl-C does not wait: `Interrupted` is raised where the program is, and the run stops as a Ctrl-C
  anywhere else does (model loading, SFT, sampling, evaluation, saving): `interrupted()` is its one line.
* A failed write (engine/rundir.py `WriteFailed`) is completed by `on_disk()`: the last good checkpoint.
"""
from __future__ import annotations

import signal
from pathlib import Path

from midpo_cli import console
from midpo_cli.engine import checkpoint

STOP_SIGNALS = ("SIGUSR2", "SIGTERM", "SIGINT")
EXIT_INTERRUPTED = 128 + signal.SIGINT                                     # 130, what a shell reports for Ctrl-C


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C while the first one's checkpoint is pending: stop now, without it."""


class Signals:
    """Remember STOP_SIGNALS instead of dying mid-step; the loop checkpoints, then calls `stop`."""

    def __init__(self):
        self.got, self.previous = 0, {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:   # e.g. nohup, `cmd &`
                    self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        if signum == signal.SIGINT and self.got == signal.SIGINT:
            raise Interrupted("a second Ctrl-C stops at once: no checkpoint of this step was written")
        self.got = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():                        # once: `stop` may have been first
            signal.signal(sig, handler)
        self.previous = {}

    def stop(self, step: int, ckpt: str | None, rerun: str) -> None:
        """Say where the run stopped and how to continue it, then exit. Ctrl-C exits 130 (its previous handler
        would only raise KeyboardInterrupt); the others do what they would have done (submitit: requeue the
        job and exit)."""
        name = "Ctrl-C" if self.got == signal.SIGINT else signal.Signals(self.got).name
        console.stopped(f"{name} at step {step}: checkpoint {ckpt} written; the command that continues the run: "
                        f"{rerun or 'the same command with hydra.run.dir set to this run directory'}")
        handler, caught_int = self.previous.get(self.got), signal.SIGINT in self.previous
        self.__exit__()
        if self.got == signal.SIGINT and caught_int:       # stopped and said so: a Ctrl-C repeated on the way out
            signal.signal(signal.SIGINT, signal.SIG_IGN)   # changes nothing (the caller, e.g. `main`, restores it)
        if self.got != signal.SIGINT and callable(handler):
            handler(self.got, None)
        raise SystemExit(128 + self.got)


def on_disk(run_dir: Path | None, rerun: str | None) -> str:
    """What a stopped or failed run leaves to continue from: its last good checkpoint and the command."""
    if run_dir is None:
        return "the run had not started"
    ckpt = checkpoint.latest(run_dir)
    if ckpt is not None:
        return f"last good checkpoint: {ckpt}" + (f"; the command that continues the run: {rerun}" if rerun else "")
    return ("no checkpoint was written, so a rerun starts over (cache entries already built are reused)"
            + (f": {rerun}" if rerun else ""))


def interrupted(e: KeyboardInterrupt, run_dir: Path | None, rerun: str | None) -> str:
    """The one line of a Ctrl-C outside the training loop's own stop (or a second one inside it)."""
    if run_dir is None:
        return "Ctrl-C before the run directory was claimed: nothing was written"
    return f"{e if isinstance(e, Interrupted) else 'Ctrl-C'}; {on_disk(run_dir, rerun)}"
