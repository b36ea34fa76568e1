"""The cell's process from the runner's side: how it is started (runner.start_method) and the
head start it gets, the GPU it sees, following what it sends, and the kernel's OOM kills.

`auto` is `spawn` where CUDA is available (a bare interpreter, which can initialise CUDA itself)
and `forkserver` elsewhere: every cell forks from a server that has imported torch and
transformers once. That server can start before the runner has imported them too: the two
imports then run side by side (seconds saved for every single run on a machine with two cores).
"""

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import re
import time
from pathlib import Path

import psutil

from harness.measure.nvml import init_nvml

PRELOADED = ["harness.cell.entry"]  # the forkserver imports this, and all it imports, once


def context(configured: str, cuda: bool):
    """The multiprocessing context that starts cells: `configured` (runner.start_method), with
    `auto` resolved by whether this process has CUDA."""
    method = ("spawn" if cuda else "forkserver") if configured == "auto" else configured
    if multiprocessing.get_start_method(allow_none=True) not in (
            None, *multiprocessing.get_all_start_methods()):
        # In a joblib worker the global start method is loky's own, which a process started by
        # the standard library cannot find; this process starts only cells and their server.
        multiprocessing.set_start_method(method, force=True)
    chosen = multiprocessing.get_context(method)
    if method == "forkserver":
        chosen.set_forkserver_preload(PRELOADED)
    return chosen


def head_start(configured: str) -> None:
    """Start the forkserver now where the cell will fork from it: `forkserver`, or `auto` on a
    machine where NVML finds no GPU (the runner decides by torch.cuda later; where the two
    disagree, the server goes unused). Called before this process imports torch."""
    if configured == "spawn" or (configured == "auto" and _nvml_finds_a_gpu()):
        return
    context(configured, cuda=False)
    multiprocessing.forkserver.ensure_running()


def _nvml_finds_a_gpu() -> bool:
    nvml = init_nvml()
    return nvml is not None and nvml.nvmlDeviceGetCount() > 0


@contextlib.contextmanager
def visible_gpu(gpu: str | None):
    """CUDA_VISIBLE_DEVICES=gpu in this process's environment for the block (a no-op for None)."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def follow(receive, process, handle, every_s: float | None = None, tick=None) -> None:
    """Hand each message of the cell to `handle` until the cell ends, and call `tick` every
    `every_s` seconds meanwhile (the run's heartbeat). Waits on the process too: a killed cell
    sends nothing more."""
    last_tick = time.monotonic()
    while True:
        ready = multiprocessing.connection.wait([receive, process.sentinel],
                                                timeout=every_s if tick else None)
        if tick and time.monotonic() - last_tick >= every_s:
            tick()
            last_tick = time.monotonic()
        if not ready:
            continue
        if receive in ready:
            try:
                handle(receive.recv())
                continue
            except EOFError:  # the cell closed its end: it is exiting
                pass
        break
    process.join()
    while receive.poll():  # sent just before the exit
        try:
            handle(receive.recv())
        except EOFError:
            break


STOP_S = 30.0  # how long a stopped cell may take to stop its ranks before they are killed


def stop(child) -> None:
    """End a cell process that is still running, and every process it started (a distributed
    cell's ranks): SIGTERM, then SIGKILL for whatever has not stopped in STOP_S."""
    if child.is_alive():
        started = descendants(child.pid)
        child.terminate()
        child.join(timeout=STOP_S)
        kill_all([*started, child])
    child.join()


def descendants(pid: int) -> list:
    """The processes `pid` started, and theirs (a distributed cell's launcher and ranks)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(processes) -> None:
    """SIGKILL whichever of these processes (multiprocessing's or psutil's) is still alive."""
    for each in processes:
        with contextlib.suppress(psutil.NoSuchProcess, AttributeError, ProcessLookupError):
            each.kill()


def kernel_oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup
    (cgroup v2 memory.events, v1 memory.oom_control); None where neither can be read."""
    root, own = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")
    if not own.exists():  # not Linux
        return None
    for line in own.read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            folders, name = (root / path.lstrip("/"), root), "memory.events"
        elif "memory" in controllers.split(","):
            folders, name = (root / "memory" / path.lstrip("/"), root / "memory"), \
                "memory.oom_control"
        else:
            continue
        # Inside a container the cgroup's own folder is often mounted as the root.
        for folder in folders:
            if (folder / name).exists():
                found = re.search(r"^oom_kill (\d+)$", (folder / name).read_text(), re.MULTILINE)
                if found:
                    return int(found.group(1))
    return None


def oom_killed(before: int | None) -> bool:
    after = kernel_oom_kills()
    return before is not None and after is not None and after > before
