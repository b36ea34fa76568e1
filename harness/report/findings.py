"""What the report says in words, computed from the rows: the set-up, the findings per method
against full fine-tuning, and the recommendation per GPU budget.
"""

import pandas as pd

from harness.config import cost
from harness.report import charts

# The recommendation's GPU budgets, in GB as cards are sold (GB x 1024 MiB), and GPU counts.
BUDGETS_GB = (16, 24, 40, 80)
GPU_COUNTS = (1, 2, 4, 8)


def setup(runs: pd.DataFrame) -> str:
    """What ran, in words, before any number: the models and their weights, the data, the
    devices."""
    runs = runs.reindex(columns=sorted({*runs.columns, "params.model.name", "params.model.source",
                                        "params.data.name", "tags.device"}))
    weights = {"hub": " (weights from the hub)", "random": " (random weights)", "": ""}
    models = [f"{name}{weights.get(source, f' (weights from {source})')}" for name, source in
              sorted(set(zip(runs["params.model.name"], runs["params.model.source"].fillna(""))))
              if isinstance(name, str)]
    data = sorted(set(runs["params.data.name"].dropna()))
    devices = sorted(set(runs["tags.device"].dropna()))
    return (f"What ran: {', '.join(models)}; data {', '.join(data) or 'unknown'}; on "
            f"{', '.join(devices) or 'a device the runs do not record'}.")


def toy_runs(runs: pd.DataFrame, source: str) -> bool:
    """Whether the runs are random-init models on a CPU: they show the harness works, not how the
    methods compare."""
    return source == "host" and set(runs.get("params.model.source", pd.Series())) == {"random"}


def findings(rows: pd.DataFrame, source: str, toy: bool = False) -> list[str]:
    """Sentences the runs support, each computed from them; none where the data is missing, and
    no comparison where the runs cannot show one (`toy`)."""
    ok = rows[rows.status == "ok"]
    memory = charts.peak_metric(source)
    said = []
    if toy:
        said.append("These runs are random-init models trained for a few steps on a CPU: they "
                    "show the harness working end to end, not how the methods compare. Their "
                    "ROUGE and host memory are not results; for those, run an experiment on a "
                    "GPU with real weights (make sweep EXP=reference_table).")
        ok = ok.iloc[:0]
    for model, cells_of_model in ok.groupby("model", sort=False):
        full = cells_of_model[(cells_of_model.method == "full")
                              & (cells_of_model.precision == "fp32")]
        if len(full) != 1:
            continue
        full = full.iloc[0]
        for _, cell in cells_of_model[cells_of_model.precision == "fp32"].iterrows():
            if cell.method == "full" or pd.isna(cell[memory]):
                continue
            change = ("" if pd.isna(cell.rouge1) or pd.isna(full.rouge1)
                      else f" at a ROUGE-1 change of {cell.rouge1 - full.rouge1:+.2f} points")
            said.append(f"On {model}, {cell.label.split('/', 1)[1]} needs "
                        f"{100 * cell[memory] / full[memory]:.0f} % of full fine-tuning's "
                        f"{charts.memory_name(source)} ({cell[memory]:.0f} vs "
                        f"{full[memory]:.0f} MiB){change}.")
    front = charts.pareto_front(ok.dropna(subset=[memory, "rouge1"]), memory, "rouge1")
    if len(front):
        said.append("On the ROUGE-1 / peak memory Pareto front (no other cell is both better "
                    "and smaller): " + ", ".join(front.label) + ".")
    rates = ok.dropna(subset=["tokens_per_s"])
    if len(rates):
        fastest = rates[rates.tokens_per_s == rates.tokens_per_s.max()]
        said.append(f"Highest training throughput: {', '.join(fastest.label)} at "
                    f"{fastest.tokens_per_s.iloc[0]:.0f} tokens/s.")
    priced = ok.dropna(subset=["train_tokens_per_usd"])
    if len(priced):
        most = priced.loc[priced.train_tokens_per_usd.idxmax()]
        study = "; ".join(f"{where}: {tokens / 1000:,.0f}K" for where, tokens in
                          cost.STUDY_TOKENS_PER_USD.items())
        said.append(f"Most training tokens per US dollar: {most.label} at "
                    f"{most.train_tokens_per_usd / 1000:,.0f}K ({study}).")
    other = rows[rows.status != "ok"]
    if len(other):
        counts = other.status.value_counts().sort_index()
        said.append(f"{len(other)} of {len(rows)} rows did not finish ok: "
                    + ", ".join(f"{n} {status}" for status, n in counts.items()) + ".")
    return said


def recommendation(rows: pd.DataFrame) -> pd.DataFrame:
    """Per GPU budget: the cell with the best ROUGE-1 whose peak fits it, and the cheapest cell
    within 1 ROUGE-1 point of that one (by cost, else by training time). A cell's peak is its
    measured GPU peak, else its estimate, marked as such."""
    ok = _with_peaks(rows)
    by = "cost_usd" if ok.cost_usd.notna().all() and len(ok) else "train_time_s"
    chosen = []
    for budget in BUDGETS_GB:
        fits = ok[ok.peak <= budget * 1024]
        if not len(fits):
            chosen.append({"GPU budget": f"{budget} GB", "best ROUGE-1": "no cell fits"})
            continue
        best = fits.loc[fits.rouge1.idxmax()]
        near = fits[fits.rouge1 >= best.rouge1 - 1]
        cheapest = near.loc[near[by].idxmin()]
        chosen.append({"GPU budget": f"{budget} GB", "best ROUGE-1": _choice(best),
                       "cheapest within 1 point": _choice(cheapest, by)})
    return pd.DataFrame(chosen)


def per_gpu_count(rows: pd.DataFrame) -> pd.DataFrame:
    """For 1, 2, 4 and 8 GPUs of each budget: the cell with the best ROUGE-1 that runs on at most
    that many (a distributed cell on one GPU per rank) with its fullest GPU's peak within the
    budget; its host memory beside it (offload lives there). Empty where no cell ran on more
    than one GPU."""
    if "ranks" not in rows or not (rows[rows.status == "ok"].ranks > 1).any():
        return pd.DataFrame()
    ok = _with_peaks(rows)
    chosen = []
    for count in GPU_COUNTS:
        row = {"GPUs": count}
        for budget in BUDGETS_GB:
            fits = ok[(ok.ranks <= count) & (ok.peak <= budget * 1024)]
            if not len(fits):
                row[f"{budget} GB each"] = "no cell fits"
                continue
            best = fits.loc[fits.rouge1.idxmax()]
            row[f"{budget} GB each"] = (f"{_choice(best)}, host {best.cpu_peak_mib:.0f} MiB"
                                        if not pd.isna(best.cpu_peak_mib) else _choice(best))
        chosen.append(row)
    return pd.DataFrame(chosen)


def _with_peaks(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok cells with a ROUGE-1 and a peak: their measured GPU peak, else their estimate
    (`measured` says which)."""
    ok = rows[(rows.status == "ok") & rows.rouge1.notna()].copy()
    ok["peak"] = ok.gpu_peak_mib.fillna(ok.estimate_gpu_mib)
    ok["measured"] = ok.gpu_peak_mib.notna()
    return ok.dropna(subset=["peak"])


def _choice(cell, by: str | None = None) -> str:
    peak = f"{cell.peak:.0f} MiB" + ("" if cell.measured else " (estimate)")
    price = "" if by is None else (f", {cell.cost_usd:.3f} USD" if by == "cost_usd" else
                                  f", {cell.train_time_s / 60:.2f} min")
    return f"{cell.label}: {cell.rouge1:.2f}, {peak}{price}"
