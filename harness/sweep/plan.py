"""The plan of an experiment: every cell, what will happen to it, and its estimated peak GPU memory
against a GPU, before anything runs.

    python -m harness.plan <experiment> [key=value ...]      or      make plan EXP=<name>

prints the plan and writes it to reports/<experiment>/plan.csv. It needs no GPU and runs nothing:
the estimate (harness/estimate/estimate.py) simulates each cell on PyTorch's meta device. Each
row says what the sweep would do with the cell (run; skip, with the reason; done already, with the
run), the lengths it cuts at and where they come from, the estimate and its parts, the published GPU
memory where the cell is a row of a published table and runs its setup (harness/core/
reference.yaml; the estimate's ratio to it, the like part of the estimate: all of it for an NVML
figure, the tensors alone for torch's allocated peak), or the published outcome (out of memory),
or, for a cell of another setup, what differs and no ratio, and
whether the estimate fits the smallest GPU of this machine, or, on a machine without one, the GPU
the experiment names (plan_gpu). A sweep prints the same plan before its first cell
(harness/sweep/progress.py).
"""

import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from harness.config import identity, validation
from harness.config.grids import compose_experiment
from harness.core import reference
from harness.core.errors import ConfigError, refused
from harness.core.tables import as_text
from harness.data import encoding
from harness.estimate import estimate
from harness.measure import gpus, traces
from harness.run import checks
from harness.tracking import claims, mlflow_store, runs

# The terminal shows these columns of the plan (plan.csv has them all).
SHOWN = {"#": "#", "cell": "cell", "strategy": "strategy", "gradient_checkpointing": "ckpt",
         "lengths": "lengths",
         "plan": "plan", "why": "why", "weights_mib": "weights", "gradients_mib": "gradients",
         "optimizer_mib": "optimizer", "activations_mib": "activations",
         "allocated_mib": "tensors", "estimate_mib": "GPU estimate (MiB)",
         "host_mib": "host (MiB)",
         "reference": "published", "reference_gpu_mib": "reference (MiB)",
         "estimate_ratio": "ratio", "fits": "fits", "lomo_claim": "LOMO's claim"}


def check(jobs: list[DictConfig], create_experiment: bool = True) -> list[checks.Checked]:
    """Validate every job (ConfigError naming it, before anything runs) and find, for each, why
    its combination cannot run, the run that finished its cell already (one read of the store)
    and the grid point before it that is the same cell. A sweep's check (`create_experiment`)
    first closes the runs its experiment has left RUNNING by runners that are gone."""
    for number, job in enumerate(jobs, start=1):
        try:
            validation.validate(job)
        except ConfigError as error:
            raise ConfigError(f"cell {number} ({' '.join(job.hydra.overrides.task)}): {error}")
    client, experiment_id = mlflow_store.connect(jobs[0].tracking, create=create_experiment)
    if create_experiment:
        claims.close_stale(client, experiment_id, jobs[0].runner.stale_after_s)
    stored = runs.of_experiment(client, experiment_id)
    checked, first = [], {}
    for number, job in enumerate(jobs, start=1):
        found = checks.of_cell(job)
        if found.fingerprint in first:  # a knob its method ignores: the same cell again
            earlier = checked[first[found.fingerprint] - 1]
            checked.append(replace(earlier, same_as=earlier.same_as or first[found.fingerprint]))
            continue
        first[found.fingerprint] = number
        previous = (None if found.invalid or job.force
                    else runs.finished(stored, found.fingerprint, traces.limits(job.runner)))
        checked.append(replace(found, store_asked=True, done=checks.done(previous)))
    return checked


def plan(jobs: list[DictConfig], found_gpus: list[dict], named_gpu=None,
         create_experiment: bool = True,
         checked: list[checks.Checked] | None = None) -> pd.DataFrame:
    """One row per job (see the module's docstring for the columns), from the jobs' checks
    (`checked`, else made here: check())."""
    if checked is None:
        checked = check(jobs, create_experiment)
    gpu = _gpu_to_compare(found_gpus, named_gpu)
    rows, estimated = [], []
    for number, (job, found) in enumerate(zip(jobs, checked), start=1):
        cell_cfg = identity.cell_config(job)
        row = {"#": number, "cell": identity.run_name(cell_cfg), "model": job.model.name,
               "method": identity.method_label(job.method.name, job.method.optimizer),
               "precision": job.precision.name, "rank": cell_cfg["method"].get("r"),
               "strategy": identity.strategy_label(cell_cfg["strategy"]),
               "ranks": job.strategy.nproc_per_node * job.strategy.nnodes,
               "gradient_checkpointing": job.train.gradient_checkpointing,
               "attention": job.model.attn_implementation, "batch_size": job.train.batch_size,
               "fingerprint": found.fingerprint, "plan": "run", "why": ""}
        if found.invalid:
            row.update(plan="skip", why=found.invalid)
        elif found.done is not None:
            row.update(plan="done", why=f"already {found.done['status']} in run "
                                        f"{found.done['run_id']}")
        if not found.invalid:
            lengths, lengths_from = encoding.planned_lengths(job.data, job.model, job.cache_dir)
            if lengths is None:
                row["lengths_from"] = lengths_from
            else:
                estimated.append((row, job, lengths_from, (cell_cfg, lengths, job.cache_dir)))
        rows.append(row)
    # All at once: the simulations may run side by side.
    all_parts = estimate.gpu_peaks_mib([request for *_, request in estimated])
    for (row, job, lengths_from, (_, lengths, _)), parts in zip(estimated, all_parts):
        row.update(_estimate_columns(job, lengths, lengths_from, parts))
    table = pd.DataFrame(rows)
    table["gpu"] = gpu[0] if gpu else ""
    table["gpu_mib"] = gpu[1] if gpu else None
    estimates = table.get("estimate_mib", pd.Series([None] * len(table)))
    table["fits"] = [_fits(needed, gpu, ranks) for needed, ranks in zip(estimates, table.ranks)]
    return table


def _estimate_columns(job: DictConfig, lengths: dict, lengths_from: str, parts: dict) -> dict:
    """The cell's lengths, its estimate and parts, and the reference figure it is compared with."""
    found = {"source_length": lengths["source"], "target_length": lengths["target"],
             "lengths": f"{lengths['source']}/{lengths['target']}", "lengths_from": lengths_from,
             **{f"{name}_mib": parts[name] for name in estimate.PARTS},
             "estimate_mib": parts["total"], "allocated_mib": parts["allocated"],
             "host_mib": parts["host"]}
    if job.method.name == "lomo":
        found["lomo_claim"] = _lomo_claim(parts)
    keys = (job.model.name, identity.method_label(job.method.name, job.method.optimizer),
            identity.precision_label(job.precision.name, job.precision.master_weights),
            job.strategy.name)
    published = reference.row(*keys)
    other = published and reference.differences(
        published, identity.flat_params(identity.cell_config(job), job))
    if other:  # the published figure is of another setup: no ratio to it
        found.update(reference=f"{published['table']}: other setup",
                     reference_setup="; ".join(other))
        return found
    study = reference.gpu_mib(*keys) if published else None
    if published:
        found["reference"] = published.get("outcome") if study is None else published["table"]
    if study is not None:
        # Like with like: an NVML figure against the whole estimate, an allocated one against
        # the tensors alone.
        compared = parts[reference.MEASURES[published["measure"]]]
        found.update(reference_gpu_mib=study, reference_measure=published["measure"],
                     estimate_ratio=compared / study)
    return found


def _lomo_claim(parts: dict) -> str:
    """LOMO's own claim on its simulated step: at the peak, no more gradient than its largest
    weight's (the others are freed as soon as each is applied) and no optimizer state."""
    largest = parts["largest_trained_weight"]
    holds = parts["gradients"] <= largest + 1e-6 and parts["optimizer"] == 0
    return (f"{'holds' if holds else 'does not hold'}: gradients {parts['gradients']:.4g} MiB "
            f"(largest weight {largest:.4g}), optimizer state {parts['optimizer']:.4g}")


def _gpu_to_compare(found_gpus: list[dict], named_gpu) -> tuple[str, float] | None:
    """(name, MiB) of the smallest GPU found here, else of the experiment's plan_gpu, else None."""
    if found_gpus:
        smallest = min(found_gpus, key=lambda gpu: gpu["total_mib"])
        return f"{smallest['name']} (this machine)", smallest["total_mib"]
    if named_gpu:
        return named_gpu.name, named_gpu.memory_mib
    return None


def _fits(needed, gpu, ranks: int = 1) -> str:
    """yes / NO against the GPU; a distributed cell's estimate is one rank's, on each of its
    GPUs: "yes, on 8 x" of that GPU."""
    if needed is None or pd.isna(needed) or gpu is None:
        return ""
    if needed > gpu[1]:
        return "NO"
    return "yes" if ranks == 1 else f"yes, on {ranks} x"


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The plan's columns for the terminal, one row per cell (grid points that differ only in a
    knob their method ignores are one cell), numbered as a sweep counts its cells."""
    cells = table.drop_duplicates("fingerprint").assign(**{"#": lambda frame: range(
        1, len(frame) + 1)})
    if (cells.get("strategy", pd.Series(["single"])) == "single").all():  # one GPU's plan
        cells = cells.drop(columns=[column for column in ("strategy", "host_mib")
                                    if column in cells])
    return cells[[column for column in SHOWN if column in cells]].rename(columns=SHOWN)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        print("usage: python -m harness.plan <experiment> [key=value ...]", file=sys.stderr)
        return 2
    name, overrides = argv[0], argv[1:]
    try:
        jobs = compose_experiment(name, overrides)
        found = gpus.describe(gpus.candidates(jobs[0].runner.gpus))
        table = plan(jobs, found, jobs[0].get("plan_gpu"), create_experiment=False)
    except ConfigError as error:
        return refused(error)
    out = Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "plan.csv", index=False)
    compared = table.gpu.iloc[0] or "no GPU (none found, and the experiment names none)"
    print(f"[harness] plan of {name}: {len(table)} grid points, {table.fingerprint.nunique()} "
          f"cells; fits: against {compared}")
    print(as_text(shown(table)))
    print(f"[harness] wrote {out / 'plan.csv'}")
    return 0

