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
- the charts (harness/report/charts.py) and slides.md, a Marp deck (harness/report/slides.py).
"""

import argparse
from pathlib import Path

from mlflow import MlflowClient

from harness.core.errors import ConfigError, refused
from harness.report import charts, claims, slides
from harness.report.findings import findings, recommendation, setup, toy_runs
from harness.report.results import (
    beside_reference,
    reference_sources,
    status_notes,
    table,
)
from harness.report.runs import cells, histories, load_runs, memory_source

DEFAULT_URI = "sqlite:///mlflow.db"


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
        return refused(error)
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0
