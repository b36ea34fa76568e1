"""`make bench`: the harness measured against itself and against what users would otherwise
use, side by side in one run, on one cell, medians over repeats, printed as ratios:

  sampler overhead   the harness cell with the memory sampler on and off
  harness overhead   the harness cell and a minimal hand-written PyTorch loop
  vs Seq2SeqTrainer  the harness cell and Hugging Face's Seq2SeqTrainer
  MFU                each of them against this device's peak, and the predicted step time
                     against the measured

Every run is a fresh process; the baselines (bench/baselines.py) build the same model and data
with the harness's loaders and are watched by the same sampler. Throughput leaves out the first
train.throughput_skip_steps steps in every loop. Peak memory is GPU memory with CUDA (NVML, as
the harness reports it), host RSS without. The contenders run one after the other in each
repeat (the order alternates), and a ratio is the median of the repeats' ratios, so that a slow
spell of a shared machine falls on both sides of a ratio. Results: reports/bench/<device>.md and
.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script (make bench): bench/ beside harness/
from bench import sampler_cost  # noqa: E402
from harness.config import identity  # noqa: E402
from harness.measure import traces  # noqa: E402
from harness.run import runner  # noqa: E402

# Full fine-tuning of t5-mini in fp32 at batch 8 on synthetic data of one fixed length (sigma 0:
# every batch has the same shape, so no loop is favoured by the order of its batches).
CELL = ["model=t5-mini", "method=full", "precision=fp32", "data=synthetic",
        "data.length_sigma=0", "data.source_length_median=128", "data.target_length_median=28",
        "data.train_size=1600", "data.validation_size=8", "data.test_size=8",
        "train.batch_size=8", "train.lr=1e-4", "force=true"]
# (name, target, how the ratio is formed, which way is good)
TARGETS = {
    "sampler time ratio (on / off)": (1.01, "<="),
    "harness / hand-written loop: time ratio": (1.05, "<="),
    "harness / hand-written loop: peak memory ratio": (1.05, "<="),
    "harness / Seq2SeqTrainer: throughput ratio": (1.0, ">="),
    "harness / Seq2SeqTrainer: peak memory ratio": (1.0, "<="),
}


def compose_cell(overrides: list[str], base: list[str] = CELL):
    """The benchmark cell (`base`), with these overrides, as Hydra composes it from conf/."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=[*base, *overrides])


def stored(overrides: list[str], store: Path, experiment: str) -> list[str]:
    """The overrides with a store, experiment, artifact folder and cache under `store`."""
    return [*overrides, f"tracking.uri=sqlite:///{store}/mlflow.db",
            f"tracking.experiment={experiment}", f"tracking.artifact_location={store}/artifacts",
            f"cache_dir={store}/cache"]


def harness_cell(overrides: list[str], store: Path, experiment: str,
                 base: list[str] = CELL) -> dict:
    """Run the cell through the runner; its metrics, plus wall_s, the runner's whole time."""
    cfg = compose_cell(stored(overrides, store, experiment), base)
    start = time.perf_counter()
    status = runner.run(cfg)
    wall_s = time.perf_counter() - start
    if status != "ok":
        raise RuntimeError(f"the benchmark cell ended {status}")
    client = MlflowClient(cfg.tracking.uri)
    found = client.get_experiment_by_name(experiment)
    run = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"],
                             max_results=1)[0]
    return {**run.data.metrics, "wall_s": wall_s}


def baseline(kind: str, cfg, store: Path, peak_key: str) -> dict:
    """Run bench/baselines.py in a fresh process under the sampler."""
    cell_yaml, out_json = store / f"{kind}.yaml", store / f"{kind}.json"
    OmegaConf.save(identity.cell_config(cfg), cell_yaml)
    trace_csv = store / f"{kind}-trace.csv"
    interval_ms = traces.interval_ms(cfg.sampler, torch.cuda.is_available())
    sampler = traces.SamplerProcess(interval_ms, trace_csv)
    process = subprocess.Popen([sys.executable, str(REPO / "bench" / "baselines.py"), kind,
                                str(cell_yaml), str(out_json)], cwd=REPO)
    sampler.watch(process.pid)
    try:
        if process.wait() != 0:
            raise RuntimeError(f"the {kind} baseline exited with {process.returncode}")
    finally:
        sampler.stop()
    result = json.loads(out_json.read_text())
    ends, skip = result["step_ends_s"], cfg.train.throughput_skip_steps
    trace = traces.read_trace(trace_csv, [])
    return {"samples_per_s": (len(ends) - skip) * result["samples_per_step"]
            / (ends[-1] - ends[skip - 1]),
            "peak_mib": trace[f"{peak_key}_mib"].max()}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}


def verdict(ratio: float, target: float, direction: str) -> str:
    met = ratio <= target if direction == "<=" else ratio >= target
    if met:
        return "met"
    return f"missed by {abs(ratio - target) / target:.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench")
    parser.add_argument("--stem", help="name of the .md and .json files (default: the device)")
    args = parser.parse_args(argv)
    peak_key = "gpu" if torch.cuda.is_available() else "cpu"
    steps = [f"train.max_steps={args.steps}"]
    cfg = compose_cell(steps)

    runs = {"sampler on": [], "sampler off": [], "hand-written": [], "Seq2SeqTrainer": []}
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as folder:
        store = Path(folder)
        for repeat in range(args.repeats):
            print(f"[bench] repeat {repeat + 1} of {args.repeats}", flush=True)
            contenders = {
                "sampler on": lambda: harness_cell(steps, store, "sampler-on"),
                "sampler off": lambda: harness_cell([*steps, "sampler.enabled=false"], store,
                                                    "sampler-off"),
                "hand-written": lambda: baseline("handwritten", cfg, store, peak_key),
                "Seq2SeqTrainer": lambda: baseline("trainer", cfg, store, peak_key)}
            order = list(contenders) if repeat % 2 == 0 else list(reversed(contenders))
            for name in order:
                result = contenders[name]()
                if name.startswith("sampler"):
                    result = {"samples_per_s": result["samples_per_s"],
                              "peak_mib": result.get(f"{peak_key}_peak_mib"),
                              "sampler_cpu_pct": 100 * result["sampler_cpu_s"] / result["wall_s"]
                              if "sampler_cpu_s" in result else None,
                              # MFU = the step's FLOPs at peak over its time; the same for all.
                              "ideal_step_s": result["mfu"] * result["step_time_mean_s"],
                              "step_time_mean_s": result["step_time_mean_s"],
                              "predicted_step_s": result["predicted_step_s"]}
                runs[name].append(result)

    def paired(numerator: str, denominator: str, key: str, invert: bool = False) -> float:
        """The median over repeats of numerator / denominator (or its inverse)."""
        ratios = [a[key] / b[key] for a, b in zip(runs[numerator], runs[denominator])]
        return statistics.median(1 / r if invert else r for r in ratios)

    median = {name: {key: statistics.median(run[key] for run in results)
                     for key in results[0] if results[0][key] is not None}
              for name, results in runs.items()}
    # The sampler's cost is below the run-to-run noise of whole runs: it is measured in one
    # process, windows of steps with the sampler running against windows with it stopped.
    print("[bench] the sampler's cost, in alternating windows of one run", flush=True)
    windows = sampler_cost.measure(cfg)
    ratios = {
        # Time ratios: the samples/s of the other over the harness's (time = 1 / throughput).
        "sampler time ratio (on / off)": windows["ratio"],
        "harness / hand-written loop: time ratio":
            paired("hand-written", "sampler on", "samples_per_s"),
        "harness / hand-written loop: peak memory ratio":
            paired("sampler on", "hand-written", "peak_mib"),
        "harness / Seq2SeqTrainer: throughput ratio":
            paired("sampler on", "Seq2SeqTrainer", "samples_per_s"),
        "harness / Seq2SeqTrainer: peak memory ratio":
            paired("sampler on", "Seq2SeqTrainer", "peak_mib"),
    }
    # The same cell, the same FLOPs per step: MFU is the step's time at peak over its time.
    ideal_s, samples = median["sampler on"]["ideal_step_s"], cfg.train.batch_size
    speed = {"MFU: harness": ideal_s / median["sampler on"]["step_time_mean_s"],
             **{f"MFU: {name}": ideal_s / (samples / median[contender]["samples_per_s"])
                for name, contender in (("Seq2SeqTrainer", "Seq2SeqTrainer"),
                                        ("hand-written loop", "hand-written"))},
             "predicted / measured step time (harness)": paired_value(
                 runs["sampler on"], "predicted_step_s", "step_time_mean_s"),
             "sampler on / off, whole runs (no target: the runs' own spread is wider)": paired(
                 "sampler off", "sampler on", "samples_per_s")}
    write(args, cfg, peak_key, runs, median, ratios, speed, windows)


def paired_value(results: list, numerator: str, denominator: str) -> float:
    return statistics.median(run[numerator] / run[denominator] for run in results)


def write(args, cfg, peak_key, runs, median, ratios, speed, windows) -> None:
    facts = machine()
    device = facts["gpu"] or f"cpu-{facts['cores']}-cores"
    slug = args.stem or device.lower().replace(" ", "-")
    memory_kind = "GPU memory (NVML)" if peak_key == "gpu" else "host RSS"
    lines = [f"# Benchmarks on {device}", "",
             f"`make bench` on {facts['date']}: {facts['cpu']}, {facts['cores']} cores, "
             f"{facts['memory_gib']} GiB, GPU: {facts['gpu'] or 'none'}; Python "
             f"{facts['python']}, torch {facts['torch']}, transformers "
             f"{facts['transformers']}.", "",
             f"Cell: `{' '.join(CELL)} train.max_steps={args.steps}`; {args.repeats} repeats, "
             "each running every contender once (order alternating); a ratio is the median of "
             "the repeats' ratios; throughput without the first "
             f"{cfg.train.throughput_skip_steps} steps; peak memory = {memory_kind}. The "
             "sampler itself used a median "
             f"{median['sampler on']['sampler_cpu_pct']:.2f} % of one core over the cell's "
             "wall time.", "",
             f"The sampler's time ratio is measured in one process (bench/sampler_cost.py): "
             f"{windows['pairs']} pairs of windows of {windows['window_steps']} steps of the "
             f"cell, the sampler (every {windows['interval_ms']:g} ms) running in one window "
             "and stopped in the other, the median pair's ratio (all windows pooled: "
             f"{windows['pooled']:.3f}; pairs from {min(windows['pair_ratios']):.3f} to "
             f"{max(windows['pair_ratios']):.3f}; samples taken in the sampled windows: "
             f"{windows['samples_on']}, in the others: {windows['samples_off']}).", "",
             "| comparison | ratio | target | verdict |", "|---|---:|---:|---|"]
    for name, ratio in ratios.items():
        target, direction = TARGETS[name]
        lines.append(f"| {name} | {ratio:.3f} | {direction} {target} | "
                     f"{verdict(ratio, target, direction)} |")
    lines += ["", "MFU: the step's FLOPs (counted on the harness's simulated step: the same "
              "model, batch and lengths for all three) at this device's peak "
              "(harness/measure/peaks.py), over the median step time; and the time model's "
              "predicted step (harness/estimate/timing.py) over the harness's measured one.", "",
              "| figure | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in speed.items()]
    lines += ["", "| run | samples/s (median) | peak MiB (median) | samples/s, each repeat |",
              "|---|---:|---:|---|"]
    for name, results in runs.items():
        peak = median[name].get("peak_mib")
        lines.append(f"| {name} | {median[name]['samples_per_s']:.1f} | "
                     f"{'' if peak is None else f'{peak:.0f}'} | "
                     + ", ".join(f"{run['samples_per_s']:.1f}" for run in results) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{slug}.md").write_text(text)
    (args.out / f"{slug}.json").write_text(json.dumps(
        {"machine": facts, "cell": [*CELL, f"train.max_steps={args.steps}"], "runs": runs,
         "medians": median, "ratios": ratios, "speed": speed, "sampler_windows": windows},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
