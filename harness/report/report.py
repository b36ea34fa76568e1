"""The report: tables, charts and a slide deck per experiment, read from MLflow alone (nothing is
rerun), the same bytes for the same store.

    python -m harness.report --experiment demo [--tracking-uri sqlite:///mlflow.db] [--out DIR]
                             [--plan reports/reference_table/plan.csv ...]

writes to DIR (default reports/<experiment>/):
- report.md: the comparison table in the reference table's shape (model, method, precision,
  rank, ROUGE-1, ROUGE-2, train time, GPU and CPU memory) plus memory relative to full
  fine-tuning of the same model, trainable %, tokens/s, the number of runs and the status; the
  reference figures beside the cells that match a reference row; the findings; the charts.
  Several ok runs of one cell (seeds, reruns) show as mean ± std; every cell that did not finish
  ok is shown with its reason, never dropped.
- the charts (harness/report/charts.py) and slides.md, a Marp deck (harness/report/slides.py);
- with --plan, last, another experiment's plan as `make plan` wrote it: its cells' estimated GPU
  memory by part beside the published figures (harness/report/estimates.py). `make demo` adds
  the reference table's.
"""

import argparse
from pathlib import Path

from mlflow import MlflowClient

from harness.core.errors import ConfigError, refused, shown
from harness.core.files import name_problem
from harness.report import charts, claims, estimates, slides
from harness.report.findings import (
    findings,
    per_gpu_count,
    recommendation,
    setup,
    toy_runs,
)
from harness.report.results import (
    beside_reference,
    other_setups,
    reference_sources,
    status_notes,
    table,
)
from harness.report.runs import cells, memory_source
from harness.tracking.runs import experiment_id, histories, of_experiment

DEFAULT_URI = "sqlite:///mlflow.db"


def render(experiment: str, tracking_uri: str, out: Path, plans: list[Path] = ()) -> dict:
    """Write report.md, the charts and slides.md into `out`, with a section per plan (a plan.csv
    in reports/<its experiment>/); return their paths by name."""
    # The plans first: a bad file is refused before the store is read.
    planned = {Path(path).resolve().parent.name: estimates.read(Path(path)) for path in plans}
    client = MlflowClient(tracking_uri)
    runs = of_experiment(client, experiment_id(client, experiment))
    out.mkdir(parents=True, exist_ok=True)
    if not len(runs):
        (out / "report.md").write_text(f"# Experiment `{experiment}`\n\nNo runs.\n")
        return {"report": out / "report.md"}
    source = memory_source(runs)
    rows = cells(runs)
    ok_runs = {row.label: row.run_ids[0] for _, row in rows[rows.status == "ok"].iterrows()}
    made = charts.draw(rows, source, out,
                       curves=histories(client, ok_runs, ("epoch", "eval_loss", "eval_rouge1")),
                       memory_series=histories(client, ok_runs, (charts.series_metric(source),)))
    toy = toy_runs(runs, source)
    said = findings(rows, source, toy)
    matched = beside_reference(rows)
    checked = claims.table(rows, source)
    advice = recommendation(rows)
    parts = [*_results(experiment, runs, rows, source), *_reference(matched, other_setups(rows)),
             *_findings(said), *_claims(checked, source, toy),
             "## Charts", *(chart.markdown() for chart in made),
             *_recommendation(advice, rows, toy), *_per_gpu_count(per_gpu_count(rows), toy)]
    sections = {name: estimates.section(name, plan, out) for name, plan in planned.items()}
    for lines, _, _ in sections.values():
        parts += lines
    (out / "report.md").write_text("\n\n".join(parts) + "\n")
    if len(advice) and toy:
        advice = TOY_ADVICE
    deck = slides.deck(experiment, setup(runs), len(runs), source, table(rows, source), made,
                       said, reference_sources(matched) if len(matched) else None, checked,
                       advice, {name: (shown, chart)
                                for name, (_, shown, chart) in sections.items()})
    (out / "slides.md").write_text(deck)
    return {"report": out / "report.md", "slides": out / "slides.md",
            **{chart.path.stem: chart.path
               for chart in [*made, *(chart for *_, chart in sections.values())]}}


# What the recommendation says of toy runs.
TOY_ADVICE = ("None from these runs: random-init models on a CPU say nothing about which cell to "
              "choose (see Findings).")


def _results(experiment: str, runs, rows, source: str) -> list[str]:
    """The title, the setup, what the figures are, the comparison table and its notes."""
    note = ("ROUGE is F1 x 100 on the test split; train time is the training loop alone; GPU "
            "memory is the NVML peak of the cell's processes (— without CUDA); GPU estimate is "
            "the plan's estimate of that peak for a CUDA run (`make plan`, docs/estimator.md); "
            "CPU memory is the peak RSS of the cell's process tree; predicted time is the time "
            "model's for the device the cell ran on, MFU the step's FLOPs at that device's peak "
            "over its measured step (docs/estimator.md). Several ok runs of one cell (seeds, "
            "reruns) show as mean ± std; `runs` counts them.")
    if source == "host":
        note += (" This store has no GPU figures (the cells ran without CUDA): memory ratios "
                 "and charts use host memory above each cell process's baseline (what it held "
                 "with its libraries imported, before the model loaded: cpu_baseline_mib); CPU "
                 "memory is the whole peak.")
    lines = [f"# Experiment `{experiment}`", setup(runs),
             f"{len(runs)} runs, {len(rows)} rows. {note}",
             table(rows, source).to_markdown(index=False, disable_numparse=True)]
    _, notes = status_notes(rows)
    if notes:
        lines.append("\n".join(f"{number}. {note}" for number, note in enumerate(notes, 1)))
    return lines


def _reference(matched, elsewhere: list[str]) -> list[str]:
    """The cells that run a published row's setup beside its figures; a note on those that are
    a published row's model, method and precision in another setup (no figure beside them)."""
    lines = []
    if len(matched):
        lines += [f"Reference figures: {reference_sources(matched)}.",
                  matched.to_markdown(index=False, disable_numparse=True)]
    if elsewhere:
        lines.append("Not beside a published figure, since they run another setup than the "
                     "published row's:\n" + "\n".join(f"- {line}" for line in elsewhere))
    return ["## Beside the reference", *lines] if lines else []


def _findings(said: list[str]) -> list[str]:
    return ["## Findings", "\n".join(f"- {sentence}" for sentence in said)] if said else []


def _claims(checked, source: str, toy: bool) -> list[str]:
    if not len(checked):
        return []
    return ["## The LoRA paper's claims, here",
            "Each of LoRA's (arXiv 2106.09685) claims per model: the paper's figure, ours "
            "from these runs, and a verdict computed from ours (thresholds in "
            "harness/report/claims.py; latency: the inference benchmark, harness/cell/infer.py; "
            f"memory: the peak {charts.memory_name(source)})."
            + (" These are toy runs: tiny models, a few steps, on a CPU, which say little about "
               "the paper's GPT-3 scale." if toy else ""),
            checked.to_markdown(index=False, disable_numparse=True)]


def _recommendation(advice, rows, toy: bool) -> list[str]:
    if not len(advice):
        return []
    if toy:
        return ["## Recommendation", TOY_ADVICE]
    by = ("its training cost" if rows[rows.status == "ok"].cost_usd.notna().all()
          else "its training time (these runs have no price: set cost.usd_per_hour)")
    return ["## Recommendation",
            "For a GPU of each size: the cell with the best ROUGE-1 whose peak memory "
            "fits it, and, within 1 ROUGE-1 point of that, the cheapest by " + by + ". A "
            "peak marked (estimate) is the plan's estimate: that cell has no GPU "
            "measurement.", advice.to_markdown(index=False, disable_numparse=True)]


def _per_gpu_count(advice, toy: bool) -> list[str]:
    if not len(advice) or toy:
        return []
    return ["## On 1, 2, 4 and 8 GPUs",
            "For that many GPUs of each size: the cell with the best ROUGE-1 that runs on at most "
            "as many (one GPU per rank) with its fullest GPU's peak within one card, and the host "
            "memory it needed (what an offload keeps there).",
            advice.to_markdown(index=False, disable_numparse=True)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="the MLflow experiment to report")
    parser.add_argument("--tracking-uri", default=DEFAULT_URI,
                        help=f"the MLflow store or server (default {DEFAULT_URI})")
    parser.add_argument("--out", help="output folder (default reports/<experiment>)")
    parser.add_argument("--plan", action="append", default=[], metavar="PLAN_CSV",
                        help="add another experiment's plan, as `make plan EXP=name` wrote it "
                             "(reports/name/plan.csv), as an estimated section at the end; "
                             "may be given more than once")
    args = parser.parse_args(argv)
    try:
        problem = name_problem(args.experiment)
        if problem is not None and args.out is None:  # reports/<name>/ must stay in reports/
            raise ConfigError(f"--experiment {shown(args.experiment)!r} cannot name a folder "
                              f"under reports/ ({problem}); expected a name of letters, digits, "
                              "spaces, '.', '_' or '-': give --out for its report")
        out = Path(args.out or Path("reports") / args.experiment)
        written = render(args.experiment, args.tracking_uri, out, args.plan)
    except ConfigError as error:
        return refused(error)
    print(f"wrote {', '.join(str(path) for path in written.values())}")
    return 0
