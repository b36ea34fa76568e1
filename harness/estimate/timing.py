"""A training step's time on a device, predicted from the simulated step's ops (harness/estimate/
work.py) and the device's peaks (harness/measure/peaks.py): one model, the same for every cell.

Each kernel takes the longest of three times:

  compute  its FLOPs at the device's dense peak for the dtype its matmul runs in;
  memory   the bytes it reads and writes at the device's memory bandwidth;
  launch   the host's time to dispatch it (conf/peaks/ launch_us per kernel): eager PyTorch
           launches one kernel after another, and a GPU that finishes a kernel sooner waits for
           the next.

The step's time is their sum over its kernels, and `bound` says how much of it each of the three
set: a step of large matmuls is compute-bound, one of many small elementwise kernels
(normalisation, dropout, LoRA's adapters, the optimizer's updates) memory- or launch-bound. No
kernel reaches its peak, and data loading and the loss's `.item()` are left out, so a measured step
is slower: harness/sweep/plan.py corrects by what measured runs on the same GPU took.
"""

from harness.estimate import work

BOUNDS = ("compute", "memory", "launch")


def step_seconds(rows: list, device: dict) -> dict:
    """{"step_s": seconds, "compute" / "memory" / "launch": the seconds of the kernels each bound}
    for the ops `rows` (work.per_step's) on `device` (peaks.of_gpu's or peaks.of_cpu's)."""
    bound = dict.fromkeys(BOUNDS, 0.0)
    for kind, flops, moved, launches, count in rows:
        times = {"compute": flops / (_peak(device, kind) * 1e12) if flops else 0.0,
                 "memory": moved / (device["bandwidth_gbs"] * 1e9),
                 "launch": launches * device["launch_us"] * 1e-6}
        longest = max(BOUNDS, key=times.get)
        bound[longest] += times[longest] * count
    return {"step_s": sum(bound.values()), **bound}


def ideal_seconds(rows: list, device: dict) -> float:
    """The step's FLOPs at the device's peak for each dtype they run in: what an MFU of 1 takes."""
    return sum(flops / (_peak(device, kind) * 1e12)
               for kind, flops in work.flops_by_kind(rows).items())


def _peak(device: dict, kind: str) -> float:
    """TFLOP/s for matmuls in `kind`; a dtype the device has no units for runs at its fp32 pace."""
    return device.get(kind) or device["fp32"]
