"""The published figures (reference.yaml): the study's table the harness must reproduce, peft's
README memory table and the OpenCALM-7B study, for the report (beside the cells that match a
row) and the plan (the estimate against the published GPU memory)."""

from pathlib import Path

import pandas as pd
import yaml

PATH = Path(__file__).with_name("reference.yaml")
KEYS = ("model", "method", "precision")  # what makes a cell a row of a table
# What a table's GPU figure counts, and the part of the estimate that counts the same.
MEASURES = {"nvml": "total", "allocated": "allocated"}


def load() -> pd.DataFrame:
    """One row per published row, with its table's name, source and measure."""
    tables = yaml.safe_load(PATH.read_text())["tables"]
    return pd.DataFrame([{**row, "table": table["name"], "source": table["source"],
                          "measure": table["measure"]}
                         for table in tables for row in table["rows"]])


def row(model: str, method: str, precision: str) -> dict | None:
    """The published row this cell matches, None for none."""
    rows = load()
    found = rows[(rows.model == model) & (rows.method == method) & (rows.precision == precision)]
    return found.iloc[0].to_dict() if len(found) else None


def gpu_mib(model: str, method: str, precision: str) -> float | None:
    """The published GPU memory for the row this cell matches (a range's middle), None for no
    row or no figure. MB are read as what nvidia-smi shows (MiB), the unit the harness measures
    in."""
    found = row(model, method, precision)
    if found is None:
        return None
    figure = found.get("gpu_memory_mb")
    if pd.isna(figure) and not pd.isna(found.get("gpu_memory_low_mb")):
        figure = (found["gpu_memory_low_mb"] + found["gpu_memory_high_mb"]) / 2
    return None if pd.isna(figure) else float(figure)
