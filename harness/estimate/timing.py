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

Calibrated (`make calibrate` measured the device: harness/measure/calibration.py), each op is
priced by what an op of its size achieved there instead: a matmul by the measured seconds of a
matmul of as many FLOPs in its dtype, any op by the measured seconds of an elementwise op that
moves as many bytes (a dropout's by a dropout's: drawing random numbers costs more), whichever is
longer, interpolated between the sizes measured (log-log) and
scaled linearly beyond the largest. Both figures include the host's dispatch of one op; a foreach
op's further launches add the host's time per op. On a CPU ops run one after another, so the
step is their sum; on a GPU the host's dispatch overlaps the kernels, each op taking the longer.

On the calibrated CPU at hand the step's own ops are measured instead (`on_this_cpu`): each call
the simulated CPU step makes, made again on real tensors of its shapes (harness/measure/
op_times.py), the step their sum, with the time the step spends outside its ops and the time its
loop waits for its batches (harness/estimate/host_time.py). The curves price a step on a device
that is not at hand.
"""

import bisect
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from harness.estimate import estimate, host_time, work
from harness.measure import op_times

BOUNDS = ("compute", "memory", "launch")


def step_seconds(rows: list, device: dict) -> dict:
    """{"step_s": seconds, "compute" / "memory" / "launch": the seconds of the kernels each bound}
    for the ops `rows` (work.per_step's) on `device` (peaks.of_gpu's or peaks.of_cpu's; with
    its "calibration", priced by it)."""
    if device.get("calibration"):
        return _calibrated_seconds(rows, device["calibration"])
    bound = dict.fromkeys(BOUNDS, 0.0)
    for kind, flops, moved, launches, count in rows:
        times = {"compute": flops / (_peak(device, kind) * 1e12) if flops else 0.0,
                 "memory": moved / (device["bandwidth_gbs"] * 1e9),
                 "launch": launches * device["launch_us"] * 1e-6}
        longest = max(BOUNDS, key=times.get)
        bound[longest] += times[longest] * count
    return {"step_s": sum(bound.values()), **bound}


def _calibrated_seconds(rows: list, calibration: dict) -> dict:
    bound = dict.fromkeys(BOUNDS, 0.0)
    host_s = calibration["op_us"] * 1e-6
    for kind, flops, moved, launches, count in rows:
        curve = calibration["matmul"].get(kind) or calibration["matmul"]["fp32"]
        by_bytes = calibration["random"] if kind == "random" else calibration["memory"]
        times = {"compute": _interpolated(curve, flops) if flops else 0.0,
                 "memory": _interpolated(by_bytes, moved)}
        longest = max(times, key=times.get)
        more_launches = (launches - 1) * host_s
        if calibration.get("synchronous"):
            bound[longest] += times[longest] * count
            bound["launch"] += more_launches * count
        elif more_launches + host_s > times[longest]:
            bound["launch"] += (more_launches + host_s) * count
        else:
            bound[longest] += times[longest] * count
    return {"step_s": sum(bound.values()), **bound}


def on_this_cpu(cell_cfg: dict, lengths: dict, cache_dir: str | None, device: dict,
                op_cache: Path | None = None) -> dict:
    """replayed_seconds of a cell's step on this calibrated CPU (peaks.of_cpu's `device`): the
    ops a CPU runs for it, each measured here (the first time; cached after, in the user's cache
    or `op_cache`), the time the cell's own step spends outside its ops, per call, and the time
    its loop waits for each batch (harness/estimate/host_time.py)."""
    calls = estimate.step_calls(cell_cfg, lengths, cache_dir)
    op_seconds = op_times.seconds([called for called, _ in calls], torch.device("cpu"), op_cache)
    cfg = OmegaConf.create(cell_cfg)
    host_s = host_time.seconds_per_call(cfg, op_cache)
    loader_s = host_time.loader_seconds_per_batch(cfg, lengths) * cfg.train.grad_accum_steps
    return replayed_seconds(calls, op_seconds, device["calibration"], host_s, loader_s)


def replayed_seconds(calls: list, op_seconds: dict, calibration: dict,
                     host_s: float = 0.0, loader_s: float = 0.0) -> dict:
    """{"step_s": seconds, "replayed": the share of the step's calls measured, "host": seconds
    outside the ops, "loader": seconds waiting for batches} for the op calls `calls`
    ([signature, count] rows: estimate.step_calls) whose seconds per call were measured on this
    device by making each again (`op_seconds`: harness/measure/op_times.py), `host_s` more for
    each call and `loader_s` for the step's batches; on a CPU the ops run one after another and
    the loop waits for its batches between them, so the step is their sum. A call that could not
    be made again costs the host's time per op (the calibration's op_us)."""
    total = measured = count_all = 0
    for called, count in calls:
        found = op_seconds.get(called)
        total += count * (calibration["op_us"] * 1e-6 if found is None else found)
        measured += count if found is not None else 0
        count_all += count
    return {"step_s": total + host_s * count_all + loader_s, "host": host_s * count_all,
            "loader": loader_s, "replayed": measured / count_all if count_all else 1.0}


def _interpolated(points: list, size: float) -> float:
    """Seconds for an op of `size` (FLOPs or bytes) from measured [size, seconds] points: log-log
    between them, the smallest's time below them, linear in size beyond the largest."""
    sizes = [point[0] for point in points]
    if size <= sizes[0]:
        return points[0][1]
    if size >= sizes[-1]:
        return points[-1][1] * size / sizes[-1]
    at = bisect.bisect_right(sizes, size)
    (low, low_s), (high, high_s) = points[at - 1], points[at]
    share = math.log(size / low) / math.log(high / low)
    return math.exp(math.log(low_s) + share * math.log(high_s / low_s))


def ideal_seconds(rows: list, device: dict) -> float:
    """The step's FLOPs at the device's peak for each dtype they run in: what an MFU of 1 takes."""
    return sum(flops / (_peak(device, kind) * 1e12)
               for kind, flops in work.flops_by_kind(rows).items())


def _peak(device: dict, kind: str) -> float:
    """TFLOP/s for matmuls in `kind`; a dtype the device has no units for runs at its fp32 pace."""
    return device.get(kind) or device["fp32"]
