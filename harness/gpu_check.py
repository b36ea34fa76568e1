"""`make gpu-check`: the one command that validates the harness on a CUDA GPU.

    python -m harness.gpu_check [--call 1|2|3|4] [--rows base_full,...] [--parts cells,bench]
                                [--out DIR] [--store DIR] [override ...]

On the GPU it runs (parts, each optional, in this order):
- preflight: where every library comes from (packages.txt), and an import of every module of the
  harness and of bench/: a missing or mismatched wheel shows in seconds, before any cell;
- calibrate: what the time model's operations achieve on this GPU (make calibrate; its figures in
  calibration/), so that the cells' predicted step times are priced by them;
- cells: experiments/gpu_check.yaml, one cell per option of experiments/check_row/ (the
  reference table's rows on their recipes, LoRA+LOMO per size, 4-bit QLoRA, 8-bit and paged
  AdamW, an OpenCALM-7B LoRA cell, the strategies), random weights, synthetic data, a few dozen
  steps each, into one MLflow store per device (outputs/gpu-check/<device>/mlflow.db), so that
  rows run in pieces (ROWS=...) add up;
- profile: where a step's time goes, the host's or the kernels' (bench/step_profile.py);
- faults: the fault cases a CUDA cell changes (bench/faults.py --gpu);
- tests: the test suite's gpu-marked tests (tests.txt);
- bench: `make bench` on this GPU, where a per-step host sync shows.
Then it writes reports/gpu-<device>/: runs.csv (one row per cell in the store: measured peaks,
the estimate and its parts, their ratio, the CUDA context it implies, step time, predicted step
time and tokens/s), plan.csv (the same cells' plan against this GPU), timings.csv (each part's
wall time) and report.md. `--call N` is the N-th of the device calls that together make the
whole check (CALLS; docs/gpu-check.md). Overrides go to every cell and the plan. Without CUDA it
refuses at once, unless an override says allow_cpu=true (the rehearsal of gpu/rehearse.py).
"""

import argparse
import csv
import importlib
import importlib.metadata
import pkgutil
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

import harness
from harness.config import grids
from harness.core import tables
from harness.estimate import estimate
from harness.measure import gpus
from harness.report.published import beside as published_beside
from harness.sweep import plan
from harness.tracking.runs import of_experiment

EXPERIMENT = "gpu_check"
PARTS = ("preflight", "calibrate", "cells", "profile", "faults", "tests", "bench")
# The whole check in four device calls of a few minutes each (docs/gpu-check.md): the small
# cells, flan-t5-xl's, the 7B causal cell with the profile, tests and bench, the strategies.
CALLS = {
    "1": ("preflight,calibrate,cells,faults",
          "base_full,base_lora,base_lora_lomo,base_full_adamw_8bit,base_full_paged_adamw_8bit,"
          "base_full_paged_adamw_32bit,large_lora,large_lora_lomo"),
    "2": ("preflight,calibrate,cells",
          "xl_lora,xl_lora_fp16,xl_lora_int8,xl_lora_lomo,xl_lora_nf4"),
    "3": ("preflight,calibrate,cells,profile,tests,bench", "opencalm_7b_lora_bf16"),
    # DDP, FSDP2, ZeRO-3 and ZeRO-3 with offload on one GPU; LOMO and QLoRA under sharding.
    "4": ("preflight,calibrate,cells",
          ",".join([*(f"base_{method}_{strategy}" for method in ("full", "lora")
                      for strategy in ("ddp", "fsdp", "zero3", "zero3_offload")),
                    "base_lomo_zero3", "xl_lora_nf4_fsdp", "xl_lora_nf4_zero3"])),
}
# The test modules with gpu-marked tests (the others import what only CI installs: playwright).
GPU_TESTS = ["tests/test_cells.py", "tests/test_gpu_check.py", "tests/test_memory.py",
             "tests/test_models.py", "tests/test_plan.py", "tests/test_scaling.py"]
# The libraries whose versions decide what a cell measures, first in packages.txt.
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "mlflow-skinny",
             "mlflow", "hydra-core", "datasets", "numpy")
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.15  # an estimate within 15 % of the measured peak passes
# runs.csv: column: the run's param, metric or tag it comes from.
COLUMNS = {
    "model": "params.model.name", "method": "params.method.name",
    "precision": "params.precision.name", "strategy": "params.strategy.name",
    "gradient_checkpointing": "params.train.gradient_checkpointing",
    "attention": "params.model.attn_implementation",
    "source_length": "params.data.source_max_length_resolved",
    "target_length": "params.data.target_max_length_resolved", "status": "tags.status",
    "gpu_peak_mib": "metrics.gpu_peak_mib", "gpu_train_peak_mib": "metrics.gpu_train_peak_mib",
    "torch_peak_allocated_mib": "metrics.torch_train_peak_allocated_mib",
    "torch_peak_reserved_mib": "metrics.torch_train_peak_reserved_mib",
    "estimate_mib": "metrics.estimate_gpu_mib", "cpu_peak_mib": "metrics.cpu_peak_mib",
    "estimate_host_mib": "metrics.estimate_host_mib",
    "mem_optimizer_mib": "metrics.mem_optimizer_mib",
    **{f"estimate_{part}_mib": f"metrics.estimate_{part}_mib" for part in estimate.PARTS},
    "step_time_p50_s": "metrics.step_time_p50_s", "tokens_per_s": "metrics.tokens_per_s",
    # The time model (harness/estimate/timing.py) against the measured step, and the MFU.
    "step_time_mean_s": "metrics.step_time_mean_s", "predicted_step_s": "metrics.predicted_step_s",
    "train_tflops_per_s": "metrics.train_tflops_per_s", "mfu": "metrics.mfu",
    "peaks_device": "tags.peaks_device",
    # The inference benchmark (harness/cell/infer.py): as trained, the base alone, merged.
    **{f"infer_ms_p50{suffix}": f"metrics.infer_latency_ms_p50{suffix}"
       for suffix in ("", "_base", "_merged")},
}


def device_folder(name: str) -> str:
    """reports/ folder name of a GPU: gpu-nvidia-h100-80gb-hbm3."""
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def runs_table(tracking_uri: str) -> pd.DataFrame:
    """One row per cell of the gpu_check experiment in the store (its newest run): what it
    measured beside what the estimate said, and what the difference implies."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    stored = of_experiment(client, found and found.experiment_id).iloc[::-1]  # newest first
    sources = {"tags.mlflow.runName": "cell", "tags.cell": "fingerprint",
               **{source: column for column, source in COLUMNS.items()}}
    table = stored.reindex(columns=list(sources)).rename(columns=sources)
    table = table.drop_duplicates("fingerprint").drop(columns="fingerprint")
    measured = pd.to_numeric(table.gpu_train_peak_mib, errors="coerce")
    estimated = pd.to_numeric(table.estimate_mib, errors="coerce")
    table["measured_over_estimate"] = measured / estimated
    table["within_15_pct"] = (table.measured_over_estimate - 1).abs() <= TOLERANCE
    # NVML's figure less what the allocator reserved: the CUDA context and anything outside
    # PyTorch (the estimate assumes estimate.CUDA_CONTEXT_MIB).
    table["context_mib"] = measured - pd.to_numeric(table.torch_peak_reserved_mib,
                                                    errors="coerce")
    table["measured_over_predicted"] = (pd.to_numeric(table.step_time_mean_s, errors="coerce")
                                        / pd.to_numeric(table.predicted_step_s, errors="coerce"))
    return table.sort_values("cell").reset_index(drop=True)


def report(device: str, runs: pd.DataFrame, folder: Path | None = None) -> str:
    """report.md: the cells, the verdict per cell, the context measured, and (from `folder`)
    the environment the preflight found, where a step's time goes, the bench and how long each
    part took."""
    lines = [f"# GPU check on {device}", "",
             "`make gpu-check`: the reference table's rows on their recipes and LoRA+LOMO per "
             "size, 4-bit QLoRA, 8-bit and paged AdamW, and an OpenCALM-7B LoRA cell "
             "(experiments/check_row/); random weights, synthetic data, a few dozen steps. "
             "Measured: NVML's peak of the cell's processes in the training phase; the "
             "allocator's peaks; the estimate `make plan` gives for the same cell "
             "(docs/estimator.md). An estimate passes when it is within "
             f"{TOLERANCE:.0%} of the measured peak.", ""]
    if runs.empty:
        lines.append("No cells in the store yet: run `make gpu-check PARTS=cells`.")
    else:
        shown = runs[["cell", "gradient_checkpointing", "status", "gpu_train_peak_mib",
                      "estimate_mib", "measured_over_estimate", "torch_peak_allocated_mib",
                      "torch_peak_reserved_mib", "context_mib", "mem_optimizer_mib",
                      "estimate_optimizer_mib", "step_time_p50_s",
                      "tokens_per_s"]].copy()
        shown["verdict"] = [
            "" if pd.isna(ratio) else "within 15 %" if ok else f"off by {ratio - 1:+.0%}"
            for ratio, ok in zip(runs.measured_over_estimate, runs.within_15_pct)]
        lines += [tables.as_text(shown), ""]
        latency = runs[["cell", "infer_ms_p50", "infer_ms_p50_base", "infer_ms_p50_merged"]]
        lines += ["Inference (greedy generation per example, p50 ms; harness/cell/infer.py): as "
                  "trained, the base alone, and merged.", "", tables.as_text(latency), ""]
        speed = runs[["cell", "step_time_mean_s", "predicted_step_s",
                      "measured_over_predicted", "train_tflops_per_s", "mfu"]]
        lines += ["Time (harness/estimate/timing.py): the mean measured step beside the time "
                  "model's prediction for this GPU (priced by its calibration where the "
                  "calibrate part ran, else its datasheet peaks), the achieved TFLOP/s and "
                  "MFU. The measured / predicted ratio is what `make plan` corrects by once "
                  "these runs are in the store.", "", tables.as_text(speed), ""]
        passed = int(runs.within_15_pct.sum())
        lines.append(f"{passed} of {len(runs)} cells within {TOLERANCE:.0%} of the estimate; "
                     f"median CUDA context {runs.context_mib.median():.0f} MiB (the estimate "
                     f"assumes {estimate.CUDA_CONTEXT_MIB}).")
        published = published_beside(runs)
        if len(published):
            lines += ["", "## Published figures, measured on this GPU", "",
                      "`make validity`'s GPU side: the cells that are rows of a published table "
                      "(harness/core/reference.yaml), measured here as the source measured "
                      "(NVML's peak, or torch's allocated peak), beside the published figure and "
                      "the estimate. The check rows run the rows' recipes on synthetic data of "
                      "the same lengths.", "", tables.as_text(published)]
    packages = None if folder is None else folder / "packages.txt"
    if packages is not None and packages.exists():
        found = packages.read_text().splitlines()
        lines += ["", "## Environment", "", f"Preflight: {found[0].lstrip('# ')}.", "",
                  *[f"- {line}" for line in found[1:] if line.split("==")[0] in LIBRARIES]]
    timings = None if folder is None else folder / "timings.csv"
    if timings is not None and timings.exists():
        lines += ["", "## Time per part (wall clock, seconds)", "",
                  tables.as_text(pd.read_csv(timings, dtype=str, keep_default_na=False))]
    for name, title in (("profile.md", "Where a step's time goes"), ("bench.md", "Benchmarks")):
        if folder is not None and (folder / name).exists():
            lines += ["", f"## {title} on this GPU", "",
                      (folder / name).read_text().split("\n", 2)[2].strip()]
    return "\n".join(lines) + "\n"


def preflight(out: Path) -> list[str]:
    """packages.txt: every distribution Python sees, its version and where it lies (the
    wheelhouse's target or the machine's own site-packages), the deciding libraries first; and
    an import of every module of the harness and of bench/. Returns the modules that failed."""
    seen = {}
    for dist in importlib.metadata.distributions():  # first on sys.path wins, as for imports
        seen.setdefault(dist.metadata["Name"].lower(), (dist.version, str(dist.locate_file(""))))
    failed = []
    modules = [info.name for info in pkgutil.walk_packages(harness.__path__, "harness.")]
    bench = ["bench.baselines", "bench.run", "bench.sampler_cost"]
    for name in [*modules, *bench]:
        try:
            importlib.import_module(name)
        except Exception:  # any failure to import is what the preflight is for
            failed.append(name)
            print(f"[gpu-check] cannot import {name}:\n{traceback.format_exc()}",
                  file=sys.stderr)
    import torch

    lines = [f"# python {platform.python_version()}, torch {torch.__version__} (CUDA "
             f"{torch.version.cuda}), imports: {len(modules) + len(bench) - len(failed)} modules ok"
             + (f", failed: {', '.join(failed)}" if failed else "")]
    ordered = [name for name in LIBRARIES if name in seen] + sorted(set(seen) - set(LIBRARIES))
    lines += [f"{name}=={seen[name][0]}  {seen[name][1]}" for name in ordered]
    (out / "packages.txt").write_text("\n".join(lines) + "\n")
    print(f"[gpu-check] preflight: {lines[0][2:]}; {len(seen)} packages in {out}/packages.txt")
    return failed


def record_time(out: Path, part: str, rows: str | None, seconds: float, returncode: int) -> None:
    """One row of timings.csv per part run: how long each took on this device."""
    path = out / "timings.csv"
    new = not path.exists()
    with path.open("a", newline="") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(["part", "rows", "seconds", "returncode", "finished"])
        writer.writerow([part, rows or "", f"{seconds:.1f}", returncode,
                         time.strftime("%Y-%m-%dT%H:%M:%S")])


def run_part(part: str, out: Path, cell_overrides: list[str]) -> int:
    """One part; its exit status (0: done). `cell_overrides` pick the rows and the store."""
    if part == "preflight":
        return 1 if preflight(out) else 0
    if part == "calibrate":
        # The time model's rates on this GPU: in the user's cache for the cells that follow, and
        # in the report's folder. A rehearsal on a CPU keeps the machine's cache as it was.
        import torch

        caches = [["--cache", str(out / "calibration")]] + ([[]] if torch.cuda.is_available()
                                                            else [])
        return max(subprocess.run([sys.executable, "-m", "harness.measure.calibration",
                                   *cache]).returncode for cache in caches)
    if part == "cells":
        return subprocess.run([sys.executable, "-m", "harness", "-cd", str(grids.EXPERIMENTS),
                               "-cn", EXPERIMENT, *cell_overrides]).returncode
    if part == "profile":  # where a step's time goes: the host's per op call, the kernels'
        return subprocess.run([sys.executable, str(REPO / "bench" / "step_profile.py"), "--out",
                               str(out), *cell_overrides]).returncode
    if part == "faults":  # a runner SIGKILLed and a tracking outage, with CUDA cells
        return subprocess.run([sys.executable, str(REPO / "bench" / "faults.py"), "--gpu",
                               "--out", str(out), *(["--allow-cpu"] if "allow_cpu=true" in
                                                    cell_overrides else [])]).returncode
    if part == "tests":
        with (out / "tests.txt").open("w") as log:
            return subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-rA", "-q",
                                   "-p", "no:cacheprovider", *GPU_TESTS], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
    return subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--out", str(out),
                           "--stem", "bench", "--repeats", "2"]).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--call", choices=sorted(CALLS),
                        help="the N-th of the device calls that make the whole check: its parts "
                             "and rows (docs/gpu-check.md)")
    parser.add_argument("--rows", help="cells to run, options of experiments/check_row/, "
                                       "comma-separated (default: all of them)")
    parser.add_argument("--parts", help=f"what to run, comma-separated: {', '.join(PARTS)} "
                                        "(default: all)")
    parser.add_argument("--out", type=Path, help="the report's folder (reports/gpu-<device>)")
    parser.add_argument("--store", type=Path,
                        help="the MLflow store's folder (outputs/gpu-check/<device>)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell and the plan")
    args = parser.parse_args(argv)
    call_parts, call_rows = CALLS[args.call] if args.call else (",".join(PARTS), None)
    parts_text, rows = args.parts or call_parts, args.rows or call_rows
    parts = parts_text.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"error: --parts {parts_text}: unknown {', '.join(sorted(unknown))}; expected "
              f"some of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch  # here: the argument errors above need no CUDA

    on_cpu = "allow_cpu=true" in args.overrides
    if not torch.cuda.is_available() and not on_cpu:
        print("error: make gpu-check measures the harness on a CUDA GPU, and this machine has "
              "none (torch.cuda.is_available() is False). Without a GPU, `make plan "
              "EXP=reference_table` gives the estimates, and `make demo` runs the CPU grid.",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    folder = device_folder(device)
    out = args.out or Path("reports") / folder
    store = args.store or Path("outputs") / "gpu-check" / folder
    out.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    cell_overrides = [*([f"+check_row={rows}"] if rows else []),
                      f"tracking.uri=sqlite:///{store}/mlflow.db", f"cache_dir={store}/cache",
                      *args.overrides]
    failed = []
    for part in [part for part in PARTS if part in parts]:  # preflight first, bench last
        started = time.perf_counter()
        returncode = run_part(part, out, cell_overrides)
        record_time(out, part, rows if part == "cells" else None,
                    time.perf_counter() - started, returncode)
        if returncode:
            failed.append(part)
            if part == "preflight":  # nothing after it would import
                break
    jobs = grids.compose_experiment(EXPERIMENT, cell_overrides)
    found = gpus.describe(gpus.candidates(jobs[0].runner.gpus))
    plan.plan(jobs, found, create_experiment=False).to_csv(out / "plan.csv", index=False)
    runs = runs_table(f"sqlite:///{store}/mlflow.db")
    runs.to_csv(out / "runs.csv", index=False)
    (out / "report.md").write_text(report(device, runs, out))
    print(f"[harness] wrote {out}/report.md, runs.csv, plan.csv"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
