"""The report: one markdown table per experiment, read from MLflow alone (nothing is rerun).

    python -m harness.report --experiment demo [--tracking-uri sqlite:///mlflow.db] [--out DIR]

writes DIR/report.md (default reports/<experiment>/): a row per run with the reference table's
columns (model, method, precision, rank, ROUGE-1, ROUGE-2, train time, GPU and CPU memory) and the
status, with the reason for every cell that did not finish ok.
"""

import argparse
import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from harness import config
from harness.errors import ConfigError

DEFAULT_URI = "sqlite:///mlflow.db"
COLUMNS = {  # report column: (MLflow column, how to format it)
    "model": ("params.model.name", str),
    "method": ("method", str),  # config.method_label: full, full-sgd, lora, lomo, lora_lomo
    "precision": ("params.precision.name", str),
    "rank": ("params.method.r", str),
    "ROUGE-1": ("metrics.rouge1", "{:.2f}".format),
    "ROUGE-2": ("metrics.rouge2", "{:.2f}".format),
    "train time (min)": ("metrics.train_time_s", lambda s: f"{s / 60:.2f}"),
    "GPU memory (MiB)": ("metrics.gpu_peak_mib", "{:.0f}".format),
    "CPU memory (MiB)": ("metrics.cpu_peak_mib", "{:.0f}".format),
}


def load_runs(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """Every run of the experiment, one row each, columns as mlflow.search_runs names them."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no experiment {experiment!r} in {tracking_uri}; it has "
                          f"{', '.join(names) or 'none'}: run `make sweep EXP={experiment}` "
                          "first, or pass --tracking-uri")
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs([found.experiment_id], output_format="pandas")


def table(runs: pd.DataFrame) -> pd.DataFrame:
    """The report table: formatted cells, sorted by model size, method, precision and rank."""
    rows = runs.reindex(columns=[*{source for source, _ in COLUMNS.values()},
                                 "params.method.name", "params.method.optimizer",
                                 "metrics.total_params", "tags.status", "tags.status_reason"])
    rows["method"] = [config.method_label(name, optimizer) for name, optimizer in
                      zip(rows["params.method.name"], rows["params.method.optimizer"])]
    # Smallest model first; a skipped cell has no parameter count, so take its model's.
    model_size = rows.groupby("params.model.name", dropna=False)["metrics.total_params"] \
        .transform("max")
    rank = pd.to_numeric(rows["params.method.r"], errors="coerce")
    order = pd.DataFrame({"size": model_size, "model": rows["params.model.name"],
                          "method": rows["method"],
                          "precision": rows["params.precision.name"], "rank": rank})
    rows = rows.loc[order.sort_values(list(order.columns), na_position="first").index]
    report = pd.DataFrame({name: [fmt(v) if pd.notna(v) else "—" for v in rows[source]]
                           for name, (source, fmt) in COLUMNS.items()})
    report["status"] = [status if status == "ok" or pd.isna(reason) else f"{status}: {reason}"
                        for status, reason in zip(rows["tags.status"].fillna("unknown"),
                                                  rows["tags.status_reason"])]
    return report


def render(experiment: str, runs: pd.DataFrame) -> str:
    body = table(runs).to_markdown(index=False, disable_numparse=True) if len(runs) else "No runs."
    return (f"# Experiment `{experiment}`\n\n"
            f"{len(runs)} runs. ROUGE is F1 x 100 on the test split; train time is the training "
            "loop alone; GPU memory is the NVML peak of the cell's processes (— without CUDA); "
            "CPU memory is the peak RSS of the cell's process tree.\n\n"
            f"{body}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="the MLflow experiment to report")
    parser.add_argument("--tracking-uri", default=DEFAULT_URI,
                        help=f"the MLflow store (default {DEFAULT_URI})")
    parser.add_argument("--out", help="output folder (default reports/<experiment>)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.experiment, args.tracking_uri)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("reports") / args.experiment)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render(args.experiment, runs))
    print(f"wrote {out / 'report.md'} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
