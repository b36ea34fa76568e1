"""A sweep as users see it: the plan before any cell runs, progress across cells, and a summary
table at the end. A Hydra callback (conf/config.yaml registers it), so it works with every
launcher: the basic one, joblib (one worker per GPU) and submitit (SLURM, or its local executor).

The plan (harness/sweep/plan.py) expands the grid as Hydra's basic sweeper does, composes every
cell, and says for each what will happen (run; skip, with the reason; done already, with the run)
and its estimated peak GPU memory (harness/estimate/estimate.py) against the GPUs this machine has.
The summary reads the cells' runs back from MLflow, so it is right whichever process or machine ran
them. Both are printed and written beside Hydra's outputs in the sweep folder (plan.csv,
summary.csv).
"""

import sys
import time
import traceback
from pathlib import Path

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.config import identity, keys, validation
from harness.config.grids import BASIC_SWEEPER, cells
from harness.core.errors import EXIT_CODES, exit_code, refused
from harness.core.outcome import LIVE
from harness.core.tables import as_text
from harness.run import preflight


def summary(jobs: list[DictConfig]) -> pd.DataFrame:
    """One row per planned cell from its newest run in MLflow: status, times, peak memory."""
    from harness.tracking import mlflow_store, runs

    stored = runs.of_experiment(*mlflow_store.connect(jobs[0].tracking))
    rows, seen = [], set()
    for job in jobs:
        cell_cfg = identity.cell_config(job)
        fingerprint = identity.fingerprint(cell_cfg)
        if fingerprint in seen:  # ranks collapse for methods without adapters: one cell
            continue
        seen.add(fingerprint)
        run = runs.newest(stored, fingerprint)
        if run is None:
            rows.append({"cell": identity.run_name(cell_cfg), "status": "not run", "why": ""})
            continue
        ended = not pd.isna(run.get("end_time"))
        rows.append({
            "cell": identity.run_name(cell_cfg),
            "status": _text(run.get("tags.status")),
            "wall time (min)": ((run.end_time - run.start_time).total_seconds() / 60
                                if ended else None),
            "train time (min)": _number(run.get("metrics.train_time_s"), 1 / 60),
            "GPU peak (MiB)": _number(run.get("metrics.gpu_peak_mib")),
            "CPU peak (MiB)": _number(run.get("metrics.cpu_peak_mib")),
            "why": _text(run.get("tags.status_reason"))})
    return pd.DataFrame(rows, columns=["cell", "status", "wall time (min)", "train time (min)",
                                       "GPU peak (MiB)", "CPU peak (MiB)", "why"])


def _text(value) -> str:
    return "" if value is None or pd.isna(value) else value


def _number(value, scale: float = 1.0) -> float | None:
    return None if value is None or pd.isna(value) else value * scale


# Hydra loads this callback for single runs too, which validate their config before torch and
# MLflow load: the modules that bring them (gpus, plan, runner, tracking) are imported where a
# sweep uses them.
class SweepProgress(Callback):
    """Prints the plan, a line per cell as it starts and ends, and the summary."""

    def __init__(self):
        self.total = 0
        self.numbers = {}  # fingerprint: the cell's number in the plan
        self.started = None
        self.statuses = []  # how this process saw its cells end (the store says it for all)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        folder = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        if config.hydra.sweeper._target_ != BASIC_SWEEPER:
            preflight.forget(folder)  # its cells check themselves
            print("[harness] no plan: it expands the basic sweeper's grids only")
            return
        import torch

        from harness.core import tables
        from harness.measure import gpus
        from harness.sweep import plan

        # Every check once, for every cell: handed to each cell's runner in the sweep's folder.
        # Hydra only warns when a callback raises, and would run the cells anyway: whatever
        # stops the plan stops the sweep here.
        try:
            # What the machine cannot run at all holds for the whole experiment: refused before
            # its cells are composed (the full grid's take a minute).
            validation.check_machine(config, torch.cuda.is_available())
            jobs = cells(config)
            checked = preflight.on_this_machine(jobs, plan.check(jobs), torch.cuda.is_available())
            found = gpus.describe(gpus.candidates(config.runner.gpus))
            table = plan.plan(jobs, found, config.get("plan_gpu"), checked=checked)
        except Exception as error:  # noqa: BLE001 - a refusal, else a bug: no cell runs
            refusal = keys.refusal(error)
            if refusal is None:
                traceback.print_exc()
                print("[harness] the sweep's plan failed (a bug of the harness, above): no cell "
                      "ran", file=sys.stderr)
                sys.exit(EXIT_CODES["bug"])
            sys.exit(refused(refusal))
        preflight.save(folder, checked)
        self.total = len(jobs)
        self.numbers = {fingerprint: number for number, fingerprint in
                        enumerate(table.fingerprint.drop_duplicates(), start=1)}
        machine = (", ".join(f"GPU {gpu['gpu']}: {gpu['name']}, {gpu['total_mib']:.0f} MiB"
                             for gpu in found) or "no GPU found (the estimate is for a CUDA run"
                   + (f"; fits: against {table.gpu.iloc[0]})" if table.gpu.iloc[0] else ")"))
        counts = table.drop_duplicates("fingerprint")["plan"].value_counts()
        print(f"[harness] plan of {config.tracking.experiment}: {len(jobs)} grid points, "
              f"{table.fingerprint.nunique()} cells: "
              + ", ".join(f"{counts.get(action, 0)} to {action}" for action in
                          ("run", "skip")) + f", {counts.get('done', 0)} done already")
        print(f"[harness] {machine}")
        print(tables.as_text(plan.shown(table)))
        print(f"[harness] {plan.bill(table)}")
        _save(table, config, "plan.csv")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:  # a single run reports for itself
            return
        self.started = time.monotonic()
        print(f"[harness] cell {self._position(config)}: "
              f"{identity.run_name(identity.cell_config(config))}", flush=True)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return
        status = (job_return._return_value if job_return.status == JobStatus.COMPLETED
                  else f"error: {job_return._return_value!r}")
        self.statuses.append(status if job_return.status == JobStatus.COMPLETED else "failed")
        seconds = time.monotonic() - self.started if self.started else 0.0
        print(f"[harness] cell {self._position(config)} done: {status} ({seconds:.0f} s)",
              flush=True)

    def _position(self, config: DictConfig) -> str:
        """k/N among the plan's cells (grid points that are one cell share a number)."""
        fingerprint = identity.fingerprint(identity.cell_config(config))
        number = self.numbers.get(fingerprint)
        return f"{number or '?'}/{len(self.numbers) or '?'}"

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.total:  # no plan was made
            return
        undelivered = _undelivered(config)
        try:
            table = summary(cells(config))
        except Exception as error:  # noqa: BLE001 - the store went away: say so, lose nothing
            print(f"[harness] no summary of {config.tracking.experiment}: the store does not "
                  f"answer ({type(error).__name__})")
            table = None
        if table is not None:
            print(f"[harness] summary of {config.tracking.experiment}:")
            print(as_text(table))
            _save(table, config, "summary.csv")
        for line in undelivered:
            print(f"[harness] not delivered yet: {line}")
        if undelivered:
            print("[harness] `make sync` (python -m harness.sync) delivers them once the store "
                  "answers")
        print(f"[harness] browse the runs: make ui; the report: make report "
              f"EXP={config.tracking.experiment}")
        # The store's statuses, whichever process ran each cell; this process's where the
        # store does not answer. Non-zero when any cell did not end ok (or skipped).
        statuses = list(table.status) if table is not None else self.statuses or ["incomplete"]
        code = exit_code("incomplete" if status in ("not run", "", *LIVE) else status
                         for status in statuses)
        if code:
            print(f"[harness] exit {code}: not every cell ended ok ("
                  + ", ".join(f"{count} {status or 'running'}" for status, count in
                              pd.Series(statuses).value_counts().items()) + ")",
                  file=sys.stderr)
            sys.exit(code)


def _undelivered(sweep_config: DictConfig) -> list[str]:
    """The runs whose journal kept what the store did not take (harness/tracking/journal.py)."""
    from harness.tracking import journal

    return [f"run {journal.header(folder)['run_id']}: {journal.pending_entries(folder)} "
            f"journal entries in {folder}"
            for folder in journal.pending(Path(sweep_config.tracking.journal_dir))]


def _save(table: pd.DataFrame, sweep_config: DictConfig, name: str) -> None:
    folder = Path(OmegaConf.select(sweep_config, "hydra.sweep.dir"))
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / name, index=False)
