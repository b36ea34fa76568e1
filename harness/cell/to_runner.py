"""What a cell tells its runner, as it happens: the runner owns the MLflow run and records each
message at once (harness/run/record.py), so that nothing finished is lost if the cell dies. The
messages are the records below, sent over the pipe the runner gave the cell, and last the cell's
Outcome (ok, diverged, oom or failed; harness/core/outcome.py).

Under a distributed strategy rank 0 streams everything but the outcome (harness/cell/entry.py
sends it), with the figures every rank measures on its own (allocator peaks, host memory, the
breakdown) gathered as `<name>_rank<n>` beside their maximum under `<name>`.
"""

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core.units import MIB
from harness.measure import host_peak
from harness.strategy import world as ranks


@dataclass(frozen=True)
class Phase:
    """A phase starts: load, train, eval or infer (it splits the memory trace)."""

    name: str
    started: float  # unix time


@dataclass(frozen=True)
class Metrics:
    values: dict[str, float]
    step: int
    timestamp_ms: int  # unix time


@dataclass(frozen=True)
class Tag:
    name: str
    value: str


@dataclass(frozen=True)
class Params:
    """Params known only once the cell has loaded its data (the resolved lengths)."""

    values: dict


@dataclass(frozen=True)
class Datasets:
    """The rows of each split the cell loaded (the run's dataset inputs)."""

    rows: dict[str, int]


@dataclass(frozen=True)
class Artifact:
    """A file or folder the cell wrote under its scratch folder, for the run's `folder`."""

    path: str
    folder: str | None


@dataclass(frozen=True)
class Ranks:
    """A distributed cell's processes, (host, pid) rank by rank: the runner samples their
    memory and tags them (rank_pids)."""

    processes: list[tuple[str, int]]


class ToRunner:
    """The cell's side of the pipe: metrics, tags, artifacts and phases, sent as they happen
    (by rank 0 alone: another rank's has no connection). It also keeps the process's host RSS
    high-water mark per phase (cpu_train_hwm_mib, ...: harness/measure/host_peak.py) and on CUDA
    the allocator's peaks per phase and over all (torch_train_peak_allocated_mib, ...,
    torch_peak_allocated_mib), each rank its own."""

    def __init__(self, connection, scratch: Path, world: ranks.World = ranks.SINGLE):
        self.connection, self.scratch, self.world = connection, scratch, world
        self.device = world.device
        self.peaks = {}

    def send(self, message) -> None:
        if self.connection is not None:
            self.connection.send(message)

    def __call__(self, metrics: dict, step: int = 0) -> None:
        self.send(Metrics({key: float(value) for key, value in metrics.items()}, step,
                          int(time.time() * 1000)))

    def per_rank(self, metrics: dict) -> None:
        """Figures every rank measures for itself: with several ranks, each as
        `<name>_rank<n>` and their maximum as `<name>` (the per-GPU figure a card is compared
        with). A collective: every rank calls it."""
        gathered = ranks.gather(metrics, self.world)
        if len(gathered) == 1:
            self(metrics)
            return
        for rank, figures in enumerate(gathered):
            self({f"{key}_rank{rank}": value for key, value in figures.items()})
        self({key: max(figures[key] for figures in gathered) for key in metrics})

    def tag(self, name: str, value: str) -> None:
        self.send(Tag(name, value))

    def params(self, params: dict) -> None:
        self.send(Params(params))

    def datasets(self, rows: dict) -> None:
        self.send(Datasets(rows))

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.send(Artifact(str(path), folder))

    @contextlib.contextmanager
    def phase(self, name: str):
        self.send(Phase(name, time.time()))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        marked = host_peak.reset()
        yield
        if marked and (high_water := host_peak.mib()) is not None:
            self.peaks[f"cpu_{name}_hwm_mib"] = high_water
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            for kind in ("allocated", "reserved", "active"):
                peak = stats[f"{kind}_bytes.all.peak"] / MIB
                self.peaks[f"torch_{name}_peak_{kind}_mib"] = peak
                overall = f"torch_peak_{kind}_mib"
                self.peaks[overall] = max(self.peaks.get(overall, 0.0), peak)
        self.per_rank(self.peaks)  # now: a cell that dies later keeps this phase's peaks
