"""Peak memory of a cell's process tree, sampled from the parent while the cell runs.

Host: psutil RSS of the cell's process and its children. GPU: NVML used memory of the same
processes (what nvidia-smi shows, CUDA context included), where an NVIDIA driver is present.
"""

import threading

import psutil

MIB = 1024 * 1024


def _nvml():
    """The NVML module, initialised, or None without an NVIDIA driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver, no library: no GPU figures, never a failed cell
        return None


class PeakSampler:
    """Samples every `interval_s` in a thread until stop(); peaks in MiB."""

    def __init__(self, pid: int, interval_s: float = 0.01):
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.cpu_peak_mib = 0.0
        self.gpu_peak_mib = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = _nvml()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._nvml:
            self._nvml.nvmlShutdown()

    def _run(self):
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return

    def _sample(self):
        try:
            tree = [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = 0
        for process in tree:
            try:
                rss += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.cpu_peak_mib = max(self.cpu_peak_mib, rss / MIB)
        if self._nvml:
            gpu = self._gpu_used({process.pid for process in tree})
            if gpu is not None:
                self.gpu_peak_mib = max(self.gpu_peak_mib or 0.0, gpu / MIB)

    def _gpu_used(self, pids: set) -> int | None:
        nvml = self._nvml
        used = None
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in pids and process.usedGpuMemory is not None:
                    used = (used or 0) + process.usedGpuMemory
        return used
