"""`make gpu-check`'s profile part: where one training step's time goes on this device, for the
rows whose times the time model cannot explain yet (docs/estimator.md, "Against the study's
times": the study's base LoRA, with checkpointing at 255 / 50 tokens, slower than base full
fine-tuning at 512 / 95).

For each row (an option of experiments/check_row/, on its recipe: its batch, lengths, precision
and checkpointing; random weights), the cell's own training step on one batch
(training_step.one_batch_steps), warmed up, then:

  step_ms              the best of TIMED steps, synchronized;
  device_busy_ms       what the device's kernels and copies took in one profiled step
                       (torch.profiler), and their share of step_ms: near 1, the GPU sets the
                       pace; far below, the host does;
  device_activities    how many kernels and copies that step launched;
  op_calls             the ATen ops Python and autograd called in it (nested calls left out);
  host_us_per_call     the host's time per op call of the same cell's step at one example of
                       four tokens, where every kernel is shorter than its dispatch
                       (harness/estimate/host_time.py), beside the calibration's op_us;
  predicted_step_ms    the time model's prediction for this device, as a run logs it;
  predicted_with_host_ms  the same, each op costing at least host_us_per_call (where the device
                       is calibrated): what the model would predict with the host's time per
                       call measured on the cell's own step instead of one bare op's.

Writes profile.csv and profile.md (with each row's costliest device activities) into --out.

    python bench/step_profile.py --out reports/gpu-<device> [--rows base_full,base_lora]
                                 [override ...]
"""

import argparse
import gc
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.config import grids, identity  # noqa: E402
from harness.core import tables  # noqa: E402
from harness.data import encoding  # noqa: E402
from harness.estimate import estimate, host_time, timing  # noqa: E402
from harness.measure import peaks  # noqa: E402
from harness.model import training_step  # noqa: E402

ROWS = "base_full,base_lora"
WARMUP, TIMED = 3, 5
TOP = 8  # device activities shown per row


def profiled(row: str, overrides: list[str], device: torch.device) -> tuple[dict, pd.DataFrame]:
    """A row's figures (the module's docstring) and its costliest device activities."""
    job = grids.compose_experiment("gpu_check", [*overrides, f"+check_row={row}"])[0]
    cell_cfg = identity.cell_config(job)
    lengths, _ = encoding.planned_lengths(job.data, job.model, job.cache_dir)
    cfg = OmegaConf.create(cell_cfg)
    step, updates = training_step.one_batch_steps(cfg, job.train.batch_size, lengths, device,
                                                  WARMUP + TIMED + 2)
    step_s = training_step.best_seconds(step, device, WARMUP, TIMED)
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU]
                 + ([ProfilerActivity.CUDA] if on_gpu else [])) as profiler:
        step()
        training_step.synchronize(device)
    updates.close()
    del step, updates
    gc.collect()
    events = profiler.events()
    activities = [event for event in events if event.device_type == DeviceType.CUDA]
    calls = [event for event in events if event.device_type == DeviceType.CPU
             and event.name.startswith("aten::") and not (
                 event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::"))]
    busy_s = sum(event.time_range.elapsed_us() for event in activities) / 1e6
    host_s = host_time.seconds_per_call(cfg, device=device)
    figures = peaks.of_gpu(job.peaks, torch.cuda.get_device_name(device)) if on_gpu else (
        peaks.of_cpu())
    rows = estimate.step_work(cell_cfg, lengths, job.cache_dir, device.type)
    found = {"row": row, "batch_size": job.train.batch_size,
             "lengths": f"{lengths['source']}/{lengths['target']}", "step_ms": step_s * 1e3,
             "device_busy_ms": busy_s * 1e3 if on_gpu else None,
             "device_busy_share": busy_s / step_s if on_gpu else None,
             "device_activities": len(activities) if on_gpu else None, "op_calls": len(calls),
             "host_us_per_call": host_s * 1e6, "predicted_step_ms": None,
             "predicted_with_host_ms": None, "peaks_from": None}
    if figures is not None:
        found.update(predicted_step_ms=timing.step_seconds(rows, figures)["step_s"] * 1e3,
                     peaks_from=figures["source"])
        if "calibration" in figures and on_gpu:
            with_host = {**figures["calibration"], "op_us": host_s * 1e6}
            found["predicted_with_host_ms"] = timing.step_seconds(
                rows, {**figures, "calibration": with_host})["step_s"] * 1e3
    costliest = pd.DataFrame(
        [{"activity": event.name[:70], "ms": event.time_range.elapsed_us() / 1e3}
         for event in activities], columns=["activity", "ms"])
    costliest = (costliest.groupby("activity").ms.agg(["count", "sum"]).reset_index()
                 .rename(columns={"sum": "ms"}).sort_values("ms", ascending=False).head(TOP))
    return found, costliest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where profile.csv and .md go")
    parser.add_argument("--rows", default=ROWS, help=f"options of experiments/check_row/ "
                                                     f"(default {ROWS})")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every row")
    args = parser.parse_args(argv)
    # The rows are this part's own: a +check_row= among the overrides picks the cells part's.
    overrides = [item for item in args.overrides if not item.startswith("+check_row=")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    found, sections = [], []
    for row in args.rows.split(","):
        figures, costliest = profiled(row, overrides, device)
        found.append(figures)
        if len(costliest):
            sections += [f"### {row}: the costliest device activities of one step", "",
                         tables.as_text(costliest), ""]
        print(f"[profile] {row}: step {figures['step_ms']:.1f} ms, host "
              f"{figures['host_us_per_call']:.1f} us per call, {figures['op_calls']} calls")
    table = pd.DataFrame(found)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "profile.csv", index=False)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "this CPU"
    (args.out / "profile.md").write_text("\n".join([
        f"# Where a step's time goes on {name}", "",
        "bench/step_profile.py: each row's own training step on one batch of its recipe "
        "(random weights). `device_busy_share` near 1: the GPU sets the pace; far below: the "
        "host does, at `host_us_per_call` per op call. `predicted_with_host_ms` is the time "
        "model with that host time per call instead of the calibration's one bare op.", "",
        tables.as_text(table), "", *sections]))
    print(f"[profile] wrote {args.out}/profile.csv and profile.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
