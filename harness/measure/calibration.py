"""What this device's operations achieve, measured: the time model's calibration (`make
calibrate`; harness/estimate/timing.py uses it where it exists, the device's peaks where not).

A peak (harness/measure/peaks.py: a 1024^3 matmul, a 256 MiB copy) is what the largest operations
reach. A training step's operations are smaller, and their pace depends on their size: a
64 x 512 x 512 matmul runs far below the peak, an elementwise op on a tensor that fits in cache
runs above the copy's bandwidth, and the smallest ops cost only the host's time to dispatch them
(Python, the dispatcher, autograd's bookkeeping). So calibration measures curves, as Habitat
(USENIX ATC '21) measures operations:

  matmul   seconds per matmul by its FLOPs, per dtype (fp32, bf16; on a GPU fp16 too), square
           sizes 16 to 1024 (on a GPU to 8192: below that its kernels hide behind their dispatch);
  memory   seconds per elementwise op (an add into a third tensor) by the bytes it moves,
           1 KiB to 256 MiB;
  random   seconds per dropout (random numbers drawn for a mask) by the bytes it moves;
  op_us    the host's time for an op on one element, with autograd recording.

Each is the best of repeated passes (a machine's other load only slows it down) over operands
that cycle through more memory than the caches hold: in a step, the ops between two uses of a
tensor evict it, so a figure taken on operands kept hot would be faster than any step's op.
The figures are cached per device, torch version and thread count in the user's cache folder
(they are the machine's, not a project's); `make calibrate` measures anew. About 30 s on two CPU
cores. A GPU's calibration also lets the plan price a GPU that is not at hand (harness/measure/
scaling.py): `known` finds those measured here and those `make gpu-check` committed.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from harness.core.files import write_whole

VERSION = 2  # a change to what is measured measures anew
MATMUL_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# A GPU runs a 1024-cube matmul in microseconds, about its dispatch's time: its curve goes on to
# sizes its kernels take longer than that, as a step's larger matmuls do.
GPU_MATMUL_SIZES = MATMUL_SIZES + (2048, 4096, 8192)
MEMORY_BYTES = tuple(4 ** power * 1024 for power in range(0, 10))  # 1 KiB x 4^k up to 256 MiB
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GPU_DTYPES = {**DTYPES, "fp16": torch.float16}  # a CPU's fp16 matmuls are no cell's
FIGURE_S = 0.25  # per figure: enough repeats for a best time
# Operands cycled through per figure, in all: beyond a server CPU's last-level cache.
WORKING_SET, MAX_COPIES = 96 * 2**20, 64


def path(device: torch.device | str, cache: Path | None = None) -> Path:
    """Where a device's calibration lies (the device, or its name as NVML or this module gives
    it): keyed by its name, torch's version and threads."""
    name = device if isinstance(device, str) else _device_name(device)
    key = "-".join(["calibration", f"v{VERSION}", name, torch.__version__,
                    f"{torch.get_num_threads()}t"])
    safe = "".join(char if char.isalnum() or char in ".-_" else "_" for char in key)
    return (cache or user_cache()) / f"{safe}.json"


def user_cache() -> Path:
    """The user's cache folder for what is measured of this machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harness" / "peaks"


def load(device: torch.device | str, cache: Path | None = None) -> dict | None:
    """The calibration measured on this device (or one of this name) before, or None (then the
    time model uses the device's peaks)."""
    found = path(device, cache)
    return json.loads(found.read_text()) if found.exists() else None


def known(folders: list[Path]) -> list[dict]:
    """The GPU calibrations in `folders` (of any torch version), each with "path": where it
    lies. A CPU's are left out: its ops run one after another, a GPU's overlap their dispatch."""
    found = []
    for folder in folders:
        for candidate in sorted(Path(folder).glob(f"calibration-v{VERSION}-*.json")):
            measured = json.loads(candidate.read_text())
            if not measured.get("synchronous", True):
                found.append({**measured, "path": str(candidate)})
    return found


def measure(device: torch.device, sizes=None, memory_bytes=MEMORY_BYTES,
            figure_s: float = FIGURE_S) -> dict:
    """The curves of this device (see the module's docstring); `sizes` of the matmuls, by
    default the device's."""
    on_gpu = device.type == "cuda"
    sizes = sizes or (GPU_MATMUL_SIZES if on_gpu else MATMUL_SIZES)
    matmul = {}
    for kind, dtype in (GPU_DTYPES if on_gpu else DTYPES).items():
        matmul[kind] = []
        for size in sizes:
            pairs = [[torch.randn(size, size, device=device).to(dtype) for _ in range(2)]
                     for _ in range(copies(2 * size * size * dtype.itemsize))]
            matmul[kind].append([2 * size ** 3, timed(
                [lambda a=a, b=b: torch.mm(a, b) for a, b in pairs], device, figure_s)])
    memory = []
    for moved in memory_bytes:
        elements = max(1, moved // 12)  # two float32 inputs read, one written
        sets = [[torch.ones(elements, device=device) for _ in range(3)]
                for _ in range(copies(12 * elements))]
        memory.append([12 * elements, timed(
            [lambda a=a, b=b, out=out: torch.add(a, b, out=out) for a, b, out in sets], device,
            figure_s)])
    random = []
    for moved in memory_bytes:
        elements = max(1, moved // 9)  # float32 in and out, a boolean mask
        inputs = [torch.ones(elements, device=device) for _ in range(copies(9 * elements))]
        random.append([9 * elements, timed(
            [lambda x=x: torch.native_dropout(x, 0.1, True) for x in inputs], device, figure_s)])
    one = torch.ones(1, device=device, requires_grad=True)
    return {"device": _device_name(device), "matmul": matmul, "memory": memory, "random": random,
            "op_us": timed([lambda: one * 2.0] * 200, device, figure_s) * 1e6,
            "synchronous": device.type == "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "version": VERSION}


def calibrate(device: torch.device, cache: Path | None = None, **measuring) -> dict:
    """Measure this device and cache what was measured."""
    found = measure(device, **measuring)
    target = path(device, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_whole(target, lambda partial: partial.write_text(json.dumps(found)))
    return found


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def copies(nbytes: int) -> int:
    """How many sets of operands to cycle through so that each call finds its own out of the
    cache, as a step's ops find theirs (the ops between evict them): WORKING_SET in all."""
    return max(1, min(MAX_COPIES, -(-WORKING_SET // nbytes)))


def timed(runs: list, device: torch.device, minimum_s: float, passes: int = 1) -> float:
    """Seconds per call: the best over about `minimum_s` (and at least `passes` passes) of a pass
    through `runs` back to back (each on operands of its own; on a GPU the host queues the next
    while one runs), divided."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for run in runs[:2]:  # warm-up: the first calls allocate and pick kernels
        run()
    synchronize()
    best, spent, done = float("inf"), 0.0, 0
    while spent < minimum_s or done < passes:
        start = time.perf_counter()
        for run in runs:
            run()
        synchronize()
        took = time.perf_counter() - start
        best, spent, done = min(best, took / len(runs)), spent + took, done + 1
    return best


def _size(moved: int) -> str:
    return f"{moved / 2**20:.0f} MiB" if moved >= 2**20 else f"{moved / 2**10:.0f} KiB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.measure.calibration",
                                     description="Measure what this device's operations "
                                                 "achieve, for the time model (make calibrate).")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where to keep it (default: the user's cache folder)")
    arguments = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found = calibrate(device, arguments.cache)
    print(f"[harness] calibrated {found['device']} ({found['threads']} threads, torch "
          f"{found['torch']}): host {found['op_us']:.1f} us per op")
    for kind, points in found["matmul"].items():
        rates = ", ".join(f"{round((flops / 2) ** (1 / 3))}^3 {flops / seconds / 1e9:.0f}"
                          for flops, seconds in points)
        print(f"[harness] matmul {kind} (GFLOP/s): {rates}")
    print("[harness] elementwise (GB/s): " + ", ".join(
        f"{_size(moved)} {moved / seconds / 1e9:.1f}" for moved, seconds in found["memory"]))
    print("[harness] dropout (GB/s): " + ", ".join(
        f"{_size(moved)} {moved / seconds / 1e9:.1f}" for moved, seconds in found["random"]))
    print(f"[harness] wrote {path(device, arguments.cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
