"""How a run is stopped from outside, and what it records when it is.

Ctrl-C raises KeyboardInterrupt. `kill`, `timeout` and schedulers send SIGTERM; a SLURM job
nearing its time limit gets SIGUSR2 first (submitit asks SLURM for it), then SIGTERM, then
SIGKILL. While a cell runs, `stop_signals()` turns SIGTERM and SIGUSR2 into `Stopped`, which the
runner handles as Ctrl-C: the cell process is stopped, the memory trace so far is recorded, and
the run ends KILLED with status `killed` and the reason, so that a rerun runs the cell again.
"""

import contextlib
import signal
import threading

# The signal: what it means for the run.
REASONS = {signal.SIGTERM: "stopped by SIGTERM (kill, timeout or a scheduler)",
           signal.SIGUSR2: "the job reached its time limit (the scheduler's warning signal "
                           "SIGUSR2; on SLURM, --time)"}


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (see REASONS). A KeyboardInterrupt, so that everything
    that handles Ctrl-C handles it too."""

    def __init__(self, signum: int, previous_handler):
        super().__init__(REASONS[signum])
        self.signum, self.reason = signum, REASONS[signum]
        self.previous_handler = previous_handler

    def pass_on(self) -> None:
        """Let whoever handled the signal before the runner handle it now (submitit requeues a
        preempted job, or ends a timed-out one)."""
        if callable(self.previous_handler):
            self.previous_handler(self.signum, None)


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGUSR2 raise Stopped inside the block (in the main thread, the only one that
    receives signals; elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def stop(signum, frame):
        raise Stopped(signum, previous[signum])

    for signum in REASONS:
        previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
