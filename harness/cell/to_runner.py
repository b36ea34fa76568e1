"""What a cell tells its runner, as it happens: the runner owns the MLflow run and records each
message at once, so that nothing finished is lost if the cell dies. The messages, tuples over the
pipe the runner gave the cell:

  ("phase", name, unix time)               load, train, eval, infer start (splits the memory
                                           trace)
  ("metrics", {name: value}, step, unix ms)
  ("tag", name, value)
  ("params", {name: value})                params known only once the cell has loaded its data
  ("datasets", {split: rows})              the splits it loaded (the run's dataset inputs)
  ("artifact", local path, artifact folder) a file or folder the cell wrote under its scratch
  ("ranks", [(host, pid), ...])            a distributed cell's processes, rank by rank (the
                                           runner samples their memory)
  ("result", status, reason)               last: ok, diverged, oom or failed

Under a distributed strategy rank 0 streams everything but the result (harness/cell/entry.py
sends it), with the figures every rank measures on its own (allocator peaks, host memory, the
breakdown) gathered as `<name>_rank<n>` beside their maximum under `<name>`.
"""

import contextlib
import time
from pathlib import Path

import torch

from harness.core.units import MIB
from harness.strategy import world as ranks


class ToRunner:
    """The cell's side of the pipe: metrics, tags, artifacts and phases, sent as they happen
    (by rank 0 alone: another rank's has no connection). On CUDA it also keeps the allocator's
    peaks per phase and over all (torch_train_peak_allocated_mib, ..., torch_peak_allocated_mib),
    each rank its own."""

    def __init__(self, connection, scratch: Path, world: ranks.World = ranks.SINGLE):
        self.connection, self.scratch, self.world = connection, scratch, world
        self.device = world.device
        self.peaks = {}

    def send(self, *message) -> None:
        if self.connection is not None:
            self.connection.send(message)

    def __call__(self, metrics: dict, step: int = 0) -> None:
        self.send("metrics", {key: float(value) for key, value in metrics.items()}, step,
                  int(time.time() * 1000))

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
        self.send("tag", name, value)

    def params(self, params: dict) -> None:
        self.send("params", params)

    def datasets(self, rows: dict) -> None:
        self.send("datasets", rows)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.send("artifact", str(path), folder)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.send("phase", name, time.time())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.device.type == "cuda":
            stats = torch.cuda.memory_stats(self.device)
            for kind in ("allocated", "reserved", "active"):
                peak = stats[f"{kind}_bytes.all.peak"] / MIB
                self.peaks[f"torch_{name}_peak_{kind}_mib"] = peak
                overall = f"torch_peak_{kind}_mib"
                self.peaks[overall] = max(self.peaks.get(overall, 0.0), peak)
            self.per_rank(self.peaks)  # now: a cell that dies later keeps this phase's peaks
