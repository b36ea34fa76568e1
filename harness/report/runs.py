"""The cells an experiment's runs make (the runs as harness/tracking/runs.py reads them): ok runs
of one cell (the same params but for the seed and where it ran) as one row, mean and spread; every
run that did not end ok as its own row, with its reason.
"""

import pandas as pd

from harness.config import identity
from harness.core import reference
from harness.report import charts
from harness.strategy.sizes import world_size

# Averaged over the ok runs of a cell; their spread is shown as ± std.
METRICS = ("rouge1", "rouge2", "train_time_s", "gpu_peak_mib", "estimate_gpu_mib",
           "torch_peak_allocated_mib", "estimate_allocated_mib", "cpu_peak_mib",
           "cpu_baseline_mib", "cpu_cell_peak_mib",
           "trainable_pct", "tokens_per_s", "cost_usd", "train_tokens_per_usd", "total_params",
           "mem_params_mib", "mem_grads_mib", "mem_optimizer_mib", "mem_activations_mib",
           "mem_largest_weight_mib",
           "infer_latency_ms_p50", "infer_latency_ms_p50_base", "infer_latency_ms_p50_merged",
           "infer_tokens_per_s", "adapter_size_mib", "full_checkpoint_mib",
           "predicted_train_time_s", "train_flops_per_step", "train_tflops_per_s", "mfu")
# Params that make runs the same cell in the report: all but the seed and where a run was logged
# (or what it was priced at).
NOT_THE_CELL = ("params.train.seed", "params.tracking.", "params.runner.", "params.sampler.",
                "params.cost.")


def memory_source(runs: pd.DataFrame) -> str:
    """"GPU" when the store holds GPU peaks; "host" for a CPU-only store."""
    gpu = runs.get("metrics.gpu_peak_mib")
    return "GPU" if gpu is not None and gpu.notna().any() else "host"


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with its ok runs averaged (metric and metric_std), and one row per run
    that did not finish ok; sorted by model size, method, precision and rank. Keeps run_ids."""
    runs = runs.reindex(columns=sorted({*runs.columns, *(f"metrics.{m}" for m in METRICS),
                                        "params.method.r", "params.method.optimizer",
                                        "params.precision.master_weights",
                                        "params.strategy.name", "params.strategy.nproc_per_node",
                                        "params.strategy.nnodes",
                                        "tags.status", "tags.status_reason"}))
    identity = [column for column in runs.columns if column.startswith("params.")
                and not column.startswith(NOT_THE_CELL)]
    runs["key"] = runs[identity].fillna("").astype(str).agg("|".join, axis=1)
    runs["status"] = runs["tags.status"].fillna("unknown")
    # The cell's own host memory: its peak above what the process held before the model loaded
    # (the interpreter and libraries, the same for every cell); a run logged before
    # cpu_baseline_mib existed keeps its whole peak.
    peak, baseline = (pd.to_numeric(runs[f"metrics.{name}"], errors="coerce")
                      for name in ("cpu_peak_mib", "cpu_baseline_mib"))
    runs["metrics.cpu_cell_peak_mib"] = peak - baseline.fillna(0.0)
    rows = []
    for _, group in runs.groupby("key", sort=False):
        ok = group[group.status == "ok"]
        if len(ok):
            rows.append(_row(ok, "ok", ""))
        for _, run in group[group.status != "ok"].iterrows():
            rows.append(_row(run.to_frame().T, run.status, run["tags.status_reason"]))
    table = pd.DataFrame(rows)
    # Smallest model first; a skipped cell has no parameter count, so take its model's.
    table["model_size"] = table.groupby("model")["total_params"].transform("max")
    table = table.sort_values(["model_size", "model", "method", "precision", "rank", "status"],
                              na_position="first", kind="stable").reset_index(drop=True)
    table["memory_vs_full"] = _relative_to_full(table, memory_source(runs))
    return table


def _row(runs: pd.DataFrame, status: str, reason) -> dict:
    first = runs.iloc[0]
    method = identity.method_label(first["params.method.name"], first["params.method.optimizer"])
    rank = pd.to_numeric(first["params.method.r"], errors="coerce")
    # bf16-pure for a cell without float32 master weights (a run logged before the key: with).
    precision = identity.precision_label(first["params.precision.name"],
                                         first["params.precision.master_weights"] != "False",
                                         first.get("params.precision.autocast") != "False")
    # A run logged before the strategy axis ran in one process.
    strategy = ({"name": "single"} if pd.isna(first["params.strategy.name"]) else
                {"name": first["params.strategy.name"],
                 "nproc_per_node": int(first["params.strategy.nproc_per_node"]),
                 "nnodes": int(first["params.strategy.nnodes"])})
    label = identity.label(first["params.model.name"], first["params.method.name"],
                           first["params.method.optimizer"], None if pd.isna(rank) else int(rank),
                           precision)
    if strategy["name"] != "single":
        label = f"{label}/{identity.strategy_label(strategy)}"
    row = {"model": first["params.model.name"], "method": method, "precision": precision,
           "rank": rank, "strategy": strategy["name"],
           "ranks": world_size(strategy),
           "label": label,
           "runs": len(runs), "status": status, "reason": "" if pd.isna(reason) else reason,
           "run_ids": list(runs["run_id"]),
           # What decides whether a published figure stands beside the cell.
           "settings": {key: first[f"params.{key}"] for key in reference.SETUP_KEYS
                        if not pd.isna(first.get(f"params.{key}"))}}
    for metric in METRICS:
        values = pd.to_numeric(runs[f"metrics.{metric}"], errors="coerce").dropna()
        row[metric] = values.mean() if len(values) else float("nan")
        row[f"{metric}_std"] = values.std() if len(values) > 1 else float("nan")
    for time in ("train_time", "predicted_train_time"):
        row[f"{time}_min"], row[f"{time}_min_std"] = (row[f"{time}_s"] / 60,
                                                      row[f"{time}_s_std"] / 60)
    return row


def _relative_to_full(table: pd.DataFrame, source: str) -> pd.Series:
    """Peak memory over that of full fine-tuning (AdamW; fp32 where it ran) of the same model."""
    memory = table[charts.peak_metric(source)]
    full = table[(table.method == "full") & (table.status == "ok") & memory.notna()]
    order = (full.precision != "fp32").sort_values(kind="stable").index  # fp32 first
    baseline = memory[order].groupby(table.model[order], sort=False).first()
    return memory / table.model.map(baseline)
