"""`python -m harness.validity` (make validity): every published memory figure the harness can
configure, beside its estimate, in one table: reports/validity.md, validity.csv and validity.png.

Each table of harness/core/reference.yaml names the experiment that runs its source's setup;
that experiment's plan (harness/sweep/plan.py, its simulations cached under cache_dir) gives the
estimate of each row. A row reads: the source and its measure, the setup differences left (the
table's `unreproduced` choices, each with the way it leaves the estimate), the published figure,
the estimate of the same measure (all of it for an NVML figure, the tensors alone for torch's
allocated peak), their ratio, and its band: within ±15 %, within ±25 %, or outside.

Goals: a figure that counts tensors (allocated) within ±15 %; a figure of NVML memory within
±25 % until a GPU calibrates the CUDA context and the allocator's reserve (make gpu-check). Where
a row misses its goal, the row says what a GPU must settle: the `settles` of each choice left over
that leaves the estimate on the side it misses, never a tuned constant.

Published outcomes without a figure (out of memory) stand beside whether the plan fits them.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import pandas as pd  # noqa: E402

from harness.config.grids import compose_experiment  # noqa: E402
from harness.core import reference  # noqa: E402
from harness.core.errors import ConfigError, refused  # noqa: E402

OUT = Path("reports")
# The ratio's goal per measure: tensors are counted exactly; NVML memory holds the CUDA context
# and the allocator's reserve, datasheet constants until a GPU measures them.
GOALS = {"allocated": 0.15, "nvml": 0.25}
BANDS = ((0.15, "±15 %"), (0.25, "±25 %"))
COLUMNS = ["table", "cell", "measure", "published_mib", "estimate_mib", "ratio", "band", "goal",
           "meets_goal", "setup_left", "to_settle", "source"]


def plans(overrides: list[str] = ()) -> dict[str, pd.DataFrame]:
    """The plan of each table's experiment, as `make plan` writes it without a GPU: against the
    experiment's plan_gpu."""
    from harness.sweep import plan  # torch: only to plan

    found = {}
    for table in reference.tables():
        jobs = compose_experiment(table["experiment"], list(overrides))
        found[table["experiment"]] = plan.plan(jobs, [], jobs[0].get("plan_gpu"),
                                               create_experiment=False)
    return found


def rows(plans_by_experiment: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per published figure or outcome (COLUMNS), from the experiments' plans."""
    declared = {table["name"]: table for table in reference.tables()}
    found = []
    for _, published in reference.load().iterrows():
        table = declared[published["table"]]
        planned = _planned(plans_by_experiment[table["experiment"]], published)
        figure = reference.gpu_mib(published["model"], published["method"],
                                   published["precision"], published["strategy"])
        row = {"table": published["table"], "cell": _label(published),
               "measure": published["measure"], "source": published["source"],
               "setup_left": "; ".join(f"{left['choice']} (estimate: {left['estimate']})"
                                       for left in table["unreproduced"])}
        if figure is None:
            row.update(_outcome(published, planned))
        else:
            row.update(_compared(figure, published, planned, table))
        found.append(row)
    return pd.DataFrame(found, columns=COLUMNS)


def _label(published: pd.Series) -> str:
    strategy = "" if published["strategy"] == "single" else f"/{published['strategy']}"
    return f"{published['model']}/{published['method']}/{published['precision']}{strategy}"


def _planned(plan: pd.DataFrame, published: pd.Series) -> pd.Series | None:
    """The plan's row of this published row: its model, method, precision as the cell's label
    writes it (fp16-pure), and strategy; None where the experiment has none."""
    precision = plan.cell.str.split("/").str[2]
    strategy = plan.strategy.str.replace(r"-x\d+$", "", regex=True)
    found = plan[(plan.model == published["model"]) & (plan.method == published["method"])
                 & (precision == published["precision"]) & (strategy == published["strategy"])
                 & ~plan.get("reference", pd.Series("", index=plan.index)).fillna("")
                 .str.endswith("other setup")]
    return found.iloc[0] if len(found) else None


def _compared(figure: float, published: pd.Series, planned, table: dict) -> dict:
    goal = GOALS[published["measure"]]
    if planned is None or pd.isna(planned.get("estimate_ratio")):
        return {"published_mib": figure, "band": "no estimate", "goal": f"±{goal:.0%}",
                "meets_goal": False,
                "to_settle": f"experiments/{table['experiment']}.yaml runs no cell of this row"}
    ratio = float(planned["estimate_ratio"])
    band = next((name for width, name in BANDS if abs(ratio - 1) <= width), "outside")
    meets = abs(ratio - 1) <= goal
    side = "high" if ratio > 1 else "low"
    settles = [left["settles"] for left in table["unreproduced"]
               if left["estimate"] in (side, "either")]
    return {"published_mib": figure, "estimate_mib": ratio * figure, "ratio": ratio,
            "band": band, "goal": f"±{goal:.0%}", "meets_goal": meets,
            "to_settle": "" if meets else "; ".join(settles) or "an estimator error: no choice "
                                                                "left over explains it"}


def _outcome(published: pd.Series, planned) -> dict:
    """A published outcome without a figure (out of memory on the source's GPU) beside whether
    the plan fits the cell on that GPU."""
    outcome = published.get("outcome")
    if planned is None or pd.isna(outcome):
        return {"band": "no figure", "meets_goal": None, "goal": "", "to_settle": ""}
    fits = str(planned.get("fits", ""))
    agrees = ("OOM" in str(outcome)) == fits.startswith("NO")
    return {"band": f"published: {outcome}; plan fits: {fits}", "meets_goal": agrees,
            "estimate_mib": planned.get("estimate_mib"), "goal": "", "to_settle": ""}


def markdown(table: pd.DataFrame) -> str:
    """reports/validity.md: the table, what each goal means, and the sources left out."""
    figures = table[table.ratio.notna()]
    met = int(figures.meets_goal.sum())
    shown = table.assign(
        published=[_mib(value) for value in table.published_mib],
        estimate=[_mib(value) for value in table.estimate_mib],
        ratio=[f"{value:.2f}" if pd.notna(value) else "" for value in table.ratio],
        meets_goal=[{True: "yes", False: "no"}.get(value, "") for value in table.meets_goal])
    shown = shown[["table", "cell", "measure", "published", "estimate", "ratio", "band", "goal",
                   "meets_goal", "to_settle"]]
    declared = reference.tables()
    lines = ["# Validity: the plan against every published figure it can configure", "",
             "Generated by `make validity` from harness/core/reference.yaml and the plans of the "
             "experiments that run each source's setup (a change that moves a ratio changes "
             "tests/test_validity.py, with the reason).", "",
             f"{met} of {len(figures)} figures meet their goal: within ±15 % for a figure that "
             "counts tensors (torch's allocated peak), within ±25 % for NVML memory until a GPU "
             "calibrates the CUDA context and the allocator's reserve (make gpu-check), then "
             "±15 %. A row that misses says what a GPU must settle.", "",
             shown.to_markdown(index=False, disable_numparse=True), "",
             "![estimate / published](validity.png)", "",
             "## The sources and the setup differences left", ""]
    for entry in declared:
        lines += [f"### {entry['name']}", "", f"- source: {entry['source']}",
                  f"- measure: {entry['measure']}, {entry['unit']}",
                  "- versions: " + ", ".join(f"{name} {version}" for name, version
                                             in entry["versions"].items()),
                  *[f"- {name.replace('_', ' ')}: {choice}"
                    for name, choice in entry["software"].items()],
                  *[f"- left: {left['choice']} (estimate: {left['estimate']}; settles: "
                    f"{left['settles']})" for left in entry["unreproduced"]], ""]
    lines += ["## Sources considered and left out", ""]
    lines += [f"- **{entry['name']}** ({entry['source']}): {entry['missing']}"
              for entry in reference.considered()]
    return "\n".join(lines) + "\n"


def _mib(value) -> str:
    return "" if pd.isna(value) else f"{value / 1024:.1f} GiB"


def chart(table: pd.DataFrame, path: Path) -> None:
    """The ratios, one bar per figure, over the ±15 % and ±25 % bands."""
    figures = table[table.ratio.notna()].iloc[::-1]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(figures) + 1.2))
    axes.axvspan(0.75, 1.25, color="0.92", label="±25 %")
    axes.axvspan(0.85, 1.15, color="0.82", label="±15 %")
    axes.axvline(1.0, color="0.3", linewidth=0.8)
    colors = ["tab:green" if meets else "tab:red" for meets in figures.meets_goal]
    axes.barh([f"{row.table}: {row.cell}" for row in figures.itertuples()], figures.ratio,
              color=colors, left=0, height=0.6)
    axes.set_xlim(0, max(1.6, float(figures.ratio.max()) + 0.1))
    axes.set_xlabel("estimate / published (green: within its goal)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)


def main(argv: list[str]) -> int:
    try:
        table = rows(plans(argv))
    except ConfigError as error:
        return refused(error)
    OUT.mkdir(exist_ok=True)
    table.to_csv(OUT / "validity.csv", index=False)
    chart(table, OUT / "validity.png")
    (OUT / "validity.md").write_text(markdown(table))
    figures = table[table.ratio.notna()]
    print(f"[harness] validity: {int(figures.meets_goal.sum())} of {len(figures)} published "
          f"figures within their goal; wrote {OUT / 'validity.md'}, validity.csv, validity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
