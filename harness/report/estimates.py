"""Another experiment's plan (plan.csv, as `make plan` writes it) as a section of a report: each
cell's estimated peak GPU memory by part, beside the published figure, and whether it fits the
plan's GPU; a table and a stacked chart. The figures are the estimator's (docs/estimator.md),
computed without a GPU, and say so.

`make demo` ends its report with the reference table's plan: on a laptop, the first command shows
what flan-t5 base, large and xl need on the study's A10G, part by part.
"""

from pathlib import Path

import pandas as pd

from harness.core.errors import ConfigError
from harness.report.charts import Chart, stacked

PARTS = {"weights_mib": "weights", "gradients_mib": "gradients",
         "optimizer_mib": "optimizer state", "activations_mib": "activations",
         "allocator_mib": "allocator cache", "cuda_context_mib": "CUDA context"}
NEEDED = ("cell", "fingerprint", "estimate_mib", "gpu", "gpu_mib", "fits", *PARTS)


def read(path: Path) -> pd.DataFrame:
    """The plan's cells that have an estimate, one row per cell, refused with what to do when the
    file is missing or not a plan."""
    if not path.is_file():
        raise ConfigError(f"--plan {path}: no such file; write it first with `make plan "
                          f"EXP=<experiment>` (reports/<experiment>/plan.csv)")
    plan = pd.read_csv(path)
    missing = [column for column in NEEDED if column not in plan.columns]
    if missing:
        raise ConfigError(f"--plan {path}: not a plan as `make plan` writes it today (no "
                          f"column {', '.join(missing)}); write it again with `make plan "
                          f"EXP=<experiment>`")
    return plan.drop_duplicates("fingerprint").dropna(subset=["estimate_mib"]).reset_index(
        drop=True)


def table(plan: pd.DataFrame) -> pd.DataFrame:
    """The section's table: per cell its parts, the estimate, the published figure (and the
    estimate's ratio to it, where the cell runs the published setup), whether it fits."""
    shown = pd.DataFrame({"cell": plan.cell})
    for column, name in PARTS.items():
        shown[name] = plan[column].map(_mib)
    shown["estimate (MiB)"] = plan.estimate_mib.map(_mib)
    published = plan.get("reference_gpu_mib", pd.Series(float("nan"), index=plan.index))
    ratio = plan.get("estimate_ratio", pd.Series(float("nan"), index=plan.index))
    # Without a figure, the plan's reference column holds what the source says instead (an
    # outcome: out of memory), or that the cell runs another setup.
    said = plan.get("reference", pd.Series("", index=plan.index)).fillna("")
    shown["published (MB)"] = [_mib(value) if not pd.isna(value) else
                               "other setup" if said_instead.endswith("other setup") else
                               said_instead or "—"
                               for value, said_instead in zip(published, said)]
    shown["estimate / published"] = ratio.map(lambda value: "—" if pd.isna(value)
                                              else f"{value:.2f}")
    shown[f"fits {_gpu(plan)}"] = plan.fits.fillna("")
    return shown


def section(name: str, plan: pd.DataFrame,
            out: Path) -> tuple[list[str], pd.DataFrame, Chart]:
    """The report's lines for the plan of experiment `name`, its table (table()) and its chart
    (written under `out`)."""
    gpu = _gpu(plan)
    path = out / f"plan_{name}.png"
    stacked(plan.cell, {label: plan[column] for column, label in PARTS.items()}, path,
            f"Estimated peak GPU memory per cell of {name}, by part (an estimate: no GPU ran)",
            marks=plan.get("reference_gpu_mib"), mark_label="published figure",
            limit=(plan.gpu_mib.iloc[0], gpu))
    chart = Chart(f"Estimated GPU memory, {name}", path,
                  f"The estimator's figures (make plan EXP={name}, docs/estimator.md), part by "
                  "part; a cross marks the published figure, the dashed line the memory of "
                  f"the {gpu}.")
    shown = table(plan)
    lines = [f"## Estimated GPU memory: the plan of `{name}`",
             f"What each cell of `{name}` would need on a GPU, estimated here without one "
             f"(`make plan EXP={name}`: each cell's training step simulated on PyTorch's meta "
             f"device, docs/estimator.md), against the {gpu}. Published figures stand beside "
             "the cells that run their setup. These are estimates, not measurements: `make "
             f"sweep EXP={name}` on a GPU measures them.",
             shown.to_markdown(index=False, disable_numparse=True), chart.markdown()]
    return lines, shown, chart


def _gpu(plan: pd.DataFrame) -> str:
    names = plan.gpu.dropna()
    return names.iloc[0] if len(names) else "no GPU named"


def _mib(value) -> str:
    return "—" if pd.isna(value) else f"{value:.0f}"
