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

import math
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from harness.config import cost, identity, validation
from harness.config.grids import compose_experiment
from harness.core import errors, reference
from harness.core.errors import ConfigError, refused
from harness.core.tables import as_text
from harness.data import encoding, sources
from harness.estimate import communication, estimate, timing, work
from harness.measure import accounting, gpus, peaks, traces
from harness.model import training_step
from harness.run import preflight
from harness.strategy.sizes import world_size
from harness.tracking import claims, mlflow_store, runs

# The terminal shows these columns of the plan (plan.csv has them all).
SHOWN = {"#": "#", "cell": "cell", "strategy": "strategy", "gradient_checkpointing": "ckpt",
         "lengths": "lengths",
         "plan": "plan", "why": "why", "weights_mib": "weights", "gradients_mib": "gradients",
         "optimizer_mib": "optimizer", "activations_mib": "activations",
         "allocated_mib": "tensors", "estimate_mib": "GPU estimate (MiB)",
         "host_mib": "host (MiB)",
         "reference": "published", "reference_gpu_mib": "reference (MiB)",
         "estimate_ratio": "ratio", "fits": "fits", "lomo_claim": "LOMO's claim",
         "tflop_per_step": "TFLOP/step", "predicted_step_s": "step (s)", "bound": "bound by",
         "comm_exposed_s": "transfers (s)", "predicted_train_min": "train (min)",
         "reference_train_min": "published (min)",
         "predicted_train_min_uncorrected": "uncorrected (min)", "time_ratio": "time ratio",
         "predicted_cost_usd": "cost (USD)"}


def _numbers(numbers: list[int]) -> str:
    """1-3, 7, 9-10."""
    runs, start = [], numbers[0]
    for previous, number in zip(numbers, [*numbers[1:], None]):
        if number != previous + 1:
            runs.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = number
    return ", ".join(runs)


def _overrides(jobs: list[DictConfig], number: int) -> str:
    """What grid point `number` sets that not every grid point sets alike."""
    common = set.intersection(*(set(job.hydra.overrides.task) for job in jobs))
    own = [override for override in jobs[number - 1].hydra.overrides.task
           if override not in common]
    return errors.shown(" ".join(own)) or "the grid's only point"


def check(jobs: list[DictConfig], create_experiment: bool = True) -> list[preflight.Checked]:
    """Validate every job (ConfigError naming it, before anything runs) and find, for each, why
    its combination cannot run, the run that finished its cell already (one read of the store)
    and the grid point before it that is the same cell. A sweep's check (`create_experiment`)
    first closes the runs its experiment has left RUNNING by runners that are gone."""
    refusals = {}  # the refusal: the grid points it refuses
    for number, job in enumerate(jobs, start=1):
        try:
            validation.validate(job, sweep=True)
        except ConfigError as error:
            refusals.setdefault(str(error), []).append(number)
    if refusals:  # every grid point named, nothing run
        count = sum(map(len, refusals.values()))
        raise ConfigError(f"{count} of {len(jobs)} grid points are refused, and so the sweep:\n"
                          + "\n".join(f"- grid point{'s' if len(numbers) > 1 else ''} "
                                      f"{_numbers(numbers)} ({_overrides(jobs, numbers[0])}"
                                      f"{', ...' if len(numbers) > 1 else ''}): {message}"
                                      for message, numbers in refusals.items()), limit=None)
    client, experiment_id = mlflow_store.connect(jobs[0].tracking, create=create_experiment)
    if create_experiment:
        claims.close_stale(client, experiment_id, jobs[0].runner.stale_after_s)
    stored = runs.of_experiment(client, experiment_id)
    checked, first = [], {}
    for number, job in enumerate(jobs, start=1):
        found = preflight.of_cell(job)
        if found.fingerprint in first:  # a knob its method ignores: the same cell again
            earlier = checked[first[found.fingerprint] - 1]
            checked.append(replace(earlier, same_as=earlier.same_as or first[found.fingerprint]))
            continue
        first[found.fingerprint] = number
        previous = (None if found.invalid or job.force
                    else runs.finished(stored, found.fingerprint, traces.limits(job.runner)))
        checked.append(replace(found, store_asked=True, done=preflight.done(previous)))
    return checked


def plan(jobs: list[DictConfig], found_gpus: list[dict], named_gpu=None,
         create_experiment: bool = True,
         checked: list[preflight.Checked] | None = None) -> pd.DataFrame:
    """One row per job (see the module's docstring for the columns), from the jobs' checks
    (`checked`, else made here: check())."""
    if checked is None:
        checked = check(jobs, create_experiment)
    gpu = _gpu_to_compare(found_gpus, named_gpu)
    corrections = _corrections(jobs[0].tracking, gpu[2]) if gpu else {}
    rows, estimated = [], []
    for number, (job, found) in enumerate(zip(jobs, checked), start=1):
        cell_cfg = identity.cell_config(job)
        row = {"#": number, "cell": identity.run_name(cell_cfg), "model": job.model.name,
               "method": identity.method_label(job.method.name, job.method.optimizer),
               "precision": job.precision.name, "rank": cell_cfg["method"].get("r"),
               "strategy": identity.strategy_label(cell_cfg["strategy"]),
               "ranks": world_size(job.strategy),
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
    for (row, job, lengths_from, request), parts in zip(estimated, all_parts):
        row.update(_estimate_columns(job, request[0], request[1], lengths_from, parts))
        row.update(_time_columns(job, request[0], estimate.step_work(*request), parts,
                                 gpu and gpu[2], corrections.get(job.method.name)))
        if "predicted_train_min" in row and "reference_train_min" in row:
            row["time_ratio"] = row["predicted_train_min"] / row["reference_train_min"]
    table = pd.DataFrame(rows)
    table["gpu"] = gpu[0] if gpu else ""
    table["gpu_mib"] = gpu[1] if gpu else None
    estimates = table.get("estimate_mib", pd.Series([None] * len(table)))
    table["fits"] = [_fits(needed, gpu, ranks) for needed, ranks in zip(estimates, table.ranks)]
    return table


def _estimate_columns(job: DictConfig, cell_cfg: dict, lengths: dict, lengths_from: str,
                      parts: dict) -> dict:
    """The cell's lengths, its estimate and parts, and the reference figure it is compared with
    (`cell_cfg`: identity.cell_config(job), made once per job: it costs milliseconds)."""
    found = {"source_length": lengths["source"], "target_length": lengths["target"],
             "lengths": f"{lengths['source']}/{lengths['target']}", "lengths_from": lengths_from,
             **{f"{name}_mib": parts[name] for name in estimate.PARTS},
             "estimate_mib": parts["total"], "allocated_mib": parts["allocated"],
             "host_mib": parts["host"]}
    if job.method.name == "lomo":
        found["lomo_claim"] = accounting.lomo_claim(parts)
    keys = (job.model.name, identity.method_label(job.method.name, job.method.optimizer),
            identity.precision_label(job.precision.name, job.precision.master_weights,
                                     job.precision.get("autocast", True)),
            job.strategy.name)
    published = reference.row(*keys)
    other = published and reference.differences(
        published, identity.flat_params(cell_cfg, job))
    if other:  # the published figure is of another setup: no ratio to it
        found.update(reference=f"{published['table']}: other setup",
                     reference_setup="; ".join(other))
        return found
    if published and pd.notna(published.get("train_time_min")):
        found["reference_train_min"] = published["train_time_min"]
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


def _corrections(tracking_cfg, gpu_name: str) -> dict:
    """{method: (measured / predicted step time, runs)} of the ok runs the store holds that
    trained on this GPU: the median ratio per method."""
    client, _ = mlflow_store.connect(tracking_cfg, create=False)
    measured = runs.measured_on(client, gpu_name) if client is not None else pd.DataFrame()
    if not len(measured):
        return {}
    measured["ratio"] = measured["metrics.step_time_mean_s"] / measured["metrics.predicted_step_s"]
    return {method: (group.ratio.median(), len(group))
            for method, group in measured.groupby("params.method.name")}


def _time_columns(job: DictConfig, cell_cfg: dict, work_rows: list, parts: dict,
                  gpu_name: str | None, correction: tuple[float, int] | None) -> dict:
    """FLOPs per optimizer step (one rank's); on the GPU compared with, the predicted step time
    (harness/estimate/timing.py) and what bounds it, corrected by `correction` (_corrections'
    ratio for the cell's method) with the uncorrected figure beside it, plus what the strategy's
    transfers add where compute does not hide them (harness/estimate/communication.py); the
    steps the cell will run, its training time and, at conf/cost/'s price for that GPU, what it
    costs on all its ranks."""
    found = {"flops_per_step": work.flops(work_rows)}
    device = peaks.of_gpu(job.peaks, gpu_name)
    if device is None:
        return found
    predicted = timing.step_seconds(work_rows, device)
    model_s = predicted["step_s"]  # the time model's own
    step_s = model_s * (correction[0] if correction is not None else 1.0)
    moved = communication.seconds(parts, cell_cfg["strategy"], job.method.name,
                                  job.train.max_grad_norm is not None, device, step_s)
    if moved:
        found.update(comm_gb_per_step=moved["comm_bytes"] / 1e9, comm_s=moved["comm_s"],
                     comm_exposed_s=moved["exposed_s"])
        model_s += moved["exposed_s"]
        step_s += moved["exposed_s"]
    found.update(predicted_step_s=step_s,
                 bound=", ".join(f"{name} {predicted[name] / model_s:.0%}"
                                 for name in timing.BOUNDS if predicted[name])
                 + (f", transfers {moved['exposed_s'] / model_s:.0%}"
                    if moved and moved["exposed_s"] else ""),
                 peaks_from=device["source"])
    if correction is not None:
        found.update(predicted_step_s_uncorrected=model_s, time_correction=correction[0],
                     corrected_from=f"{correction[1]} {job.method.name} runs on {gpu_name}")
    rows = sources.train_rows(job.data)
    if rows is None and job.train.max_steps is None:
        return found
    batches = math.ceil((rows or 0) / job.train.batch_size)
    steps, _ = training_step.optimizer_steps(job.train, batches)
    ranks = world_size(job.strategy)
    found.update(train_steps=steps, predicted_train_min=step_s * steps / 60)
    if correction is not None:
        found["predicted_train_min_uncorrected"] = model_s * steps / 60
    price = cost.price(job.cost, gpu_name)
    if price is not None:
        found["predicted_cost_usd"] = found["predicted_train_min"] / 60 * ranks * price[0]
        found["usd_per_gpu_hour"] = price[0]
    return found


def _gpu_to_compare(found_gpus: list[dict], named_gpu) -> tuple[str, float, str] | None:
    """(label, MiB, NVML's name) of the smallest GPU found here, else of the experiment's
    plan_gpu, else None."""
    if found_gpus:
        smallest = min(found_gpus, key=lambda gpu: gpu["total_mib"])
        return f"{smallest['name']} (this machine)", smallest["total_mib"], smallest["name"]
    if named_gpu:
        return named_gpu.name, named_gpu.memory_mib, named_gpu.get("nvml_name", named_gpu.name)
    return None


def _fits(needed, gpu, ranks: int = 1) -> str:
    """yes / NO against the GPU; a distributed cell's estimate is one rank's, on each of its
    GPUs: "yes, on 8 x" of that GPU."""
    if needed is None or pd.isna(needed) or gpu is None:
        return ""
    if needed > gpu[1]:
        return "NO"
    return "yes" if ranks == 1 else f"yes, on {ranks} x"


def bill(table: pd.DataFrame) -> str:
    """The predicted training time and cost of the cells the sweep will run, in one line."""
    cells = table.drop_duplicates("fingerprint")
    cells = cells[cells.plan == "run"]
    if "predicted_train_min" not in cells or cells.predicted_train_min.isna().all():
        return ("no predicted time: the plan knows no peaks for "
                + (f"{table.gpu.iloc[0]} (add it to conf/peaks/)" if table.gpu.iloc[0]
                   else "a machine without a GPU (set plan_gpu)"))
    known = cells[cells.predicted_train_min.notna()]
    gpu_hours = (known.predicted_train_min * known.ranks).sum() / 60
    line = (f"predicted training: {gpu_hours:.1f} GPU-hours on {table.gpu.iloc[0]} for "
            f"{len(known)} of {len(cells)} cells to run")
    if "predicted_cost_usd" in known and known.predicted_cost_usd.notna().any():
        line += (f", {known.predicted_cost_usd.sum():.2f} USD at "
                 f"{known.usd_per_gpu_hour.iloc[0]:g} USD per GPU-hour (conf/cost/)")
    corrected = known.get("time_correction", pd.Series(dtype=float)).notna().sum()
    return line + (f"; {corrected} of them corrected by measured runs on that GPU (column "
                   "corrected_from)" if corrected else
                   "; uncorrected: the store holds no measured run on that GPU")


def shown(table: pd.DataFrame) -> pd.DataFrame:
    """The plan's columns for the terminal, one row per cell (grid points that differ only in a
    knob their method ignores are one cell), numbered as a sweep counts its cells."""
    cells = table.drop_duplicates("fingerprint").assign(**{"#": lambda frame: range(
        1, len(frame) + 1)})
    if "flops_per_step" in cells:
        cells["tflop_per_step"] = cells.flops_per_step / 1e12
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
    print(f"[harness] {bill(table)}")
    print(f"[harness] wrote {out / 'plan.csv'}")
    return 0

