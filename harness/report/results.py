"""The report's tables: the results per cell in the reference table's columns (and memory against
full fine-tuning's), the notes on cells that did not end ok, and the cells beside the published
figures they reproduce.
"""

import pandas as pd

from harness.core import reference

TABLE = {  # report column: (cell column, decimals)
    "ROUGE-1": ("rouge1", 2), "ROUGE-2": ("rouge2", 2), "train time (min)": ("train_time_min", 2),
    "cost (USD)": ("cost_usd", 3), "GPU memory (MiB)": ("gpu_peak_mib", 0),
    "GPU estimate (MiB)": ("estimate_gpu_mib", 0), "CPU memory (MiB)": ("cpu_peak_mib", 0),
    # The time model's prediction for the device the cell ran on, and what it achieved.
    "predicted time (min)": ("predicted_train_time_min", 2), "MFU": ("mfu", 3),
}


def _number(value, spread, decimals: int) -> str:
    if pd.isna(value):
        return "—"
    text = f"{value:.{decimals}f}"
    return text if pd.isna(spread) else f"{text} ± {spread:.{decimals}f}"


def table(rows: pd.DataFrame, source: str) -> pd.DataFrame:
    """The report table, formatted."""
    shown = pd.DataFrame({"model": rows.model, "method": rows.method,
                          "precision": rows.precision,
                          "rank": rows["rank"].map(lambda r: "—" if pd.isna(r) else f"{r:.0f}")})
    if "strategy" in rows and (rows.strategy != "single").any():
        # Beyond one GPU: how many ranks, and a distributed cell's GPU memory is its fullest
        # GPU's (harness/measure/traces.py), its CPU memory the host's for all its ranks.
        shown["strategy"] = [strategy if strategy == "single" else f"{strategy} x{ranks:.0f}"
                             for strategy, ranks in zip(rows.strategy, rows.ranks)]
    for name, (column, decimals) in TABLE.items():
        shown[name] = [_number(v, s, decimals) for v, s in zip(rows[column],
                                                                rows[f"{column}_std"])]
    shown[f"{source} memory / full FT"] = rows.memory_vs_full.map(
        lambda ratio: "—" if pd.isna(ratio) else f"{ratio:.2f}")
    shown["trainable %"] = [_number(v, float("nan"), 2) for v in rows.trainable_pct]
    shown["tokens/s"] = [_number(v, s, 0) for v, s in zip(rows.tokens_per_s,
                                                           rows.tokens_per_s_std)]
    shown["tokens/USD"] = [_number(v, float("nan"), 0) for v in rows.train_tokens_per_usd]
    shown["runs"] = rows.runs.astype(str)
    shown["status"] = status_notes(rows)[0]
    return shown


def status_notes(rows: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The status column, kept narrow: `ok`, or the status and a note number; and the notes,
    one per distinct reason, in order."""
    notes, column = [], []
    for status, reason in zip(rows.status, rows.reason):
        if status == "ok" or not reason:
            column.append(status)
            continue
        note = f"{status}: {reason}"
        if note not in notes:
            notes.append(note)
        column.append(f"{status} [{notes.index(note) + 1}]")
    return column, notes


def beside_reference(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok cells that match a published row (model, method, precision), ours beside theirs.
    A table whose GPU figure is torch's allocated peak (peft's) is compared with our allocated
    peak and estimate; the others with the NVML peak and the whole estimate."""
    figures = reference.load()
    figures = figures.rename(columns=lambda c: c if c in reference.KEYS else f"reference_{c}")
    published = ("rouge1", "rouge2", "train_time_min", "gpu_memory_mb", "cpu_memory_mb",
                 "outcome", "gpu_memory_low_mb", "gpu_memory_high_mb")
    figures = figures.reindex(columns=sorted({*figures.columns,
                                              *(f"reference_{name}" for name in published)}))
    matched = _same_setup(rows[rows.status == "ok"].merge(figures, on=list(reference.KEYS)))
    allocated = matched.reference_measure == "allocated"
    for suffix in ("", "_std"):
        matched[f"gpu_mib{suffix}"] = matched[f"gpu_peak_mib{suffix}"].where(
            ~allocated, matched[f"torch_peak_allocated_mib{suffix}"])
    matched["estimate_mib"] = matched.estimate_gpu_mib.where(~allocated,
                                                             matched.estimate_allocated_mib)
    ranges = matched.reference_gpu_memory_low_mb.notna()
    matched["reference_gpu_mib"] = matched.reference_gpu_memory_mb.where(
        ~ranges, (matched.reference_gpu_memory_low_mb + matched.reference_gpu_memory_high_mb) / 2)
    pairs = {"ROUGE-1": ("rouge1", "rouge1", 2), "ROUGE-2": ("rouge2", "rouge2", 2),
             "train time (min)": ("train_time_min", "train_time_min", 2),
             "GPU memory (MiB)": ("gpu_mib", "gpu_memory_mb", 0),
             "CPU memory (MiB)": ("cpu_peak_mib", "cpu_memory_mb", 0)}
    shown = pd.DataFrame({"table": matched.reference_table, "model": matched.model,
                          "method": matched.method, "precision": matched.precision,
                          "rank": matched["rank"].map(lambda r: "—" if pd.isna(r)
                                                      else f"{r:.0f}")})
    for name, (ours, theirs, decimals) in pairs.items():
        shown[name] = [_number(v, s, decimals) for v, s in zip(matched[ours],
                                                                matched[f"{ours}_std"])]
        unit = " (MB)" if "memory" in name else ""
        shown[f"{name.split(' (')[0]}, reference{unit}"] = [
            _published(value, decimals, outcome, low, high) if theirs == "gpu_memory_mb"
            else _published(value, decimals) for value, outcome, low, high in zip(
                matched[f"reference_{theirs}"], matched.reference_outcome,
                matched.reference_gpu_memory_low_mb, matched.reference_gpu_memory_high_mb)]
    # The plan's estimate of this cell beside the published figure (MB read as MiB).
    at = list(shown.columns).index("GPU memory, reference (MB)") + 1
    shown.insert(at, "GPU estimate (MiB)", [_number(v, float("nan"), 0)
                                            for v in matched.estimate_mib])
    shown.insert(at + 1, "estimate / reference", [
        _number(v / reference_mb, float("nan"), 2)
        for v, reference_mb in zip(matched.estimate_mib, matched.reference_gpu_mib)])
    shown.insert(at + 2, "GPU measured as", matched.reference_measure.map(
        {"nvml": "NVML peak", "allocated": "torch allocated peak"}))
    return shown


def _same_setup(matched: pd.DataFrame, same: bool = True) -> pd.DataFrame:
    """The matched cells that run their published row's setup (or, not `same`, those that run
    another: they stand beside no published figure)."""
    other = [bool(reference.differences({"setup": setup}, settings))
             for setup, settings in zip(matched.reference_setup, matched.settings)]
    return matched[pd.Series([flag != same for flag in other], index=matched.index,
                             dtype=bool)]


def other_setups(rows: pd.DataFrame) -> list[str]:
    """A line per ok cell that is a published row's model, method and precision but runs another
    setup: the cell, the table and what differs."""
    figures = reference.load().rename(columns={"setup": "reference_setup"})
    matched = rows[rows.status == "ok"].merge(figures, on=list(reference.KEYS))
    return [f"{row.label} ({row.table}): " + "; ".join(reference.differences(
                {"setup": row.reference_setup}, row.settings))
            for row in _same_setup(matched, same=False).itertuples()]


def _published(value, decimals: int, outcome=float("nan"), low=float("nan"),
               high=float("nan")) -> str:
    """A published figure; a range (low-high) or the words a source gives instead; — for
    none."""
    if not pd.isna(value):
        return f"{value:.{decimals}f}"
    if not pd.isna(low):
        return f"{low:.0f}-{high:.0f}" + (f" ({outcome})" if isinstance(outcome, str) else "")
    return outcome if isinstance(outcome, str) else "—"


def reference_sources(matched: pd.DataFrame) -> str:
    """The sources of the published tables the matched cells come from, one line each."""
    sources = reference.load().drop_duplicates("table").set_index("table").source
    tables = list(dict.fromkeys(matched.table))
    if len(tables) == 1:
        return sources[tables[0]]
    return "; ".join(f"{table}: {sources[table]}" for table in tables)
