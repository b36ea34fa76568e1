"""`make gpu-check`: the one command that validates the harness on a CUDA GPU.

    python -m harness.gpu_check [--rows base_full,xl_lora_nf4] [--parts cells,bench]

On the GPU it runs (parts, each optional):
- cells: experiments/gpu_check.yaml, one cell per option of experiments/check_row/: the
  reference table's rows on their recipes plus LoRA+LOMO for each size, then 4-bit QLoRA,
  bitsandbytes' 8-bit and paged AdamW, and an OpenCALM-7B LoRA cell, with random weights and
  synthetic data, for a few dozen steps (each with its inference benchmark), into one MLflow
  store per device (outputs/gpu-check/<device>/mlflow.db), so that rows run in pieces (ROWS=...)
  add up;
- bench: `make bench` on this GPU (sampler on / off, harness vs a hand-written loop and
  Seq2SeqTrainer), where a per-step host sync shows.
Then it writes reports/gpu-<device>/: runs.csv (one row per cell in the store: measured GPU peak,
the allocator's peaks, the estimate and its parts, their ratio, the CUDA context it implies, step
time and tokens/s), plan.csv (the plan of the same cells against this GPU) and report.md. Without
CUDA it refuses at once.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from harness import config, estimate, gpus, plan

EXPERIMENT = "gpu_check"
PARTS = ("cells", "bench")
TOLERANCE = 0.15  # an estimate within 15 % of the measured peak passes
# runs.csv: column: the run's param, metric or tag it comes from.
COLUMNS = {
    "model": "params.model.name", "method": "params.method.name",
    "precision": "params.precision.name",
    "gradient_checkpointing": "params.train.gradient_checkpointing",
    "attention": "params.model.attn_implementation",
    "source_length": "params.data.source_max_length_resolved",
    "target_length": "params.data.target_max_length_resolved", "status": "tags.status",
    "gpu_peak_mib": "metrics.gpu_peak_mib", "gpu_train_peak_mib": "metrics.gpu_train_peak_mib",
    "torch_peak_allocated_mib": "metrics.torch_train_peak_allocated_mib",
    "torch_peak_reserved_mib": "metrics.torch_train_peak_reserved_mib",
    "estimate_mib": "metrics.estimate_gpu_mib",
    "mem_optimizer_mib": "metrics.mem_optimizer_mib",
    **{f"estimate_{part}_mib": f"metrics.estimate_{part}_mib" for part in estimate.PARTS},
    "step_time_p50_s": "metrics.step_time_p50_s", "tokens_per_s": "metrics.tokens_per_s",
    # The inference benchmark (harness/infer.py): as trained, the base alone, merged.
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
    runs = [] if found is None else client.search_runs([found.experiment_id],
                                                       order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        fields = {"params": run.data.params, "metrics": run.data.metrics, "tags": run.data.tags}
        row = {"cell": run.info.run_name, "fingerprint": run.data.tags.get("cell")}
        for column, source in COLUMNS.items():
            kind, name = source.split(".", 1)
            row[column] = fields[kind].get(name)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["cell", "fingerprint", *COLUMNS])
    table = table.drop_duplicates("fingerprint").drop(columns="fingerprint")
    measured = pd.to_numeric(table.gpu_train_peak_mib, errors="coerce")
    estimated = pd.to_numeric(table.estimate_mib, errors="coerce")
    table["measured_over_estimate"] = measured / estimated
    table["within_15_pct"] = (table.measured_over_estimate - 1).abs() <= TOLERANCE
    # NVML's figure less what the allocator reserved: the CUDA context and anything outside
    # PyTorch (the estimate assumes estimate.CUDA_CONTEXT_MIB).
    table["context_mib"] = measured - pd.to_numeric(table.torch_peak_reserved_mib,
                                                    errors="coerce")
    return table.sort_values("cell").reset_index(drop=True)


def report(device: str, runs: pd.DataFrame, bench_md: Path | None) -> str:
    """report.md: the cells, the verdict per cell, the context measured, the bench."""
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
        lines += [plan.as_text(shown), ""]
        latency = runs[["cell", "infer_ms_p50", "infer_ms_p50_base", "infer_ms_p50_merged"]]
        lines += ["Inference (greedy generation per example, p50 ms; harness/infer.py): as "
                  "trained, the base alone, and merged.", "", plan.as_text(latency), ""]
        passed = int(runs.within_15_pct.sum())
        lines.append(f"{passed} of {len(runs)} cells within {TOLERANCE:.0%} of the estimate; "
                     f"median CUDA context {runs.context_mib.median():.0f} MiB (the estimate "
                     f"assumes {estimate.CUDA_CONTEXT_MIB}).")
    if bench_md is not None and bench_md.exists():
        lines += ["", "## Benchmarks on this GPU", "",
                  bench_md.read_text().split("\n", 2)[2].strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.gpu_check",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="cells to run, options of experiments/check_row/, "
                                       "comma-separated (default: all of them)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"what to run, comma-separated: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        print(f"error: --parts {args.parts}: unknown {', '.join(sorted(unknown))}; expected "
              f"some of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch  # here: the argument errors above need no CUDA

    if not torch.cuda.is_available():
        print("error: make gpu-check measures the harness on a CUDA GPU, and this machine has "
              "none (torch.cuda.is_available() is False). Without a GPU, `make plan "
              "EXP=reference_table` gives the estimates, and `make demo` runs the CPU grid.",
              file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    folder = device_folder(device)
    out, store = Path("reports") / folder, Path("outputs") / "gpu-check" / folder
    out.mkdir(parents=True, exist_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    tracking = [f"tracking.uri=sqlite:///{store}/mlflow.db", f"cache_dir={store}/cache"]
    rows = [f"+check_row={args.rows}"] if args.rows else []
    if "cells" in parts:
        subprocess.run([sys.executable, "-m", "harness", "-cd", str(plan.EXPERIMENTS), "-cn",
                        EXPERIMENT, *rows, *tracking], check=True)
    if "bench" in parts:
        subprocess.run([sys.executable, str(config.CONF_DIR.parent / "bench" / "run.py"),
                        "--out", str(out), "--stem", "bench", "--repeats", "3"], check=True)
    jobs = plan.compose_experiment(EXPERIMENT, [*rows, *tracking])
    found = gpus.describe(gpus.candidates(jobs[0].runner.gpus))
    plan.plan(jobs, found, create_experiment=False).to_csv(out / "plan.csv", index=False)
    runs = runs_table(f"sqlite:///{store}/mlflow.db")
    runs.to_csv(out / "runs.csv", index=False)
    (out / "report.md").write_text(report(device, runs, out / "bench.md"))
    print(f"[harness] wrote {out}/report.md, runs.csv, plan.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
