"""The memory sampler: a small process of its own that watches one cell's process tree.

The runner starts it before the cell (`python -m harness.measure.sampler --interval-ms 10 --out
FILE`), waits for its "ready" line, starts the cell, and writes the cell's pid to its stdin. It
samples until its stdin closes (the runner is done, or died), appending one csv row per sample:

  time            unix seconds
  cpu_mib         RSS of the cell's process and its children (psutil)
  gpu_mib         NVML used memory of those processes on every GPU; empty where the driver gives
                  no per-process figures
  gpu_device_mib  NVML used memory of the visible devices, whoever uses it

It imports neither torch nor anything that touches CUDA, so it never creates a CUDA context of
its own, and it costs the cell a few /proc reads every interval.
"""

import argparse
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
# Finding the children reads the stat file of every process on the machine, which costs more than
# all the other reads together; cells rarely start any (data loader workers), so look each second.
CHILDREN_EVERY_S = 1.0


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

    def sample(self) -> dict | None:
        """The row for now, or None once the cell has exited (a zombie holds no memory)."""
        now = time.time()
        if now - self.tree_time >= CHILDREN_EVERY_S:
            self.tree = [self.root, *self.root.children(recursive=True)]
            self.tree_time = now
        rss = 0
        for process in self.tree:
            try:
                rss += process.memory_info().rss
            except psutil.NoSuchProcess:  # a child that ended since the last look
                if process is self.root:
                    return None
        if rss == 0:
            return None
        row = {"time": now, "cpu_mib": rss / MIB, "gpu_mib": None, "gpu_device_mib": None}
        if self.nvml:
            row["gpu_mib"] = self._process_gpu({process.pid for process in self.tree})
            row["gpu_device_mib"] = sum(self.nvml.nvmlDeviceGetMemoryInfo(handle).used
                                        for handle in self.devices) / MIB
        return row

    def _process_gpu(self, pids: set) -> float | None:
        if not self.per_process:
            return None
        used = 0
        try:
            for handle in self.all_devices:
                for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.pid in pids:
                        used += process.usedGpuMemory or 0
        except self.nvml.NVMLError:  # e.g. NotSupported: from now on only device figures
            self.per_process = False
            return None
        return used / MIB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--out", required=True, help="the csv file to write")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; the runner decides when sampling ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    interval_s = args.interval_ms / 1000
    nvml = init_nvml()
    print("ready", flush=True)
    pid = int(sys.stdin.readline())
    sampler = Sampler(pid, nvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
    with open(args.out, "w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS)
        writer.writeheader()
        while True:
            try:
                row = sampler.sample()
            except psutil.NoSuchProcess:  # the cell ended; wait for the runner to say stop
                row = None
            if row:
                writer.writerow(row)
            # Sleep one interval, or stop as soon as the runner closes our stdin.
            if select.select([sys.stdin], [], [], interval_s)[0]:
                break
    if nvml:
        nvml.nvmlShutdown()


if __name__ == "__main__":
    main()
