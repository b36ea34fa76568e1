"""`make bench`'s time-prediction table: the time model against the step times it predicts.

Cells of different shape (seq2seq and causal; full, LoRA, LOMO; checkpointing on and off; two
batch sizes) run through the runner on this machine, on synthetic data of one fixed length (every
batch the same shape), for --steps steps. Each row sets the measured median step
(step_time_p50_s, without the first train.throughput_skip_steps: what a step takes when nothing
else on the machine takes its cores; the mean beside it) beside the time model's
prediction for the same step: on a calibrated machine (`make calibrate`), each op the simulated
step calls measured here and the cell's own time outside its ops (harness/estimate/timing.py's
on_this_cpu), and the peaks-only model (harness/measure/peaks.py) beside it.

The ops are measured anew right after each run of a cell, into a folder of the run's own, not
taken from the cache `make calibrate` filled: a shared machine's speed drifts by 10 to 30 % over
an hour, and a prediction from figures of another hour would measure that drift, not the model.
A row's ratio is the median over runs of each run's predicted over measured step.
Goal: every calibrated ratio within 0.85-1.15. Results: reports/bench/time-<device>.md and .json.
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run import REPO, compose_cell, harness_cell, machine, stored  # noqa: E402
from harness.config import identity  # noqa: E402
from harness.estimate import estimate, timing  # noqa: E402
from harness.measure import peaks  # noqa: E402

# Synthetic data of one length, as the sampler benchmark's cell.
FIXED = ["data=synthetic", "data.length_sigma=0", "data.source_length_median=128",
         "data.target_length_median=28", "data.train_size=1600", "data.validation_size=8",
         "data.test_size=8", "train.lr=1e-4", "force=true", "eval.infer=false"]
CELLS = {
    "t5-mini full, batch 8": ["model=t5-mini", "method=full", "train.batch_size=8"],
    "t5-mini full, batch 32": ["model=t5-mini", "method=full", "train.batch_size=32"],
    "t5-mini full, checkpointing": ["model=t5-mini", "method=full", "train.batch_size=8",
                                    "train.gradient_checkpointing=true"],
    "t5-mini LoRA, batch 8": ["model=t5-mini", "method=lora", "train.batch_size=8"],
    "t5-mini LOMO, batch 8": ["model=t5-mini", "method=lomo", "train.batch_size=8"],
    "tiny-llama full, batch 8": ["model=tiny-llama", "method=full", "train.batch_size=8"],
    "tiny-llama LOMO, batch 8": ["model=tiny-llama", "method=lomo", "train.batch_size=8"],
}
GOAL = (0.85, 1.15)


def predicted_step_s(cfg, device: dict, op_cache: Path | None = None) -> float:
    """The time model's step for the cell, at the lengths its batches were padded to (one): on a
    calibrated device, the ops a CPU runs, each measured here (harness/measure/op_times.py; into
    `op_cache`); the peaks price the step as simulated for CUDA (as a run logs them)."""
    lengths = {"source": cfg.data.source_length_median, "target": cfg.data.target_length_median}
    lengths = {side: round(length) for side, length in lengths.items()}
    if "calibration" in device:
        return timing.on_this_cpu(identity.cell_config(cfg), lengths, cfg.cache_dir,
                                  device, op_cache)["step_s"]
    rows = estimate.step_work(identity.cell_config(cfg), lengths, cfg.cache_dir)
    return timing.step_seconds(rows, device)["step_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    parser.add_argument("--stem", help="name of the .md and .json files (default: time-<device>)")
    arguments = parser.parse_args(argv)
    device = peaks.of_cpu() if not torch.cuda.is_available() else None
    if device is None:
        print("[bench] the time table runs on a CPU here; on a GPU make gpu-check reports it")
        return 0
    uncalibrated = {key: value for key, value in device.items() if key != "calibration"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="harness-time-") as folder:
        store = Path(folder)
        for number, (name, overrides) in enumerate(CELLS.items()):
            cell = [*FIXED, *overrides, f"train.max_steps={arguments.steps}"]
            experiment = f"time-{number}"
            cfg = compose_cell(stored(cell, store, experiment), base=[])
            measured, predicted = [], []
            for repeat in range(arguments.repeats):
                print(f"[bench] {name} ({repeat + 1} of {arguments.repeats})", flush=True)
                metrics = harness_cell(cell, store, experiment, base=[])
                measured.append((metrics["step_time_p50_s"], metrics["step_time_mean_s"]))
                if "calibration" in device:  # its ops measured anew, right after the cell ran
                    predicted.append(predicted_step_s(cfg, device, store / f"ops-{number}-"
                                                      f"{repeat}"))
            step_s = statistics.median(p50 for p50, _ in measured)
            mean_s = statistics.median(mean for _, mean in measured)
            calibrated = statistics.median(predicted) if predicted else None
            ratio = statistics.median(p / m for p, (m, _) in zip(predicted, measured)) \
                if predicted else None
            peaks_only = predicted_step_s(cfg, uncalibrated)
            rows.append({"cell": name, "measured_step_s": step_s, "measured_mean_s": mean_s,
                         "predicted_step_s": calibrated, "ratio": ratio,
                         "peaks_only_step_s": peaks_only, "peaks_only_ratio": peaks_only / step_s,
                         "repeats": {"measured_p50_s": [p50 for p50, _ in measured],
                                     "predicted_s": predicted}})
    write(arguments, device, rows)
    return 0


def write(arguments, device: dict, rows: list[dict]) -> None:
    facts = machine()
    slug = arguments.stem or f"time-{facts['gpu'] or 'cpu-' + str(facts['cores']) + '-cores'}"
    slug = slug.lower()
    calibrated = "calibration" in device
    met = sum(GOAL[0] <= row["ratio"] <= GOAL[1] for row in rows if row["ratio"])
    lines = [f"# The time model on {device['name']}", "",
             f"`make bench` on {facts['date']}: {facts['cpu']}, {facts['cores']} cores; torch "
             f"{facts['torch']}. Each cell: `{' '.join(FIXED)}` plus its own, "
             f"{arguments.steps} steps, the median of {arguments.repeats} run(s). Measured: the "
             "median step without the first steps (step_time_p50_s; the mean beside it). "
             "Predicted: the time model "
             "for the same step, " + ("each of its ops measured on this machine right after "
                                      "each run and the cell's own time outside its ops per "
                                      "call (harness/estimate/timing.py's on_this_cpu); the "
                                      "ratio is the median of the runs' own"
                                      if calibrated else "uncalibrated (run make calibrate)")
             + ", and from the device's peaks alone.", "",
             (f"{met} of {len(rows)} calibrated ratios within {GOAL[0]}-{GOAL[1]}."
              if calibrated else "No calibration on this machine: run `make calibrate`."), "",
             "| cell | measured step (s) | mean step (s) | predicted (s) | predicted / measured "
             "| peaks only (s) | peaks only / measured |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        predicted = "" if row["predicted_step_s"] is None else f"{row['predicted_step_s']:.4f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['cell']} | {row['measured_step_s']:.4f} | "
                     f"{row['measured_mean_s']:.4f} | {predicted} | {ratio} | "
                     f"{row['peaks_only_step_s']:.4f} | {row['peaks_only_ratio']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / f"{slug}.md").write_text(text)
    (arguments.out / f"{slug}.json").write_text(json.dumps(
        {"machine": facts, "device": {key: value for key, value in device.items()},
         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
