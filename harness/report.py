"""The report: tables, charts and a slide deck per experiment, read from MLflow alone (nothing is
rerun), the same bytes for the same store.

    python -m harness.report --experiment demo [--tracking-uri sqlite:///mlflow.db] [--out DIR]

writes to DIR (default reports/<experiment>/):
- report.md: the comparison table in the reference table's shape (model, method, precision,
  rank, ROUGE-1, ROUGE-2, train time, GPU and CPU memory) plus memory relative to full
  fine-tuning of the same model, trainable %, tokens/s, the number of runs and the status; the
  reference figures beside the cells that match a reference row; the findings; the charts.
  Several ok runs of one cell (seeds, reruns) show as mean ± std; every cell that did not finish
  ok is shown with its reason, never dropped.
- the charts (harness/charts.py) and slides.md, a Marp deck (harness/slides.py).
"""

import argparse
import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from harness import charts, claims, config, cost, reference, slides
from harness.errors import ConfigError

DEFAULT_URI = "sqlite:///mlflow.db"
# Averaged over the ok runs of a cell; their spread is shown as ± std.
METRICS = ("rouge1", "rouge2", "train_time_s", "gpu_peak_mib", "estimate_gpu_mib",
           "torch_peak_allocated_mib", "estimate_allocated_mib", "cpu_peak_mib",
           "trainable_pct", "tokens_per_s", "cost_usd", "train_tokens_per_usd", "total_params",
           "mem_params_mib", "mem_grads_mib", "mem_optimizer_mib", "mem_activations_mib",
           "infer_latency_ms_p50", "infer_latency_ms_p50_base", "infer_latency_ms_p50_merged",
           "infer_tokens_per_s", "adapter_size_mib", "full_checkpoint_mib")
# Params that make runs the same cell in the report: all but the seed and where a run was logged
# (or what it was priced at).
NOT_THE_CELL = ("params.train.seed", "params.tracking.", "params.runner.", "params.sampler.",
                "params.cost.")
TABLE = {  # report column: (cell column, decimals)
    "ROUGE-1": ("rouge1", 2), "ROUGE-2": ("rouge2", 2), "train time (min)": ("train_time_min", 2),
    "cost (USD)": ("cost_usd", 3), "GPU memory (MiB)": ("gpu_peak_mib", 0),
    "GPU estimate (MiB)": ("estimate_gpu_mib", 0), "CPU memory (MiB)": ("cpu_peak_mib", 0),
}
# The recommendation's GPU budgets, in GB as cards are sold (GB x 1024 MiB).
BUDGETS_GB = (16, 24, 40, 80)


def load_runs(experiment: str, tracking_uri: str) -> pd.DataFrame:
    """Every run of the experiment, one row each, columns as mlflow.search_runs names them,
    oldest first."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no experiment {experiment!r} in {tracking_uri}; it has "
                          f"{', '.join(names) or 'none'}: run `make sweep EXP={experiment}` "
                          "first, or pass --tracking-uri")
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs([found.experiment_id], output_format="pandas")
    return runs.sort_values(["start_time", "run_id"]).reset_index(drop=True) if len(runs) else runs


def memory_source(runs: pd.DataFrame) -> str:
    """"GPU" when the store holds GPU peaks; "host" for a CPU-only store."""
    gpu = runs.get("metrics.gpu_peak_mib")
    return "GPU" if gpu is not None and gpu.notna().any() else "host"


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with its ok runs averaged (metric and metric_std), and one row per run
    that did not finish ok; sorted by model size, method, precision and rank. Keeps run_ids."""
    runs = runs.reindex(columns=sorted({*runs.columns, *(f"metrics.{m}" for m in METRICS),
                                        "params.method.r", "params.method.optimizer",
                                        "tags.status", "tags.status_reason"}))
    identity = [column for column in runs.columns if column.startswith("params.")
                and not column.startswith(NOT_THE_CELL)]
    runs["key"] = runs[identity].fillna("").astype(str).agg("|".join, axis=1)
    runs["status"] = runs["tags.status"].fillna("unknown")
    rows = []
    for key, group in runs.groupby("key", sort=False):
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
    method = config.method_label(first["params.method.name"], first["params.method.optimizer"])
    rank = pd.to_numeric(first["params.method.r"], errors="coerce")
    row = {"model": first["params.model.name"], "method": method,
           "precision": first["params.precision.name"], "rank": rank,
           "label": (f"{first['params.model.name']}/{method}"
                     + ("" if pd.isna(rank) else f"-r{rank:.0f}")
                     + f"/{first['params.precision.name']}"),
           "runs": len(runs), "status": status, "reason": "" if pd.isna(reason) else reason,
           "run_ids": list(runs["run_id"])}
    for metric in METRICS:
        values = pd.to_numeric(runs[f"metrics.{metric}"], errors="coerce").dropna()
        row[metric] = values.mean() if len(values) else float("nan")
        row[f"{metric}_std"] = values.std() if len(values) > 1 else float("nan")
    row["train_time_min"], row["train_time_min_std"] = (row["train_time_s"] / 60,
                                                        row["train_time_s_std"] / 60)
    return row


def _relative_to_full(table: pd.DataFrame, source: str) -> pd.Series:
    """Peak memory over that of full fine-tuning (AdamW; fp32 where it ran) of the same model."""
    memory = table[charts.peak_metric(source)]
    full = table[(table.method == "full") & (table.status == "ok") & memory.notna()]
    order = (full.precision != "fp32").sort_values(kind="stable").index  # fp32 first
    baseline = memory[order].groupby(table.model[order], sort=False).first()
    return memory / table.model.map(baseline)


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
    matched = rows[rows.status == "ok"].merge(figures, on=list(reference.KEYS))
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
                        f"{source} memory ({cell[memory]:.0f} vs {full[memory]:.0f} MiB)"
                        f"{change}.")
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
    ok = rows[(rows.status == "ok") & rows.rouge1.notna()].copy()
    ok["peak"] = ok.gpu_peak_mib.fillna(ok.estimate_gpu_mib)
    ok["measured"] = ok.gpu_peak_mib.notna()
    ok = ok.dropna(subset=["peak"])
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


def _choice(cell, by: str | None = None) -> str:
    peak = f"{cell.peak:.0f} MiB" + ("" if cell.measured else " (estimate)")
    price = "" if by is None else (f", {cell.cost_usd:.3f} USD" if by == "cost_usd" else
                                  f", {cell.train_time_s / 60:.2f} min")
    return f"{cell.label}: {cell.rouge1:.2f}, {peak}{price}"


def histories(client: MlflowClient, rows: pd.DataFrame, names: tuple) -> dict:
    """{label: {metric: [(step, value), ...]}} of the first ok run of each ok cell."""
    found = {}
    for _, row in rows[rows.status == "ok"].iterrows():
        series = {name: [(m.step, m.value) for m in sorted(
            client.get_metric_history(row.run_ids[0], name), key=lambda m: (m.step, m.timestamp))]
            for name in names}
        if any(series.values()):
            found[row.label] = series
    return found


def render(experiment: str, tracking_uri: str, out: Path) -> dict:
    """Write report.md, the charts and slides.md into `out`; return their paths by name."""
    runs = load_runs(experiment, tracking_uri)
    out.mkdir(parents=True, exist_ok=True)
    if not len(runs):
        (out / "report.md").write_text(f"# Experiment `{experiment}`\n\nNo runs.\n")
        return {"report": out / "report.md"}
    source = memory_source(runs)
    rows = cells(runs)
    client = MlflowClient(tracking_uri)
    made = charts.draw(rows, source, out,
                       curves=histories(client, rows, ("epoch", "eval_loss", "eval_rouge1")),
                       memory_series=histories(client, rows, (charts.series_metric(source),)))
    toy = toy_runs(runs, source)
    said = findings(rows, source, toy)
    matched = beside_reference(rows)
    reference_source = reference_sources(matched)
    note = ("ROUGE is F1 x 100 on the test split; train time is the training loop alone; GPU "
            "memory is the NVML peak of the cell's processes (— without CUDA); GPU estimate is "
            "the plan's estimate of that peak for a CUDA run (`make plan`, docs/estimator.md); "
            "CPU memory is the peak RSS of the cell's process tree. Several ok runs of one cell "
            "(seeds, reruns) show as mean ± std; `runs` counts them.")
    if source == "host":
        note += (" This store has no GPU figures (the cells ran without CUDA): memory ratios "
                 "and charts use host memory.")
    parts = [f"# Experiment `{experiment}`", setup(runs),
             f"{len(runs)} runs, {len(rows)} rows. {note}",
             table(rows, source).to_markdown(index=False, disable_numparse=True)]
    _, notes = status_notes(rows)
    if notes:
        parts.append("\n".join(f"{number}. {note}" for number, note in enumerate(notes, 1)))
    if len(matched):
        parts += ["## Beside the reference", f"Reference figures: {reference_source}.",
                  matched.to_markdown(index=False, disable_numparse=True)]
    if said:
        parts += ["## Findings", "\n".join(f"- {sentence}" for sentence in said)]
    checked = claims.table(rows, source)
    if len(checked):
        parts += ["## The LoRA paper's claims, here",
                  "Each of LoRA's (arXiv 2106.09685) claims per model: the paper's figure, ours "
                  "from these runs, and a verdict computed from ours (thresholds in "
                  "harness/claims.py; latency: the inference benchmark, harness/infer.py; memory: "
                  f"the {source} peak)." + (" These are toy runs: tiny models, a few steps, on "
                                            "a CPU, which say little about the paper's GPT-3 "
                                            "scale." if toy else ""),
                  checked.to_markdown(index=False, disable_numparse=True)]
    parts += ["## Charts"] + [f"![{chart.title}]({chart.path.name})\n\n{chart.caption}"
                              for chart in made]
    advice = recommendation(rows)
    if len(advice) and toy:
        advice = ("None from these runs: random-init models on a CPU say nothing about which "
                  "cell to choose (see Findings).")
        parts += ["## Recommendation", advice]
    elif len(advice):
        by = ("its training cost" if rows[rows.status == "ok"].cost_usd.notna().all()
              else "its training time (these runs have no price: set cost.usd_per_hour)")
        parts += ["## Recommendation",
                  "For a GPU of each size: the cell with the best ROUGE-1 whose peak memory "
                  "fits it, and, within 1 ROUGE-1 point of that, the cheapest by " + by + ". A "
                  "peak marked (estimate) is the plan's estimate: that cell has no GPU "
                  "measurement.", advice.to_markdown(index=False, disable_numparse=True)]
    (out / "report.md").write_text("\n\n".join(parts) + "\n")
    deck = slides.deck(experiment, setup(runs), len(runs), source, table(rows, source), made,
                       said, reference_source if len(matched) else None, checked, advice)
    (out / "slides.md").write_text(deck)
    return {"report": out / "report.md", "slides": out / "slides.md",
            **{chart.path.stem: chart.path for chart in made}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="the MLflow experiment to report")
    parser.add_argument("--tracking-uri", default=DEFAULT_URI,
                        help=f"the MLflow store or server (default {DEFAULT_URI})")
    parser.add_argument("--out", help="output folder (default reports/<experiment>)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path("reports") / args.experiment)
    try:
        written = render(args.experiment, args.tracking_uri, out)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
