"""The LoRA paper's claims (arXiv 2106.09685), checked per model against the runs of a store: the
paper's figure, ours, and a verdict computed from ours, never written by hand.

Each claim: the paper's figure; ours; the thresholds of holds / holds partly (else: does not hold).

- No added inference latency once merged: merged = base; merged over base p50 latency; <= 1.05 /
  <= 1.15. (The unmerged adapter's latency over the base's is shown beside, with no verdict: the
  paper only says it adds work.)
- Tiny checkpoints: 350 GB -> 35 MB, ~10,000x (GPT-3 175B, r=4 on q,v); the full checkpoint in the
  cell's precision over the adapter's size; >= 100 / >= 10.
- Less training memory: 2/3 less VRAM (1.2 TB -> 350 GB on GPT-3); LoRA's peak over full
  fine-tuning's; <= 0.40 / <= 0.90.
- Faster training: +25 % throughput on GPT-3 175B; LoRA's training tokens/s over full
  fine-tuning's; >= 1.25 / >= 1.05.

The latency and checkpoint claims read the LoRA cell's own figures (harness/cell/infer.py); memory
and speed compare it with full fine-tuning (AdamW) of the same model in the same precision. Of
several LoRA cells of a model, the one in that precision with the lowest rank speaks for it.
"""

import pandas as pd

from harness.config import identity
from harness.report import charts

# claim: (the paper's figure, what ours is, (holds at or beyond, partly at or beyond), direction)
CLAIMS = {
    "no added latency, merged": ("merged = base (W = W0 + BA)", "merged / base latency (p50)",
                                 (1.05, 1.15), "at most"),
    "unmerged adapter latency": ("adds work per token (no figure)", "unmerged / base latency "
                                 "(p50)", None, None),
    "tiny checkpoints": ("~10,000x (350 GB -> 35 MB, GPT-3 175B, r=4)",
                         "full checkpoint / adapter", (100, 10), "at least"),
    "less training memory": ("2/3 less VRAM (1.2 TB -> 350 GB, GPT-3)", "LoRA / full peak",
                             (0.40, 0.90), "at most"),
    "faster training": ("+25 % throughput (GPT-3 175B)", "LoRA / full training tokens/s",
                        (1.25, 1.05), "at least"),
}


def verdict(claim: str, ours: float) -> str:
    """holds, holds partly or does not hold for `ours` against the claim's thresholds; "—" for
    no figure, "measured" for a claim with no threshold."""
    if pd.isna(ours):
        return "—"
    _, _, thresholds, direction = CLAIMS[claim]
    if thresholds is None:
        return "measured"
    holds, partly = thresholds
    better = (lambda a, b: a <= b) if direction == "at most" else (lambda a, b: a >= b)
    return ("holds" if better(ours, holds) else "holds partly" if better(ours, partly)
            else "does not hold")


def table(rows: pd.DataFrame, source: str) -> pd.DataFrame:
    """One row per model and claim: model, claim, the paper, ours (what it is), the figure,
    verdict. Empty where no model has an ok LoRA cell."""
    ok = rows[rows.status == "ok"]
    memory = charts.peak_metric(source)
    found = []
    for model, cells in ok.groupby("model", sort=False):
        full = cells[cells.method == "full"]
        lora = cells[cells.method == "lora"]
        if not len(lora):
            continue
        precision = full.precision.iloc[0] if len(full) else "fp32"
        same = lora[lora.precision == precision]
        adapter = (same if len(same) else lora).sort_values("rank").iloc[0]
        baseline = full[full.precision == adapter.precision]
        baseline = baseline.iloc[0] if len(baseline) else None
        figures = {
            "no added latency, merged": _ratio(adapter, "infer_latency_ms_p50_merged",
                                               adapter, "infer_latency_ms_p50_base"),
            "unmerged adapter latency": _ratio(adapter, "infer_latency_ms_p50",
                                               adapter, "infer_latency_ms_p50_base"),
            "tiny checkpoints": _ratio(adapter, "full_checkpoint_mib", adapter,
                                       "adapter_size_mib"),
            "less training memory": _ratio(adapter, memory, baseline, memory),
            "faster training": _ratio(adapter, "tokens_per_s", baseline, "tokens_per_s")}
        cell = identity.label(model, "lora", "adamw", int(adapter["rank"]), adapter.precision)
        for claim, ours in figures.items():
            paper, what, _, _ = CLAIMS[claim]
            found.append({"model": model, "LoRA cell": cell, "claim": claim, "the paper": paper,
                          "ours": what, "figure": "—" if pd.isna(ours) else f"{ours:.2f}",
                          "verdict": verdict(claim, ours)})
    return pd.DataFrame(found)


def _ratio(row, column: str, other, other_column: str) -> float:
    if other is None:
        return float("nan")
    top, bottom = row.get(column, float("nan")), other.get(other_column, float("nan"))
    return float("nan") if pd.isna(top) or pd.isna(bottom) or not bottom else top / bottom
