"""One cell, in its own process: the process around the recipe (harness/cell/recipe.py), which
loads, trains, evaluates and records.

main() is what the runner starts: it sets the process up (it dies with the runner, exits on
SIGTERM as Python exits, caps its address space), runs the recipe in this process or launches the
cell's ranks (harness/strategy/launch.py), and sends the runner the cell's result last. The cell
never talks to MLflow: it sends the runner messages as it goes (harness/cell/to_runner.py).
"""

import errno
import functools
import os
import resource
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from harness.cell import recipe
from harness.cell.to_runner import Ranks, ToRunner
from harness.core.errors import disk_full
from harness.core.outcome import Outcome
from harness.core.units import MIB
from harness.model.training_step import Diverged
from harness.strategy import launch, nodes
from harness.strategy import world as ranks


def main(cell_cfg: dict, cache_dir: str, scratch: str, cpu_memory_limit_mib, connection) -> None:
    """Process entry point: run the cell, streaming to the runner, and send its result."""
    # A runner killed outright (SIGKILL, the OOM killer) leaves no cell holding its GPU.
    launch.die_with_parent()
    # The runner stops a cell with SIGTERM (Ctrl-C, a kill, a time limit): exit as Python exits,
    # releasing what the process holds (tqdm's lock, the pipe) rather than leaving it leaked.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # tqdm's default lock is a multiprocessing semaphore; a cell killed outright (SIGKILL, the
    # OOM killer) cannot release it, and the runner would print "leaked semaphore" at exit. The
    # cell's progress bars are its own: a thread lock serves them.
    tqdm.set_lock(threading.RLock())
    if cpu_memory_limit_mib:
        limit = int(cpu_memory_limit_mib * MIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cfg = OmegaConf.create(cell_cfg)
    if cfg.strategy.name == "single":
        outcome = _outcome(lambda: recipe.run(cfg, cache_dir, ToRunner(connection, Path(scratch))))
    else:
        # The first node's ranks stream to its runner, which owns the run; another node's
        # launch only their ranks.
        streams = nodes.node_rank(cfg.strategy) == 0
        outcome = launch.launch(cfg.strategy, Path(scratch), rank_main, cell_cfg, cache_dir,
                                scratch, connection if streams else None)
    connection.send(outcome)


def rank_main(cell_cfg: dict, cache_dir: str, scratch: str, connection) -> Outcome:
    """One rank of a distributed cell: join the ranks, run the cell (the first local rank of the
    node that owns the run streaming to its runner; `connection` is None on another node), and
    return its outcome; a rank that did not end ok reports it and fails, so that the launcher
    stops the others at once."""
    launch.die_with_parent()
    cfg = OmegaConf.create(cell_cfg)
    world = ranks.join(cfg.strategy.timeout_s)
    streams = connection is not None and world.local_rank == 0
    if not streams:  # one progress bar per cell: the streaming rank's
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    log = ToRunner(connection if streams else None, Path(scratch), world)
    # Which process is which rank, on which host: the runner samples those on its own.
    log.send(Ranks(ranks.gather((socket.gethostname(), os.getpid()), world)))
    outcome = _outcome(lambda: recipe.run(cfg, cache_dir, log))
    if outcome.status != "ok":
        launch.report(Path(scratch), world.rank, outcome)
        sys.exit(1)
    ranks.leave(world)
    return outcome


def _outcome(cell) -> Outcome:
    """How `cell()` ended: ok, or diverged, oom or failed with the reason."""
    try:
        cell()
        return Outcome("ok")
    except Diverged as error:
        return Outcome("diverged", str(error))
    except Exception as error:
        last_line = f"{type(error).__name__}: {error}".strip().splitlines()[-1]
        if _out_of_memory(error):
            return Outcome("oom", last_line)
        if disk_full(error):
            return Outcome("failed", disk_full(error))
        traceback.print_exc()
        return Outcome("failed", last_line)


# How running out of host memory (or of runner.cpu_memory_limit_mib's address space) reads when it
# is not a MemoryError: torch's host allocator, and a library that cannot be mapped to import it.
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "Cannot allocate memory",
                          "failed to map segment from shared object")


def _out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(error, OSError) and error.errno == errno.ENOMEM:
        return True
    return any(message in str(error) for message in OUT_OF_MEMORY_MESSAGES)
