"""The study's table (reference.yaml): the figures the harness must be able to reproduce, for the
report (beside the cells that match a row) and the plan (the estimate against the study's GPU
memory)."""

from pathlib import Path

import pandas as pd
import yaml

PATH = Path(__file__).with_name("reference.yaml")
KEYS = ("model", "method", "precision")  # what makes a cell a row of the table


def load() -> tuple[str, pd.DataFrame]:
    """(where the figures come from, one row per reference row)."""
    figures = yaml.safe_load(PATH.read_text())
    return figures["source"], pd.DataFrame(figures["rows"])


def gpu_mib(model: str, method: str, precision: str) -> float | None:
    """The study's GPU memory for the row this cell matches, None for no row. The study says
    MB; it is read as what nvidia-smi shows (MiB), the unit the harness measures in."""
    _, rows = load()
    found = rows[(rows.model == model) & (rows.method == method) & (rows.precision == precision)]
    return float(found.gpu_memory_mb.iloc[0]) if len(found) else None
