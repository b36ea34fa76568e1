"""The checks before a cell runs, each made once, and handed down to the cell's runner.

A sweep makes them for all its cells before the first one starts: its plan validates every cell,
finds why a combination cannot run and which cells a run in the store finished already, in one
read of the store (harness/sweep/plan.py); then this machine's checks (CUDA, the hub) for them all
(harness/sweep/progress.py). It writes what it found into its folder (checks.json), where each
cell's runner finds its own, whichever launcher started it (the basic one, a joblib worker, a
SLURM job): the runner asks none of it again. A job on another host than the sweep makes the
machine's checks again there, since those hold for one machine. A single run is validated by
`python -m harness` and checked by its runner, once each.

This module stays light (no torch, no MLflow): `python -m harness` reads a sweep's checks before
it decides whether to validate.
"""

import json
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.config import hub, identity, validation
from harness.core.files import write_whole

FILE = "checks.json"


@dataclass(frozen=True)
class Checked:
    """What the checks found for one grid point of a sweep (or one run)."""

    fingerprint: str
    invalid: str | None = None  # why the combination cannot run anywhere
    machine: str | None = None  # why the machine of `host` cannot run it
    host: str | None = None  # where the machine's checks were made; None: not yet
    store_asked: bool = False  # whether the store was asked for `done`
    done: dict | None = None  # {"status", "run_id"}: the run that finished this cell already
    same_as: int | None = None  # the grid point (from 1) that runs this cell, where another does

    @property
    def reason(self) -> str | None:
        """Why the cell does not run here (a sweep records it as skipped), or None."""
        return self.invalid or self.machine


def of_cell(cfg: DictConfig) -> Checked:
    """The checks of a validated cell that need nothing but its config."""
    return Checked(identity.fingerprint(identity.cell_config(cfg)),
                   invalid=validation.invalid_cell_reason(cfg))


def done(run) -> dict | None:
    """What `done` holds for a finished run (a row of harness/tracking/runs.py's table)."""
    return None if run is None else {"status": run["tags.status"], "run_id": run["run_id"]}


def on_this_machine(cfgs: list[DictConfig], checked: list[Checked],
                    cuda: bool) -> list[Checked]:
    """`checked` with this machine's checks made where they were made on no host or another:
    ConfigError where the machine cannot run them at all (validation.check_machine), why it
    cannot run each one (`machine`), and ConfigError where a cell that runs needs the hub and the
    hub does not answer (asked once for them all)."""
    host = socket.gethostname()
    due = [number for number, found in enumerate(checked) if found.host != host]
    for number in due:
        validation.check_machine(cfgs[number], cuda)
    machine = {number: validation.machine_reason(cfgs[number], cuda) for number in due}
    hub.check([cfgs[number] for number in due
               if not (checked[number].invalid or machine[number])])
    return [replace(found, machine=machine[number], host=host) if number in machine else found
            for number, found in enumerate(checked)]


def save(folder: Path, checked: list[Checked]) -> None:
    """Hand a sweep's checks to its cells, one per grid point, in the sweep's order."""
    write_whole(folder / FILE, lambda path: path.write_text(
        json.dumps([asdict(found) for found in checked], indent=1)))


def forget(folder: Path) -> None:
    """A sweep without a plan leaves no checks of an earlier sweep in its folder."""
    (folder / FILE).unlink(missing_ok=True)


def planned(cfg: DictConfig) -> Checked | None:
    """This job's checks where its sweep made them: the entry of its job number in the sweep
    folder's checks.json, when it is the same cell; else None (a single run, a sweeper without a
    plan)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    path = Path(HydraConfig.get().sweep.dir) / FILE
    if not path.exists():
        return None
    every = json.loads(path.read_text())
    number = HydraConfig.get().job.num
    if not 0 <= number < len(every):
        return None
    found = Checked(**every[number])
    return found if found.fingerprint == identity.fingerprint(identity.cell_config(cfg)) else None
