"""The report as a Marp slide deck (slides.md): setup, the table, one slide per chart, findings,
the LoRA paper's claims, the recommendation, and the estimated plans the report ends with.

Marp (https://marp.app) renders it to HTML, PDF or PowerPoint: `marp slides.md --pdf`. Every
sentence on the findings slide is computed from the runs (harness/report/report.py findings).
"""

import pandas as pd

FRONT_MATTER = """---
marp: true
paginate: true
size: 16:9
style: |
  section.small table { font-size: 0.55em; }
---
"""
# A slide holds this many table rows; a longer table continues on the next slide.
ROWS_PER_SLIDE = 12
# The table's columns that fit a slide.
SLIDE_COLUMNS = ("model", "method", "precision", "rank", "ROUGE-1", "train time (min)",
                 "memory / full FT", "tokens/s", "status")
# The claims table's columns that fit a slide (report.md has which figure each one is).
CLAIM_COLUMNS = ("model", "claim", "the paper", "figure", "verdict")
# An estimated plan's columns that fit a slide (the parts are on its chart).
PLAN_COLUMNS = ("cell", "estimate (MiB)", "published (MB)", "estimate / published")


def deck(experiment: str, what_ran: str, run_count: int, source: str, table: pd.DataFrame,
         charts: list, findings: list[str], reference_source: str | None,
         checked_claims: pd.DataFrame, advice: pd.DataFrame | str | None,
         estimated: dict | None = None) -> str:
    """The deck; `checked_claims` as harness/report/claims.py tables them (empty: no slide),
    `advice` the recommendation's table, or a sentence saying why there is none; `estimated`:
    {experiment: (its plan's table, its chart)} as harness/report/estimates.py makes them."""
    slides = [_setup(experiment, what_ran, run_count, source, reference_source)]
    compact = table.rename(columns={f"{source} memory / full FT": "memory / full FT"})
    compact = compact[[column for column in SLIDE_COLUMNS if column in compact]]
    memory_column = "GPU memory (MiB)" if source == "GPU" else "CPU memory (MiB)"
    compact.insert(5, memory_column, table[memory_column])
    compact["status"] = compact.status.str.split(" ").str[0]  # the notes are in report.md
    slides += _table_slides("Results", compact)
    slides += [_chart_slide(chart) for chart in charts]
    if findings:
        slides.append("## Findings\n\n" + "\n".join(f"- {sentence}" for sentence in findings))
    if len(checked_claims):
        slides += _table_slides("The LoRA paper's claims, here",
                                checked_claims[list(CLAIM_COLUMNS)])
    if isinstance(advice, str):
        slides.append(f"## Recommendation\n\n{advice}")
    elif advice is not None and len(advice):
        slides += _table_slides("Recommendation", advice)
    for name, (plan, chart) in (estimated or {}).items():
        fits = [column for column in plan.columns if column.startswith("fits ")]
        slides += _table_slides(f"Estimated GPU memory: `{name}` (no GPU ran)",
                                plan[[*PLAN_COLUMNS, *fits]])
        slides.append(_chart_slide(chart))
    return FRONT_MATTER + "\n" + "\n\n---\n\n".join(slides) + "\n"


def _chart_slide(chart) -> str:
    return f"## {chart.title}\n\n![h:480]({chart.path.name})\n\n{chart.caption}"


def _table_slides(title: str, table: pd.DataFrame) -> list[str]:
    """`table` on as many slides as it takes, ROWS_PER_SLIDE rows each, numbered when several."""
    pages = range(0, len(table), ROWS_PER_SLIDE)
    return [f"## {title}" + (f" ({number}/{len(pages)})" if len(pages) > 1 else "")
            + "\n\n<!-- _class: small -->\n\n"
            + table.iloc[start:start + ROWS_PER_SLIDE].to_markdown(index=False,
                                                                 disable_numparse=True)
            for number, start in enumerate(pages, start=1)]


def _setup(experiment: str, what_ran: str, run_count: int, source: str,
           reference_source) -> str:
    lines = [f"# Fine-tuning flan-t5: experiment `{experiment}`", "", f"- {what_ran}",
             f"- {run_count} runs from MLflow; one fresh process per cell, memory sampled every "
             "10 ms (NVML per process on a GPU, RSS of the process tree on the host)",
             "- ROUGE: F1 x 100 on the test split; train time: the training loop alone",
             "- memory / full FT: peak memory over full fine-tuning's (AdamW) on the same model"]
    if source == "host":
        lines.append("- no GPU in these runs: memory is host memory")
    if reference_source:
        lines.append(f"- compared with {reference_source}")
    return "\n".join(lines)
