"""A distributed cell's process is the launcher of its ranks: torch's elastic launcher
(torch.distributed.run's agent, in process) starts strategy.nproc_per_node ranks on this node,
which meet through its c10d rendezvous, and watches them. A rank that fails makes the agent stop
the others; a signal to the cell process (the runner's SIGTERM) stops every rank; a rank whose
launcher dies outright (SIGKILL) is killed by the kernel (PR_SET_PDEATHSIG), so that no rank
outlives its cell.

How the cell ended is judged by what each rank reported (harness/cell/entry.py writes a rank's
outcome to RANKS_FOLDER before it fails), not by exit codes alone: a rank can print "terminate
called without an active exception" after finishing correctly.
"""

import ctypes
import dataclasses
import json
import multiprocessing.forkserver
import os
import signal
import uuid
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from harness.core.outcome import Outcome
from harness.strategy import nodes
from harness.strategy.sizes import world_size

RANKS_FOLDER = "ranks"  # under the cell's scratch folder: rank-<n>.json, the launcher's logs
# A cell's status when its ranks' outcomes differ: the most telling first.
SEVERITY = {"oom": 0, "diverged": 1, "failed": 2, "ok": 3}
PR_SET_PDEATHSIG = 1


def launch(strategy_cfg, scratch: Path, entrypoint, *args) -> Outcome:
    """Run `entrypoint(*args)`, which returns a rank's Outcome, on every rank of this node; the
    cell's Outcome."""
    try:
        outcomes = run_ranks(strategy_cfg, scratch, entrypoint, *args)
    except ChildFailedError as error:
        return _failed(error, scratch, world_size(strategy_cfg))
    return min((Outcome(outcome.status, f"rank {rank}: {outcome.reason}" if outcome.reason else "")
                for rank, outcome in outcomes.items()),
               key=lambda outcome: SEVERITY[outcome.status])


def run_ranks(strategy_cfg, scratch: Path, entrypoint, *args, start_method: str | None = None
              ) -> dict:
    """`entrypoint(*args)` on every rank of this node under torch's elastic agent: what each
    returned, by rank; ChildFailedError when one failed (the agent has stopped the others).

    Ranks are forked on CPU (they start at once), which is safe only from a process that has not
    computed yet: a fork inherits OpenMP's thread pool without its threads, and the child's first
    parallel kernel waits for them forever. The cell process only imports before it launches;
    a caller that has computed passes start_method=forkserver or spawn. CUDA needs a fresh
    interpreter (spawn)."""
    if start_method is None:
        start_method = "spawn" if torch.cuda.is_available() else "fork"
    endpoint, rendezvous_configs = nodes.rendezvous(strategy_cfg)
    config = LaunchConfig(
        min_nodes=strategy_cfg.nnodes, max_nodes=strategy_cfg.nnodes,
        nproc_per_node=strategy_cfg.nproc_per_node, run_id=_run_id(strategy_cfg),
        rdzv_backend="c10d", rdzv_endpoint=endpoint, rdzv_configs=rendezvous_configs,
        max_restarts=0, monitor_interval=0.1,
        start_method=start_method,
        logs_specs=DefaultLogsSpecs(log_dir=str(scratch / RANKS_FOLDER / "logs")))
    return elastic_launch(config, entrypoint)(*args)


def _run_id(strategy_cfg) -> str:
    """The rendezvous's id: one node's own; several nodes' the same on each (their address)."""
    if strategy_cfg.nnodes == 1:
        return f"harness-{uuid.uuid4().hex[:8]}"
    return f"harness-{nodes.master_addr(strategy_cfg)}-{strategy_cfg.master_port}"


def report(scratch: Path, rank: int, outcome: Outcome) -> None:
    """A rank's outcome, for the launcher to read once the rank is gone."""
    folder = scratch / RANKS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank-{rank}.json").write_text(json.dumps(dataclasses.asdict(outcome)))


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies outright: a rank when its launcher
    (the cell process) does, a cell when its runner does (or the server it forked from, which
    ends with the runner)."""
    # A process forked from multiprocessing's forkserver keeps the write end of the pipe by
    # which the server learns that its client (the runner) is gone, for children of its own:
    # the server would then end only with this process, and this process only with the server,
    # so that a cell sending nothing (held at a pause, or in a long generation) outlived a
    # runner killed outright. Let go: the server ends with the runner, this process with it.
    alive = multiprocessing.forkserver._forkserver._forkserver_alive_fd
    if alive is not None:
        os.close(alive)
        multiprocessing.forkserver._forkserver._forkserver_alive_fd = None
    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the agent's own shutdown still applies
        return
    if os.getppid() != launcher:  # it died before the request took hold
        os.kill(os.getpid(), signal.SIGKILL)


# How a rank fails once a peer died, a consequence and never the cause: its collective breaks,
# or the agent, stopping the other ranks, sends it SIGTERM first (torch's SignalException).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote process exited", "remote worker", "SignalException")


def _failed(error: ChildFailedError, scratch: Path, world_size: int) -> Outcome:
    """How a cell whose ranks failed ended, by its cause: a rank out of memory; else a rank that
    diverged or failed on its own (not on a collective a dead peer left); else a rank that died
    without a word (a signal: the kernel's OOM killer, a kill); else what the ranks said."""
    reported = {}
    for path in (scratch / RANKS_FOLDER).glob("rank-*.json"):
        outcome = Outcome(**json.loads(path.read_text()))
        rank = int(path.stem.removeprefix("rank-"))
        reported[rank] = Outcome(outcome.status, f"rank {rank}: {outcome.reason}")
    by_severity = sorted(reported.values(), key=lambda outcome: SEVERITY[outcome.status])
    own = [outcome for outcome in by_severity
           if not any(words in outcome.reason for words in PEER_GONE)]
    if own:
        return own[0]
    silent = [rank for rank in range(world_size) if rank not in reported]
    for rank in silent:  # what the launcher saw of it, where it saw it first
        failure = error.failures.get(rank)
        if failure is not None and failure.exitcode < 0:
            return Outcome("failed", f"rank {rank} was killed by {failure.signal_name()} without "
                                     "a result")
    if silent:
        return Outcome("failed", f"rank {silent[0]} ended without a result (killed by a signal, "
                                 "such as the kernel's OOM killer, or exited)")
    return by_severity[0]
