"""The memory sampler: a small process of its own that watches one cell's process tree.

The runner starts it before the cell (`python -m harness.measure.sampler --interval-ms 10 --out
FILE`), waits for its "ready" line, starts the cell, and writes the cell's pid to its stdin. It
samples until its stdin closes (the runner is done, or died), appending one csv row per sample:

  time            unix seconds
  cpu_mib         RSS of the cell's process and its children (psutil)
  gpu_mib         NVML used memory of those processes on every GPU; empty where the driver gives
                  no per-process figures
  gpu_device_mib  NVML used memory of the visible devices, whoever uses it

A distributed cell's runner then writes a line `ranks RANK:PID RANK:PID ...` (the ranks on this
host); from then on a second csv beside the first (RANKS_SUFFIX) holds each rank's own figures
in the same rows: time, cpu_mib_rank<n> (RSS of the rank's process tree), gpu_mib_rank<n> (NVML
used memory of those processes, on whichever GPU).

It imports neither torch nor anything that touches CUDA, so it never creates a CUDA context of
its own, and it costs the cell one /proc read per watched process every interval.
"""

import argparse
import contextlib
import csv
import os
import select
import signal
import sys
import time

import psutil

from harness.core.units import MIB
from harness.measure.nvml import init_nvml, visible_devices

FIELDS = ("time", "cpu_mib", "gpu_mib", "gpu_device_mib")
RANKS_SUFFIX = ".ranks.csv"  # sampler.csv -> sampler.csv.ranks.csv
# Finding the children reads the stat file of every process on the machine, which costs more than
# all the other reads together; cells rarely start any (data loader workers), so look each second.
CHILDREN_EVERY_S = 1.0
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Sampler:
    """One call of sample() reads the memory of `pid`'s process tree now, in MiB."""

    def __init__(self, pid: int, nvml=None, cuda_visible_devices: str | None = None):
        self.root = psutil.Process(pid)
        self.tree = [self.root]
        self.tree_time = 0.0
        self.nvml = nvml
        self.devices = visible_devices(nvml, cuda_visible_devices) if nvml else []
        # Every GPU, for the per-process figures: a pid is a pid on whichever device it uses.
        self.all_devices = visible_devices(nvml, None) if nvml else []
        self.per_process = bool(nvml)
        self.ranks = {}  # each rank's process tree, once the runner has named them
        self.resident = ResidentMemory()

    def watch_ranks(self, pids: dict) -> list[str]:
        """Sample each rank's process tree too ({rank: pid}); the columns its rows gain."""
        self.ranks = {rank: [psutil.Process(pid)] for rank, pid in pids.items()}
        self.tree_time = 0.0  # look for their children at the next sample
        return ["time", *(f"{kind}_mib_rank{rank}" for kind in ("cpu", "gpu") for rank in pids)]

    def sample(self) -> dict | None:
        """The row for now, or None once the cell has exited (a zombie holds no memory)."""
        now = time.time()
        if now - self.tree_time >= CHILDREN_EVERY_S:
            self.tree = [self.root, *self.root.children(recursive=True)]
            self.ranks = {rank: [tree[0], *_children(tree[0])]
                          for rank, tree in self.ranks.items()}
            self.tree_time = now
            self.resident.keep([*self.tree, *(process for tree in self.ranks.values()
                                              for process in tree)])
        rss = self.resident.of(self.tree)
        if rss is None or rss == 0:
            return None
        row = {"time": now, "cpu_mib": rss / MIB, "gpu_mib": None, "gpu_device_mib": None}
        used = self._process_gpu()
        if self.nvml:
            row["gpu_mib"] = None if used is None else sum(
                used.get(process.pid, 0) for process in self.tree) / MIB
            row["gpu_device_mib"] = sum(self.nvml.nvmlDeviceGetMemoryInfo(handle).used
                                        for handle in self.devices) / MIB
        for rank, tree in self.ranks.items():
            row[f"cpu_mib_rank{rank}"] = (self.resident.of(tree) or 0) / MIB
            if used is not None:
                row[f"gpu_mib_rank{rank}"] = sum(used.get(process.pid, 0)
                                                 for process in tree) / MIB
        return row

    def _process_gpu(self) -> dict | None:
        """Bytes of GPU memory by pid, over every GPU; None without per-process figures."""
        if not self.per_process:
            return None
        used = {}
        try:
            for handle in self.all_devices:
                for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    used[process.pid] = used.get(process.pid, 0) + (process.usedGpuMemory or 0)
        except self.nvml.NVMLError:  # e.g. NotSupported: from now on only device figures
            self.per_process = False
            return None
        return used


def _children(process: psutil.Process) -> list:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


class ResidentMemory:
    """The RSS of processes, as psutil's memory_info().rss gives it (/proc/PID/statm's resident
    pages), read through a file kept open per process: psutil opens, reads and closes the file
    on each call, which cost a sampler woken 100 times a second a third of its CPU (make bench:
    1.5 % of a core before, 0.95 % after), and on a machine whose cores all train, that is the
    cell's time."""

    def __init__(self):
        self.files = {}  # pid: an open /proc/PID/statm; None where there is none (not Linux)

    def of(self, tree: list) -> int | None:
        """RSS of these processes in bytes; None once the first (the tree's root) has gone."""
        rss = 0
        for process in tree:
            try:
                rss += self._rss(process)
            except (psutil.NoSuchProcess, ProcessLookupError):  # a child that ended
                if process is tree[0]:
                    return None
        return rss

    def keep(self, processes) -> None:
        """Close the files of the processes no longer watched."""
        for pid in self.files.keys() - {process.pid for process in processes}:
            self._close(pid)

    def _rss(self, process: psutil.Process) -> int:
        if process.pid not in self.files:
            try:
                self.files[process.pid] = os.open(f"/proc/{process.pid}/statm", os.O_RDONLY)
            except FileNotFoundError:  # no such process, or no /proc: ask psutil
                self.files[process.pid] = None
        statm = self.files[process.pid]
        if statm is None:
            return process.memory_info().rss
        return int(os.pread(statm, 256, 0).split()[1]) * PAGE_BYTES

    def _close(self, pid: int) -> None:
        statm = self.files.pop(pid, None)
        if statm is not None:
            os.close(statm)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--out", required=True, help="the csv file to write")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the runner decides when sampling ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The training's threads come first where cores are few: a sample a few milliseconds late
    # moves no peak, a training step that waits for the sampler does.
    os.nice(10)
    interval_s = args.interval_ms / 1000
    nvml = init_nvml()
    print("ready", flush=True)
    pid = int(sys.stdin.readline())
    sampler = Sampler(pid, nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
    with contextlib.ExitStack() as files:
        writer = csv.DictWriter(files.enter_context(open(args.out, "w", newline="")), FIELDS,
                                extrasaction="ignore")
        writer.writeheader()
        per_rank = None
        while True:
            try:
                row = sampler.sample()
            except psutil.NoSuchProcess:  # the cell ended; wait for the runner to say stop
                row = None
            if row:
                writer.writerow(row)
                if per_rank:
                    per_rank.writerow(row)
            # Sleep one interval, or read the runner's next line: the ranks, or the end of our
            # stdin (stop).
            if select.select([sys.stdin], [], [], interval_s)[0]:
                line = sys.stdin.readline()
                if not line.startswith("ranks "):
                    break
                columns = sampler.watch_ranks({int(rank): int(pid) for rank, pid in (
                    pair.split(":") for pair in line.split()[1:])})
                per_rank = csv.DictWriter(files.enter_context(
                    open(args.out + RANKS_SUFFIX, "w", newline="")), columns,
                    extrasaction="ignore")
                per_rank.writeheader()
    if nvml:
        nvml.nvmlShutdown()


if __name__ == "__main__":
    main()
