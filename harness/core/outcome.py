"""How a cell ended, said once: the Outcome a cell reports, its runner records and the sweep, the
report and a rerun read back (the run's `status` and `status_reason` tags), and what each status
means everywhere else: the run's MLflow status, whether a rerun skips the cell, and the exit code
of `python -m harness` (harness/core/errors.py adds the codes that are not a cell's).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    """A status of STATUSES and why; a reason starts with the phase it ended in
    (`train: ...`)."""

    status: str
    reason: str = ""

    def __str__(self) -> str:
        return self.status + (f": {self.reason}" if self.reason else "")


@dataclass(frozen=True)
class Status:
    meaning: str
    run_status: str  # the MLflow run's status (FINISHED, FAILED, KILLED)
    finished: bool  # a rerun skips the cell (failed and killed cells run again)
    exit_code: int | None  # None: 128 + the number of the signal that stopped it


STATUSES = {
    "ok": Status("trained, evaluated and recorded", "FINISHED", True, 0),
    "skipped": Status("a sweep's grid point that cannot run, recorded with the reason",
                      "FINISHED", True, 0),
    "failed": Status("the cell failed; the reason says in which phase", "FAILED", False, 3),
    "oom": Status("out of GPU or host memory", "FAILED", True, 4),
    "diverged": Status("a non-finite loss", "FAILED", True, 5),
    "killed": Status("stopped by a signal (Ctrl-C, a kill, a time limit)", "KILLED", False, None),
}
LIVE = ("claimed", "running")  # a run's status while its runner has it
FINISHED = tuple(status for status, meaning in STATUSES.items() if meaning.finished)
