"""Which GPU a cell gets: one of runner.gpus, held for the whole cell.

Cells that run side by side (hydra/launcher=joblib with one worker per GPU) must never share a
device, or their memory peaks mix. Each runner claims a GPU with an exclusive lock on a file per
GPU (fcntl.flock, released by the kernel even when the runner is killed), and the cell and its
sampler see only that GPU through CUDA_VISIBLE_DEVICES. A runner finding every GPU held waits.
On a cluster (hydra/launcher=slurm) the scheduler already sets CUDA_VISIBLE_DEVICES to the job's
GPU, which is then the only candidate. Read through NVML, so the runner never initialises CUDA.
"""

import contextlib
import fcntl
import os
import time
from pathlib import Path

from harness.core.units import MIB
from harness.measure.nvml import init_nvml, visible_devices

WAIT_S = 2.0  # between two looks for a free GPU


def candidates(gpus) -> list[str]:
    """The GPUs cells may use: runner.gpus (indices or UUIDs) when set, else those in
    CUDA_VISIBLE_DEVICES, else every GPU NVML finds; [] on a machine without one."""
    if gpus is not None:
        return [str(gpu) for gpu in gpus]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [entry.strip() for entry in visible.split(",") if entry.strip()]
    nvml = init_nvml()
    return [] if nvml is None else [str(index) for index in range(nvml.nvmlDeviceGetCount())]


def describe(gpus: list[str]) -> list[dict]:
    """Name and total memory (MiB) of each GPU, by NVML; [] when NVML cannot tell."""
    nvml = init_nvml()
    if nvml is None or not gpus:
        return []
    try:
        return [{"gpu": gpu, "name": nvml.nvmlDeviceGetName(handle),
                 "total_mib": nvml.nvmlDeviceGetMemoryInfo(handle).total / MIB}
                for gpu, handle in zip(gpus, visible_devices(nvml, ",".join(gpus)))]
    except nvml.NVMLError:
        return []


@contextlib.contextmanager
def claim(gpus: list[str], lock_dir: Path, announce=print, count: int = 1):
    """Hold `count` free GPUs of `gpus` (a distributed cell's ranks, one each) until the block
    ends; yields their ids joined by commas, as CUDA_VISIBLE_DEVICES takes them (None when
    `gpus` is empty: nothing to pin). All of them or none: a runner never holds some while it
    waits for the rest, so that two waiting runners cannot hold each other's."""
    if not gpus:
        yield None
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        held = []
        for gpu in gpus:
            lock = open(lock_dir / f"gpu-{gpu}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another cell holds it
                lock.close()
                continue
            held.append((gpu, lock))
            if len(held) == count:
                break
        if len(held) == count:
            try:
                yield ",".join(gpu for gpu, _ in held)
            finally:
                for _, lock in held:
                    lock.close()  # closing the file releases the lock
            return
        for _, lock in held:
            lock.close()
        if not waited:
            announce(f"[harness] fewer than {count} of the GPUs {','.join(gpus)} are free; "
                     "waiting")
            waited = True
        time.sleep(WAIT_S)
