"""The report's charts, matplotlib PNGs drawn from the report's rows (harness/report/report.py), the
same bytes for the same runs:

- breakdown.png: peak memory per cell, stacked by what holds it (parameters, gradients, optimizer
  state, activations, the rest);
- rouge_vs_memory.png: ROUGE-1 against peak memory, the Pareto front marked;
- rouge_vs_cost.png: ROUGE-1 against the training cost, where the runs have one;
- learning_curves.png: eval loss and eval ROUGE-1 per epoch, a line per LoRA cell (rank);
- memory_over_time_<model>.png: the sampled memory of each cell of one model size.

On a store without GPU figures every chart uses host memory and says so in its title: the peak
above the cell process's baseline (cpu_baseline_mib, the interpreter and libraries before the
model loads), which every cell pays alike and would otherwise be most of each bar.
"""

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PARTS = {"mem_params_mib": "parameters", "mem_grads_mib": "gradients",
         "mem_optimizer_mib": "optimizer state", "mem_activations_mib": "activations"}
# No date or version in the files: the same runs give the same bytes.
PNG_METADATA = {"Software": None}


@dataclass(frozen=True)
class Chart:
    title: str
    path: Path
    caption: str

    def markdown(self) -> str:
        """The chart as report.md shows it: the image, then its caption."""
        return f"![{self.title}]({self.path.name})\n\n{self.caption}"


def draw(rows: pd.DataFrame, source: str, out: Path, curves: dict,
         memory_series: dict) -> list[Chart]:
    """Every chart the rows can support, written under `out`."""
    ok = rows[rows.status == "ok"]
    made = [breakdown(ok, source, out / "breakdown.png"),
            rouge_vs_memory(ok, source, out / "rouge_vs_memory.png"),
            rouge_vs_cost(ok, out / "rouge_vs_cost.png"),
            learning_curves(ok, curves, out / "learning_curves.png")]
    for model in ok.model.unique():
        labels = set(ok[ok.model == model].label)
        made.append(memory_over_time({label: series for label, series in memory_series.items()
                                      if label in labels}, model, source,
                                     out / f"memory_over_time_{model}.png"))
    return [chart for chart in made if chart is not None]


def peak_metric(source: str) -> str:
    """The peak a report compares: the GPU's, or the host's on a store without GPU figures."""
    return "gpu_peak_mib" if source == "GPU" else "cpu_cell_peak_mib"


def series_metric(source: str) -> str:
    """The sampled memory series logged beside that peak."""
    return "gpu_mib" if source == "GPU" else "cpu_mib"


def memory_name(source: str) -> str:
    """What peak_metric holds, in words."""
    return "GPU memory" if source == "GPU" else "host memory above the process's baseline"


def _memory_words(source: str, peak: bool = True) -> str:
    if source == "GPU":
        return "peak GPU memory" if peak else "GPU memory"
    if peak:
        return f"peak {memory_name(source)} (no GPU in these runs)"
    return "host memory of the whole process (no GPU in these runs)"


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata=PNG_METADATA)
    plt.close(figure)


def breakdown(ok: pd.DataFrame, source: str, path: Path) -> Chart | None:
    cells = ok.dropna(subset=[peak_metric(source), "mem_params_mib"])
    if not len(cells):
        return None
    parts = {name: cells[column] for column, name in PARTS.items()}
    # What the peak holds beyond the counted tensors: CUDA context and allocator cache on a GPU;
    # on the host, data, working memory and (without CUDA, uncounted) activations.
    counted = sum(values.fillna(0.0) for values in parts.values())
    parts["everything else"] = (cells[peak_metric(source)] - counted).clip(lower=0)
    # LOMO's claim: its gradients never exceed its largest weight's, and it keeps no optimizer
    # state. The cross marks where its gradients may end at most: weights + that one weight.
    bound = (cells.mem_params_mib + cells.mem_largest_weight_mib).where(cells.method == "lomo")
    words = _memory_words(source)
    stacked(cells.label, parts, path, f"{words[0].upper()}{words[1:]} per cell, by what holds it",
            colors={"everything else": "lightgrey"}, marks=bound,
            mark_label="LOMO's bound: weights + one weight's gradient")
    rest = ("the CUDA context and allocator cache" if source == "GPU" else
            "the data, the libraries' working memory and the activations, which are not "
            "counted without CUDA; the interpreter and the libraries loaded before the model "
            "(cpu_baseline_mib) are left out of every bar")
    caption = (f"Parameters, gradients and optimizer state are the live tensors after the "
               f"step that set the peak; everything else is {rest}.")
    if bound.notna().any():
        checked = cells[bound.notna()]
        holds = ((checked.mem_grads_mib <= checked.mem_largest_weight_mib + 1e-6)
                 & (checked.mem_optimizer_mib.fillna(0.0) == 0)).sum()
        caption += (f" LOMO's claim (a cross: its weights and one weight's gradient, the most "
                    f"its gradients may reach; no optimizer state) holds for {holds} of its "
                    f"{len(checked)} cells.")
    return Chart("Memory breakdown", path, caption)


def stacked(labels: pd.Series, parts: dict, path: Path, title: str, colors: dict | None = None,
            marks: pd.Series | None = None, mark_label: str = "",
            limit: tuple[float, str] | None = None) -> None:
    """One horizontal bar per label, stacked by part (MiB); a cross per label at `marks` where
    given; a dashed line at `limit` (MiB, name)."""
    figure, axes = plt.subplots(figsize=(11, 1.5 + 0.35 * len(labels)))
    rows = list(range(len(labels)))
    left = pd.Series(0.0, index=labels.index)
    for name, values in parts.items():
        values = values.fillna(0.0)
        if values.any():  # the legend lists only the parts drawn
            axes.barh(rows, values, left=left, label=name, color=(colors or {}).get(name))
        left += values
    if marks is not None and marks.notna().any():
        axes.scatter(marks, rows, marker="x", color="black", zorder=3, label=mark_label)
    if limit is not None and not pd.isna(limit[0]):
        axes.axvline(limit[0], linestyle="--", color="tab:red",
                     label=f"{limit[1]}: {limit[0]:.0f} MiB")
    axes.set_yticks(rows, labels)
    axes.invert_yaxis()
    axes.set_xlabel("MiB")
    axes.set_title(title)
    # Beside the bars, never over them.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    _save(figure, path)


def pareto_front(cells: pd.DataFrame, memory: str, quality: str) -> pd.DataFrame:
    """The cells no other cell beats on both: higher quality and lower memory."""
    ordered = cells.sort_values([memory, quality], ascending=[True, False], kind="stable")
    best, keep = float("-inf"), []
    for index, value in ordered[quality].items():
        if value > best:
            keep.append(index)
            best = value
    return ordered.loc[keep]


def rouge_vs_memory(ok: pd.DataFrame, source: str, path: Path) -> Chart | None:
    return _rouge_against(ok, peak_metric(source), f"{_memory_words(source)} (MiB)", "memory",
                          path, "Up and to the left is better; on the red front no other cell "
                                "has both a higher ROUGE-1 and a lower peak.")


def rouge_vs_cost(ok: pd.DataFrame, path: Path) -> Chart | None:
    return _rouge_against(ok, "cost_usd", "training cost (USD, training time x price per GPU "
                                          "hour)", "cost", path,
                          "Up and to the left is better; on the red front no other cell is "
                          "both better and cheaper to train.")


def _rouge_against(ok: pd.DataFrame, column: str, label: str, what: str, path: Path,
                   caption: str) -> Chart | None:
    """ROUGE-1 against one cost of each cell (memory, dollars), the Pareto front marked."""
    cells = ok.dropna(subset=[column, "rouge1"])
    if not len(cells):
        return None
    front = pareto_front(cells, column, "rouge1")
    figure, axes = plt.subplots(figsize=(11, 5.5))
    axes.scatter(cells[column], cells.rouge1, color="tab:blue", label="cell")
    axes.step(front[column], front.rouge1, where="post", color="tab:red", label="Pareto front")
    axes.scatter(front[column], front.rouge1, color="tab:red", zorder=3)
    # Points carry numbers, and a key beside the axes names them: long labels next to close
    # points would overlap.
    key = []
    for number, (_, cell) in enumerate(cells.iterrows(), start=1):
        axes.annotate(str(number), (cell[column], cell.rouge1), fontsize=8,
                      xytext=(4, 2), textcoords="offset points")
        key.append(f"{number}  {cell.label}")
    axes.text(1.02, 1, "\n".join(key), transform=axes.transAxes, fontsize=7, va="top",
              family="monospace")
    axes.set_xlim(left=0)  # from zero: the distances between cells are their real ratios
    axes.set_xlabel(label)
    axes.set_ylabel("ROUGE-1")
    axes.set_title(f"ROUGE-1 against {what}")
    axes.legend(loc="lower left", bbox_to_anchor=(1.01, 0))  # outside, under the key
    _save(figure, path)
    return Chart(f"ROUGE-1 against {what}", path, caption)


def learning_curves(ok: pd.DataFrame, curves: dict, path: Path) -> Chart | None:
    """Per epoch: eval loss, and eval ROUGE-1 where it was computed (eval.rouge_every_epoch)."""
    adapters = set(ok[ok["rank"].notna()].label)
    lines = {label: series for label, series in curves.items()
             if label in adapters and series["epoch"] and series["eval_loss"]}
    if not lines:
        return None
    with_rouge = any(series["eval_rouge1"] for series in lines.values())
    columns = 2 if with_rouge else 1
    figure, panels = plt.subplots(1, columns, figsize=(4 + 5 * columns, 4.5), squeeze=False)
    for number, (label, series) in enumerate(sorted(lines.items())):
        epoch_at = dict(series["epoch"])  # step -> epoch
        # A colour, line style and marker of its own per line, so that none reads as another.
        style = {"color": plt.get_cmap("tab10")(number % 10),
                 "linestyle": ("-", "--", ":", "-.")[number % 4],
                 "marker": ("o", "s", "^", "D", "v")[number % 5]}
        for axes, name in zip(panels[0], ("eval_loss", "eval_rouge1")):
            points = [(epoch_at[step], value) for step, value in series[name]
                      if step in epoch_at]
            if points:
                axes.plot(*zip(*points), label=label, **style)
    for axes, name in zip(panels[0], ("eval loss", "eval ROUGE-1")):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_title(f"{name} on the validation split")
    panels[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(figure, path)
    return Chart("Learning curves", path,
                 "One line per LoRA cell, its rank in the label; an eval loss that turns up "
                 "while training goes on is overfitting.")


def memory_over_time(series: dict, model: str, source: str, path: Path) -> Chart | None:
    name = series_metric(source)
    lines = {label: points[name] for label, points in series.items() if points[name]}
    if not lines:
        return None
    figure, axes = plt.subplots(figsize=(9, 4.5))
    for label, points in sorted(lines.items()):
        steps, values = zip(*points)
        axes.plot([step / 1000 for step in steps], values, label=label, linewidth=1)
    axes.set_xlabel("time since the cell started (s)")
    axes.set_ylabel("MiB")
    axes.set_title(f"{model}: {_memory_words(source, peak=False)} over time")
    axes.legend(fontsize="small")
    _save(figure, path)
    return Chart(f"Memory over time, {model}", path,
                 "Each cell's sampled memory through loading, training and evaluation.")
