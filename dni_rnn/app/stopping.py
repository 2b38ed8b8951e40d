"""Stop a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice).

While a run trains, the two signals only record that a stop was asked for; the run finishes
the update in progress (and a validation under way), writes last.pt at that chunk boundary
and raises `RunInterrupted`, which the CLI turns into a line naming the checkpoint, the
command that resumes it, and the conventional exit status (128 + the signal: 130, 143).
A second signal while it saves only prints that the save is under way; checkpoints are
written atomically in any case (temp file, fsync, rename).

A rank of a torchrun run that loses another (killed, crashed) stops with `RankLost`, one
line, instead of a traceback from the failed collective (`training.train`).
"""
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """The run stopped on a signal after `step` updates; `checkpoint` resumes it."""

    def __init__(self, signum, step, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.status = 128 + int(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} after update {step}; "
                         f"saved {checkpoint}")

    def __reduce__(self):  # through a process pool (compare --jobs)
        return type(self), (self.signum, self.step, self.checkpoint)


class SweepInterrupted(RunInterrupted):
    """A sweep (`dni-rnn compare --jobs`) stopped on a signal: the runs it was training
    (`stopped`, their directories) saved last.pt, and nothing new was started."""

    def __init__(self, signum, stopped):
        self.signum, self.stopped = signum, list(stopped)
        self.step, self.checkpoint = None, None
        self.status = 128 + int(signum)
        saved = ", ".join(str(d / "last.pt") for d in self.stopped) or "no run was under way"
        Exception.__init__(self, f"sweep stopped by {signal.Signals(signum).name}; saved {saved}")

    def __reduce__(self):
        return type(self), (self.signum, self.stopped)


class RankLost(ConnectionError):
    """Under torchrun another process of the run died, and a collective of this one failed.
    A ConnectionError (an OSError), so the command line prints its one line on every rank
    that is left, not only on rank 0 as it does for the errors every rank meets alike."""


class StopSignals:
    """A context manager: while inside, SIGINT and SIGTERM set `signum` instead of killing
    the process. Outside the main thread (where handlers cannot be installed) it does
    nothing and the signals act as usual; a signal the process ignores stays ignored."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if signal.getsignal(s) is signal.SIG_IGN:  # e.g. SIGINT under nohup: keep so
                    continue
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: finishing this update, then saving a "
                  "checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"{signal.Signals(signum).name}: already stopping; the checkpoint is being "
                  "written", file=sys.stderr, flush=True)
