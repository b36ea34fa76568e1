"""What a device can do at most: the yardstick of each run's MFU and of the plan's predicted
step time. A GPU's figures come from conf/peaks/ by the name NVML gives it (datasheet figures);
this machine's CPU is measured once (a matmul per dtype, a large copy, a tiny op) and cached for
the user, since a CPU has no datasheet figure a run could reach.

A device is a dict: name, fp32 / bf16 / fp16 / int8 (dense matmul TFLOP/s, TOPS for int8; None
where it has no units for that dtype), bandwidth_gbs, launch_us, source; and "calibration" where
what its operations achieve is known: measured on it (make calibrate), or, for a GPU not at hand,
carried from the nearest GPU measured (harness/measure/scaling.py).
"""

import glob
import json
import platform
import time
from pathlib import Path

import torch

from harness.core.files import write_whole
from harness.core.options import CONF_DIR
from harness.measure import calibration, scaling

KINDS = scaling.KINDS  # the matmul dtypes a device's peaks name
MATMUL_SIZE = 1024  # large enough for the CPU's matmul kernels to reach their pace
COPY_MIB = 256  # beyond any CPU cache
BENCH_S = 0.5  # per figure
BENCH_VERSION = 1  # a change to the benchmark measures anew
PROJECT = CONF_DIR.parent  # conf.peaks.calibrations' relative patterns are the project's


def of_gpu(peaks_cfg, gpu_name: str | None) -> dict | None:
    """conf/peaks/'s figures for the GPU NVML calls `gpu_name`; None when it is not listed."""
    if gpu_name is None or gpu_name not in peaks_cfg.gpus:
        return None
    figures = peaks_cfg.gpus[gpu_name]
    device = {"name": gpu_name, **{kind: figures.get(kind) for kind in KINDS},
              "bandwidth_gbs": float(figures.bandwidth_gbs),
              "launch_us": float(peaks_cfg.launch_us),
              **{link: figures.get(link) for link in ("link_gbs", "host_gbs")},
              "internode_gbs": peaks_cfg.get("internode_gbs"),
              "source": "conf/peaks/ (datasheet)"}
    # Priced by what a GPU's ops achieved: this GPU's own calibration where one was measured,
    # else the nearest known GPU's, scaled by the two GPUs' peaks (harness/measure/scaling.py).
    folders = [calibration.user_cache(), *(Path(folder) for pattern in peaks_cfg.calibrations
                                           for folder in sorted(glob.glob(str(PROJECT / pattern))))]
    found = scaling.nearest(gpu_name, peaks_cfg.gpus, calibration.known(folders),
                            torch.__version__)
    if found is None:
        return device
    measured_on = peaks_cfg.gpus[found["device"]]
    how = ("calibrated" if found["device"] == gpu_name
           else f"scaled from the calibration of {found['device']}")
    return {**device, "calibration": scaling.scaled(found, measured_on, figures),
            "source": f"conf/peaks/; {how} ({_shown(found['path'])}, torch {found['torch']})"}


def _shown(path: str) -> str:
    """A calibration's file as the plan names it: from the project's folder where it lies in
    it (a committed plan names no machine's folders), else from the home folder."""
    for base, prefix in ((PROJECT, ""), (Path.home(), "~/")):
        if Path(path).is_relative_to(base):
            return prefix + str(Path(path).relative_to(base))
    return path


def of_cpu(cache: Path | None = None) -> dict:
    """This machine's CPU, measured with as many threads as torch uses, once: cached in `cache`
    (default: the user's cache folder, since the figures are the machine's, not a project's)."""
    name = platform.processor() or platform.machine()
    key = f"cpu-v{BENCH_VERSION}-{torch.__version__}-{torch.get_num_threads()}t"
    path = (cache or calibration.user_cache()) / f"{key}.json"
    if path.exists():
        return _calibrated(json.loads(path.read_text()), cache)
    matmul = {kind: _matmul_tflops(dtype) for kind, dtype in
              (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    device = {"name": f"CPU {name} ({torch.get_num_threads()} threads)",
              "fp32": matmul["fp32"], "bf16": matmul["bf16"], "fp16": matmul["bf16"],
              "int8": matmul["fp32"], "bandwidth_gbs": _copy_gbs(),
              "launch_us": _launch_us(), "source": "measured on this machine"}
    write_whole(path, lambda partial: partial.write_text(json.dumps(device)))
    return _calibrated(device, cache)


def _calibrated(device: dict, cache: Path | None) -> dict:
    """The device with this machine's calibration where `make calibrate` measured one (the time
    model then prices each op by it; harness/measure/calibration.py)."""
    found = calibration.load(torch.device("cpu"), cache)
    if found is None:
        return device
    return {**device, "calibration": found,
            "source": f"{device['source']}; calibrated (make calibrate)"}


def _timed(run, minimum_s: float = BENCH_S) -> float:
    """Seconds per call of `run`, the best of repeated calls over about `minimum_s`."""
    run()  # warm-up: the first call allocates and picks kernels
    best, spent = float("inf"), 0.0
    while spent < minimum_s:
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def _matmul_tflops(dtype: torch.dtype) -> float:
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE).to(dtype)
    return 2 * MATMUL_SIZE ** 3 / _timed(lambda: torch.mm(a, b)) / 1e12


def _copy_gbs() -> float:
    source = torch.ones(COPY_MIB * 2 ** 20 // 4)
    target = torch.empty_like(source)
    return 2 * source.nbytes / _timed(lambda: target.copy_(source)) / 1e9  # read and write


def _launch_us() -> float:
    """An op on one element: what the host spends on any op beyond its data."""
    one = torch.ones(1, requires_grad=True)
    calls = 1000

    def run():
        for _ in range(calls):
            one * 2.0

    return _timed(run) / calls * 1e6
