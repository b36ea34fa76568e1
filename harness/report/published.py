"""The published figures (harness/core/reference.yaml) beside what a GPU measured of the same
cells: make validity's GPU side, in the GPU check's report (harness/gpu_check.py)."""

import pandas as pd

from harness.core import reference


def beside(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that are rows of a published table: the figure, what this GPU measured of the
    same kind, the estimate of it, and both ratios to the figure."""
    found = []
    for row in runs.itertuples():
        model, method, precision = row.cell.split("/")[:3]
        method = method.split("-r")[0]
        strategy = "single" if pd.isna(row.strategy) else row.strategy
        published = reference.row(model, method, precision, strategy)
        figure = reference.gpu_mib(model, method, precision, strategy)
        if figure is None:
            continue
        tensors = published["measure"] == "allocated"
        measured = pd.to_numeric(row.torch_peak_allocated_mib if tensors
                                 else row.gpu_train_peak_mib, errors="coerce")
        estimated = pd.to_numeric(row.estimate_mib, errors="coerce")
        if tensors:  # the estimate's tensors: its total less the allocator and the context
            estimated -= (pd.to_numeric(row.estimate_allocator_mib, errors="coerce")
                          + pd.to_numeric(row.estimate_cuda_context_mib, errors="coerce"))
        found.append({"cell": row.cell, "table": published["table"],
                      "measure": published["measure"], "published_mib": figure,
                      "measured_mib": measured, "measured_over_published": measured / figure,
                      "estimate_over_published": estimated / figure})
    return pd.DataFrame(found)
