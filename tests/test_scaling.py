"""A GPU not at hand is priced by the nearest GPU whose calibration is known, its curves scaled by
the two GPUs' peaks (harness/measure/scaling.py). No GPU exists here: the calibrations are written
as `make calibrate` writes them on one (curves whose small ops cost the host's dispatch and whose
large ones run at a fixed share of the GPU's peaks); `make gpu-check` measures a real one and
writes it under reports/gpu-<device>/calibration/."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from harness.config.grids import compose_experiment
from harness.estimate import timing
from harness.measure import calibration, peaks, scaling
from harness.sweep import plan
from tests.conftest import compose_cell, requires_cuda

DISPATCH_S = 8e-6  # the host's time to queue one op
PACE = 0.7  # the share of its peaks a GPU's large ops reach


def measured_on(gpu: dict, name: str, torch_version: str = torch.__version__) -> dict:
    """A calibration of the GPU of peaks `gpu`, as make calibrate writes it there."""
    def matmul(kind):
        return [[2 * size ** 3, max(DISPATCH_S, 2 * size ** 3 / (PACE * gpu[kind] * 1e12))]
                for size in calibration.GPU_MATMUL_SIZES]
    by_bytes = [[moved, max(DISPATCH_S, moved / (PACE * gpu["bandwidth_gbs"] * 1e9))]
                for moved in calibration.MEMORY_BYTES]
    return {"device": name, "matmul": {kind: matmul(kind) for kind in calibration.GPU_DTYPES},
            "memory": by_bytes, "random": [[moved, 2 * seconds] for moved, seconds in by_bytes],
            "op_us": 12.0, "synchronous": False, "torch": torch_version, "threads": 1,
            "version": calibration.VERSION}


@pytest.fixture
def known(tmp_path, monkeypatch):
    """conf/peaks/, with a folder of committed calibrations (an A100's and an H100's, as
    make gpu-check writes them) and an empty user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = compose_cell().peaks
    folder = tmp_path / "reports" / "gpu-a" / "calibration"
    folder.mkdir(parents=True)
    for name in ("NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"):
        calibration.path(name, folder).write_text(json.dumps(measured_on(cfg.gpus[name], name)))
    # A CPU's calibration in the same folder is no GPU's to scale.
    cpu = {**measured_on(cfg.gpus["NVIDIA L4"], "CPU x86_64"), "synchronous": True}
    calibration.path("CPU x86_64", folder).write_text(json.dumps(cpu))
    cfg.calibrations = [str(tmp_path / "reports" / "gpu-*" / "calibration")]
    return cfg


def test_a_gpu_not_at_hand_is_priced_by_the_nearest_gpu_measured_scaled_by_their_peaks(known):
    assert [found["device"] for found in calibration.known([known.calibrations[0].replace(
        "gpu-*", "gpu-a")])] == ["NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"]
    a10g = peaks.of_gpu(known, "NVIDIA A10G")
    # The A100's peaks are nearer the A10G's than the H100's are.
    assert "scaled from the calibration of NVIDIA A100-SXM4-40GB" in a10g["source"]
    # A committed calibration is named from the project's folder, as every clone has it.
    committed = peaks.PROJECT / "reports" / "gpu-a" / "x.json"
    assert peaks._shown(str(committed)) == "reports/gpu-a/x.json"
    carried = a10g["calibration"]
    for kind in ("fp32", "bf16", "fp16", "int8"):
        large_flops, large_s = carried["matmul"][kind][-1]
        # A large matmul keeps the share of the peak it reached on the A100, at the A10G's peak.
        assert large_s == pytest.approx(large_flops / (PACE * a10g[kind] * 1e12)), kind
        # The smallest stays the host's dispatch: the host's time does not scale with the GPU.
        assert carried["matmul"][kind][0][1] == DISPATCH_S
    large_bytes, large_s = carried["memory"][-1]
    assert large_s == pytest.approx(large_bytes / (PACE * 600e9))
    assert carried["op_us"] == 12.0
    # A GPU's own calibration prices it as measured; a GPU without bf16 units runs its bf16
    # matmuls on the fp32 curve (timing._peak's rule).
    h100 = peaks.of_gpu(known, "NVIDIA H100 80GB HBM3")
    assert h100["source"].startswith("conf/peaks/; calibrated (") and h100["calibration"][
        "matmul"]["bf16"] == measured_on(known.gpus["NVIDIA H100 80GB HBM3"], "")["matmul"]["bf16"]
    assert "bf16" not in peaks.of_gpu(known, "Tesla T4")["calibration"]["matmul"]


def test_a_step_priced_from_a_scaled_calibration_lies_between_its_peaks_and_the_gpu_s_pace(known):
    # An A10G's step, priced by the A100's calibration carried over: slower than the A10G's
    # datasheet peaks, no slower than every kernel at PACE of them with every op's dispatch.
    rows = [["fp32", 2 * 4096 ** 3, 3 * 4096 ** 2 * 4, 1, 4], ["bf16", 2 * 512 ** 3, 0, 1, 50],
            ["", 0, 2 ** 26, 1, 100], ["random", 0, 2 ** 20, 1, 10]]
    datasheet = peaks.of_gpu(OmegaConf.merge(known, {"calibrations": []}), "NVIDIA A10G")
    assert "calibration" not in datasheet and datasheet["source"] == "conf/peaks/ (datasheet)"
    peak_s = timing.step_seconds(rows, datasheet)["step_s"]
    priced = timing.step_seconds(rows, peaks.of_gpu(known, "NVIDIA A10G"))
    assert peak_s < priced["step_s"] <= peak_s / PACE + 164 * 12e-6
    # The large matmuls at PACE of the A10G's fp32 peak; the small ones hide behind the host's
    # 12 us an op.
    assert priced["compute"] == pytest.approx(4 * 2 * 4096 ** 3 / (PACE * 35e12))
    assert priced["launch"] >= 50 * 12e-6


def test_a_curve_scales_its_kernels_and_keeps_its_dispatch():
    # 10 us of dispatch; a point under 1.5 x that hides its kernel; 80 and 640 us are kernels.
    points = [[1, 10e-6], [8, 12e-6], [64, 80e-6], [512, 640e-6]]
    assert scaling._scaled_curve(points, 1.0) == points  # the GPU's own: as measured
    def seconds(curve):
        return [point_s for _, point_s in curve]
    slower = scaling._scaled_curve(points, 4.0)
    assert [size for size, _ in slower] == [1, 8, 64, 512]
    # The hidden kernel at the pace of the first kernel-bound point (8 x 80 / 64 = 10 us, less
    # than the 12 measured), four times as long; the smallest stays at the dispatch.
    assert seconds(slower) == pytest.approx([10e-6, 40e-6, 320e-6, 2560e-6])
    faster = scaling._scaled_curve(points, 0.1)
    assert seconds(faster) == pytest.approx([10e-6, 12e-6, 10e-6, 64e-6])
    # A curve that never left its dispatch has nothing to scale by.
    flat = [[1, 10e-6], [8, 11e-6]]
    assert scaling._scaled_curve(flat, 4.0) == flat


def test_the_nearest_is_the_gpu_itself_first_and_this_torch_s_measure_where_there_are_two():
    gpus = compose_cell().peaks.gpus
    own, older = (measured_on(gpus["NVIDIA L4"], "NVIDIA L4", version)
                  for version in (torch.__version__, "2.0.0"))
    other = measured_on(gpus["NVIDIA A10G"], "NVIDIA A10G")
    assert scaling.nearest("NVIDIA L4", gpus, [other, older, own], torch.__version__) is own
    assert scaling.nearest("NVIDIA L4", gpus, [other, older], torch.__version__) is older
    assert scaling.nearest("NVIDIA L4", gpus, [], torch.__version__) is None
    assert scaling.nearest("NVIDIA Unknown 1", gpus, [own], torch.__version__) is None


def test_the_plan_says_whose_calibration_priced_each_cell(known, tmp_path):
    cell = ["model=t5-tiny", "precision=fp32", "method=full", f"cache_dir={tmp_path}/simulations",
            f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    scaled, datasheet = (
        plan.plan(jobs, [], jobs[0].plan_gpu, create_experiment=False)
        for jobs in (compose_experiment("full_grid", [*cell, f"peaks.calibrations=[{pattern}]"])
                     for pattern in (known.calibrations[0], "none-here")))
    assert "scaled from the calibration of NVIDIA A100-SXM4-40GB" in scaled.peaks_from[0]
    assert datasheet.peaks_from[0] == "conf/peaks/ (datasheet)"
    # A tiny model's step is its ops' dispatch, which the datasheet model takes at 10 us an op
    # and the calibration at the 12 us measured.
    assert scaled.predicted_step_s[0] > datasheet.predicted_step_s[0]


@pytest.mark.gpu
@requires_cuda
def test_a_gpu_s_calibration_reaches_its_kernels_in_each_half_precision():
    found = calibration.measure(torch.device("cuda"), figure_s=0.05)
    assert set(found["matmul"]) == {"fp32", "bf16", "fp16"} and not found["synchronous"]
    for kind, curve in found["matmul"].items():
        assert curve[-1][0] == 2 * 8192 ** 3, kind
        # The largest matmuls are the kernel's time, well beyond the host's dispatch.
        assert curve[-1][1] > scaling.HOST_BOUND * curve[0][1], kind
    gpus = compose_cell().peaks.gpus
    if found["device"] in gpus:  # carried to itself: as measured
        own = gpus[found["device"]]
        assert scaling.scaled(found, own, own)["matmul"]["bf16"] == found["matmul"]["bf16"]
