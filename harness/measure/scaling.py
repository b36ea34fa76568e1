"""A calibration carried to a GPU that is not at hand: the time model prices a GPU by what its
operations achieve (harness/measure/calibration.py), but `make calibrate` can only measure the
GPU it runs on. For any other GPU of conf/peaks/ the nearest GPU whose calibration is known (one
`make calibrate` measured on this machine, or one `make gpu-check` committed under
reports/gpu-*/calibration/) is scaled by the two GPUs' datasheet peaks, as Habitat (USENIX ATC
'21) scales per-operation measurements from one GPU to another.

A point of a curve is the time of one op on the known GPU, back to back with the next: the longer
of the host's dispatch and the kernel, since the host queues the next op while one runs.

- A kernel-bound point (longer than HOST_BOUND x the curve's smallest op, which is all dispatch)
  scales by the ratio of the peaks: a dtype's matmuls by its dense peaks, elementwise ops and
  dropout by the memory bandwidths.
- A dispatch-bound point hides its kernel, which takes no longer than the point. It is taken
  at the pace of the curve's smallest kernel-bound op where that is shorter (a smaller kernel
  reaches no more), scaled, and the point stays no shorter than it was: its dispatch.
- A dtype the known GPU was not measured in (int8; fp16 on an older calibration) takes the
  curve of the dtype with the nearest peak there, scaled by the peaks' ratio too.
- The host's figures (the dispatch, op_us) stay the known machine's: the target's host is not
  known.

The device's own calibration goes through the same steps with a ratio of 1: only its missing
dtypes change.
"""

import math

KINDS = ("fp32", "bf16", "fp16", "int8")  # the matmul dtypes of conf/peaks/
# A point this much longer than the curve's smallest op (all dispatch) is its kernel's time.
HOST_BOUND = 1.5


def nearest(gpu_name: str, gpus: dict, known: list[dict], torch_version: str) -> dict | None:
    """Of the `known` calibrations (calibration.known's) of GPUs that `gpus` (conf/peaks/' gpus)
    lists, the one whose GPU's peaks are nearest `gpu_name`'s (the GPU's own first), of this
    torch version where there is a choice; None when there is none."""
    usable = [found for found in known if found["device"] in gpus]
    if gpu_name not in gpus or not usable:
        return None
    return min(usable, key=lambda found: (_distance(gpus[found["device"]], gpus[gpu_name]),
                                          found["torch"] != torch_version))


def scaled(calibration: dict, measured_on: dict, target: dict) -> dict:
    """`calibration`, measured on a GPU of peaks `measured_on`, carried to one of peaks `target`
    (both conf/peaks/ figures: fp32 / bf16 / fp16 / int8, bandwidth_gbs): a matmul curve for each
    dtype the target has units for, and the memory and dropout curves, scaled as the module's
    docstring says."""
    by_bandwidth = measured_on["bandwidth_gbs"] / target["bandwidth_gbs"]
    matmul = {}
    for kind in KINDS:
        if not target.get(kind):
            continue  # no units: its matmuls run at the fp32 pace (timing._peak)
        source = kind if kind in calibration["matmul"] else min(
            calibration["matmul"],
            key=lambda measured: abs(math.log(_peak(measured_on, measured) / target[kind])))
        matmul[kind] = _scaled_curve(calibration["matmul"][source],
                                     _peak(measured_on, source) / target[kind])
    return {**calibration, "matmul": matmul,
            "memory": _scaled_curve(calibration["memory"], by_bandwidth),
            "random": _scaled_curve(calibration["random"], by_bandwidth)}


def _scaled_curve(points: list, ratio: float) -> list:
    """[size, seconds] points of the known GPU, on a GPU where a kernel takes `ratio` x as long
    (see the module's docstring)."""
    dispatch_s = points[0][1]
    kernel_bound = [(size, seconds) for size, seconds in points
                    if seconds > HOST_BOUND * dispatch_s]
    if not kernel_bound:
        return [list(point) for point in points]  # every kernel hid: nothing to scale by
    first_size, first_s = kernel_bound[0]
    scaled_points = []
    for size, seconds in points:
        if seconds > HOST_BOUND * dispatch_s:
            scaled_points.append([size, max(dispatch_s, seconds * ratio)])
        else:
            kernel_s = min(seconds, first_s * size / first_size)
            scaled_points.append([size, max(seconds, kernel_s * ratio)])
    return scaled_points


def _distance(one: dict, other: dict) -> float:
    """How far two GPUs' peaks lie apart: log ratios of fp32, of half precision and of
    bandwidth, summed."""
    def figures(gpu):
        return gpu["fp32"], gpu.get("bf16") or gpu.get("fp16") or gpu["fp32"], gpu["bandwidth_gbs"]
    return sum(abs(math.log(a / b)) for a, b in zip(figures(one), figures(other)))


def _peak(gpu: dict, kind: str) -> float:
    return gpu.get(kind) or gpu["fp32"]
