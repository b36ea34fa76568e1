"""The runner: takes a cell's checks (made once, harness/run/preflight.py), claims the cell's MLflow
run (harness/tracking/claims.py), owns it and the cell's memory sampler, runs the cell in a fresh
process, and records how it ended, through the run's journal (harness/tracking/journal.py). A
crash, a kill or an out-of-memory in the cell cannot take the sweep, or any other cell's result,
down with it; nor can a tracking store that stops answering.
"""

import os
import platform
import signal
import socket
import tempfile
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.cell import entry
from harness.config import identity
from harness.core.errors import ConfigError, disk_full
from harness.core.options import OTHER_GROUPS
from harness.measure import gpus, traces
from harness.run import preflight, process, stops
from harness.run.record import (
    CellRecord,
    Outcome,
    not_recorded,
    record_cost,
    record_datasets,
    record_estimate,
    record_memory,
    tag_oom_limit,
)
from harness.strategy import nodes
from harness.tracking import claims, mlflow_store, runs
from harness.tracking.journal import Journal

# The runner's own retries (the journal's) replace most of MLflow's: its defaults (7 retries,
# backoff factor 2) hold a write for about 6.5 minutes before it fails.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def run(cfg: DictConfig, checked: preflight.Checked | None = None) -> str:
    """Run one validated cell (python -m harness validates before torch loads; a sweep's plan
    validates every cell) and return its status: ok, oom, diverged, skipped, failed, duplicate (a
    grid point of the sweep that another one runs); killed by Ctrl-C or a signal, which is raised
    on; elsewhere: another runner has claimed the cell. `checked`: what the checks before it
    found (harness/run/preflight.py), where a sweep made them; else they are made here."""
    cell_cfg = identity.cell_config(cfg)
    name = identity.run_name(cell_cfg)
    if cfg.strategy.nnodes > 1 and nodes.node_rank(cfg.strategy) > 0:
        return _another_node(cfg, cell_cfg, name)
    [checked] = preflight.on_this_machine([cfg], [checked or preflight.of_cell(cfg)],
                                       torch.cuda.is_available())
    if checked.reason and not _in_sweep():
        raise ConfigError(checked.reason)
    for variable, value in MLFLOW_HTTP.items():
        os.environ.setdefault(variable, value)
    client, experiment_id = mlflow_store.connect(cfg.tracking)
    # A sweep's plan closed its experiment's stale runs; again for this cell, just before it.
    claims.close_stale(client, experiment_id, cfg.runner.stale_after_s,
                       checked.fingerprint if checked.store_asked else None)
    done = checked.done
    if not checked.store_asked and not cfg.force:
        done = preflight.done(runs.finished_run(client, experiment_id, checked.fingerprint,
                                             traces.limits(cfg.runner)))
    if done is not None:
        print(f"[harness] {name}: already {done['status']} in run {done['run_id']} "
              f"(cell {checked.fingerprint}); not run again")
        return done["status"]
    if checked.same_as is not None:
        print(f"[harness] {name}: the same cell as grid point {checked.same_as} of this sweep "
              f"(cell {checked.fingerprint}), which runs it")
        return "duplicate"

    resolved = OmegaConf.to_yaml(
        {**cell_cfg, **{group: cfg[group] for group in OTHER_GROUPS}},
        resolve=True)
    run_id, holder = claims.claim(
        client, experiment_id, name, checked.fingerprint, identity.flat_params(cell_cfg, cfg),
        resolved, tracking_uri=cfg.tracking.uri, settle_s=cfg.runner.claim_settle_s,
        force=cfg.force, limits=traces.limits(cfg.runner))
    if run_id is None:
        print(f"[harness] {name}: {holder} (cell {checked.fingerprint}); not run here")
        return "elsewhere"
    try:
        journal = Journal(Path(cfg.tracking.journal_dir) / run_id, client, run_id,
                          experiment_id).start()
    except OSError as error:  # checked writable before; a disk that filled since
        why = disk_full(error) or f"{type(error).__name__}: {error}"
        mlflow_store.close(client, run_id, "failed", f"start: its journal cannot be written "
                                                     f"in {cfg.tracking.journal_dir}: {why}")
        print(f"[harness] {name}: failed: start: its journal cannot be written: {why}")
        return "failed"
    if checked.reason:
        print(f"[harness] {name}: skipped: {checked.reason}")
        mlflow_store.end_run(journal, "skipped", checked.reason)
        _deliver(journal, cfg, name)
        return "skipped"

    outcome = _run_and_close(cfg, cell_cfg, name, experiment_id, CellRecord(journal))
    print(f"[harness] {name}: {outcome}")
    if not _in_sweep() and not journal.pending():  # a sweep ends with its summary instead
        print(_headline(client.get_run(run_id), cfg.tracking))
    return outcome.status


def _deliver(journal: Journal, cfg: DictConfig, name: str) -> None:
    """Wait up to tracking.deliver_wait_s for the journal to reach the store; say where what it
    could not deliver is, and how to deliver it later."""
    left = journal.close(cfg.tracking.deliver_wait_s)
    if left:
        print(f"[harness] {name}: {left} journal entries of run {journal.run_id} not delivered "
              f"to {cfg.tracking.uri} (it does not answer); they are kept in {journal.folder}: "
              "`make sync` delivers them once it answers")


def _run_and_close(cfg: DictConfig, cell_cfg: dict, name: str, experiment_id: str,
                   record: CellRecord) -> Outcome:
    """Run the cell and record what it sends and what the runner adds; close its run with how it
    ended, however that was (Ctrl-C, a signal, the runner's own failure)."""
    outcome, stopped = None, None
    with stops.stop_signals():
        try:
            outcome = _run_on_a_gpu(cfg, cell_cfg, name, experiment_id, record)
            record_estimate(record, cfg, cell_cfg)
            record_cost(record, cfg)
        except KeyboardInterrupt as stop:
            # Ctrl-C, a kill, a time limit: this run is KILLED, every finished one stays as it is.
            stopped = stop
            why = stop.reason if isinstance(stop, stops.Stopped) else "interrupted"
            outcome = Outcome("killed", f"{record.phase}: {why}; a rerun runs this cell again")
            raise
        except Exception as error:
            if outcome is None:
                outcome = Outcome("failed", f"{record.phase}: the runner failed: "
                                            f"{type(error).__name__}: {error}")
            raise
        finally:
            outcome = outcome or Outcome("failed", f"{record.phase}: the runner was interrupted")
            if outcome.status == "oom":  # out of memory here; elsewhere it may fit
                tag_oom_limit(record, cfg, outcome)
            mlflow_store.end_run(record.journal, outcome.status, outcome.reason)
            _deliver(record.journal, cfg, name)
            if isinstance(stopped, stops.Stopped):  # now whoever handled the signal before
                stopped.pass_on()
    return outcome


def _run_on_a_gpu(cfg: DictConfig, cell_cfg: dict, name: str, experiment_id: str,
                  record: CellRecord) -> Outcome:
    """Claim a GPU (where there are any), run the cell in a scratch folder, and record its
    adapter, memory trace and datasets; how the cell ended."""
    journal = record.journal
    with (tempfile.TemporaryDirectory(prefix="harness-cell-") as folder,
          gpus.claim(gpus.candidates(cfg.runner.gpus), Path(cfg.runner.gpu_lock_dir),
                     count=cfg.strategy.nproc_per_node) as gpu):
        if gpu is not None:
            journal.set_tag("gpu", gpu)
        record.gpu = gpu
        journal.set_tag("device", _device(gpu))
        scratch, outcome = Path(folder), None
        try:
            outcome = _run_in_process(cfg, cell_cfg, scratch, record, gpu)
            if outcome.status == "ok" and (scratch / "adapter").is_dir():
                with not_recorded(record, "adapter_model"):
                    journal.adapter_model(experiment_id, scratch / "adapter",
                                          _adapter_model_config(cfg, cell_cfg))
        finally:  # the memory trace so far, however the cell ended
            if (scratch / "sampler.csv").exists():
                outcome = record_memory(record, scratch, cfg.sampler, name, outcome)
            if record.datasets:
                record_datasets(record, cfg, cell_cfg)
    return outcome


def _another_node(cfg: DictConfig, cell_cfg: dict, name: str) -> str:
    """A node of a cell across nodes other than the first: claim its GPUs, launch its ranks, and
    say how they ended. The first node's runner owns the run and records it (its ranks gather
    every rank's figures); this one touches no store."""
    node = nodes.node_rank(cfg.strategy)
    context = process.context(cfg.runner.start_method, torch.cuda.is_available())
    ended = []
    with (tempfile.TemporaryDirectory(prefix="harness-cell-") as folder,
          gpus.claim(gpus.candidates(cfg.runner.gpus), Path(cfg.runner.gpu_lock_dir),
                     count=cfg.strategy.nproc_per_node) as gpu):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=entry.main, name="harness-cell", args=(
            cell_cfg, cfg.cache_dir, folder, cfg.runner.cpu_memory_limit_mib, send))
        try:
            with stops.stop_signals(), process.visible_gpu(gpu):
                child.start()
                send.close()
                process.follow(receive, child, lambda message: isinstance(message, Outcome)
                               and ended.append(message))
        finally:
            process.stop(child)
    outcome = ended[0] if ended else Outcome("failed", f"node {node}'s launcher exited with code "
                                                       f"{child.exitcode} without a result")
    print(f"[harness] {name}: node {node} of {cfg.strategy.nnodes} (the first node's run "
          f"records the cell): {outcome}")
    return outcome.status


def _adapter_model_config(cfg: DictConfig, cell_cfg: dict) -> dict:
    """What the adapter's MLflow model needs to rebuild its base and summarise as the cell did."""
    return {"model": cell_cfg["model"], "prefix": cfg.data.get("prefix", ""),
            "max_new_tokens": cfg.eval.max_new_tokens}


def _device(gpu: str | None) -> str:
    """What the cell ran on, in words: its GPU's name (`2 x NVIDIA H100` for a distributed
    cell's), else the host's processor."""
    found = gpus.describe(gpu.split(",")) if gpu is not None else []
    if len(found) > 1:
        return f"{len(found)} x {found[0]['name']}"
    if found:
        return found[0]["name"]
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _headline(run, tracking_cfg) -> str:
    """A finished single run's figures, where it was logged, and how to browse it."""
    metrics = run.data.metrics

    def figure(label: str, key: str, unit: str, decimals: int = 0) -> str:
        value = metrics.get(key)
        return f"{label} —" if value is None else f"{label} {value:.{decimals}f}{unit}"

    figures = [figure("ROUGE-1", "rouge1", "", 2), figure("train", "train_time_s", " s", 1),
               figure("GPU peak", "gpu_peak_mib", " MiB"),
               figure("estimate", "estimate_gpu_mib", " MiB"),
               figure("CPU peak", "cpu_peak_mib", " MiB"),
               figure("of which baseline", "cpu_baseline_mib", " MiB")]
    if "cost_usd" in metrics:
        figures.append(figure("cost", "cost_usd", " USD", 4))
    uri = tracking_cfg.uri
    browse = (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/"
              f"{run.info.run_id}" if uri.startswith(("http://", "https://"))
              else f"make ui (or: mlflow ui --backend-store-uri {uri})")
    return (f"[harness] {', '.join(figures)}\n"
            f"[harness] logged to experiment {tracking_cfg.experiment!r}, run "
            f"{run.info.run_id}, in {uri}\n[harness] browse it: {browse}")


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_in_process(cfg: DictConfig, cell_cfg: dict, scratch: Path, record: CellRecord,
                    gpu: str | None) -> Outcome:
    """Start the sampler, then the cell, both seeing only `gpu` (None: what this process sees);
    record what the cell sends until it ends; how it ended."""
    context = process.context(cfg.runner.start_method, torch.cuda.is_available())
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=entry.main, name="harness-cell",
        args=(cell_cfg, cfg.cache_dir, str(scratch), cfg.runner.cpu_memory_limit_mib, send))
    interval_ms = traces.interval_ms(cfg.sampler, torch.cuda.is_available())
    sampler = (traces.SamplerProcess(interval_ms, scratch / "sampler.csv", gpu)
               if cfg.sampler.enabled else None)
    oom_kills_before = process.kernel_oom_kills()
    try:
        with process.visible_gpu(gpu):  # a spawned cell starts with this environment
            child.start()
        send.close()
        if sampler:
            sampler.watch(child.pid)
            record.on_ranks = sampler.watch_ranks
        # Which process is this run, for a user (or a test) who has to find or stop it.
        record.journal.tags({"host": socket.gethostname(), "pid": str(child.pid)})
        process.follow(receive, child, record, every_s=cfg.runner.heartbeat_s,
                       tick=lambda: record.journal.set_tag("heartbeat", f"{time.time():.0f}"))
    finally:
        process.stop(child)  # interrupted: the cell, and its ranks, must not outlive its run
        if sampler:
            sampler_cpu_s = sampler.stop()
            if sampler_cpu_s is not None:  # what the measurement cost
                record.journal.metrics({"sampler_cpu_s": sampler_cpu_s}, 0,
                                       int(time.time() * 1000))

    phase, reported = record.phase, record.reported
    record.cell_ended = True  # what fails from here fails in phase "record"
    if reported is not None:
        if reported.status == "oom":
            return Outcome("oom", f"{phase}: out of memory: {reported.reason}")
        if (("killed by SIGKILL" in reported.reason or "without a result" in reported.reason)
                and process.oom_killed(oom_kills_before)):
            # A distributed cell's rank, killed by the kernel's OOM killer.
            return Outcome("oom", f"{phase}: {reported.reason}: the kernel's OOM killer")
        return Outcome(reported.status, f"{phase}: {reported.reason}" if reported.reason else "")
    if child.exitcode < 0:
        killer = signal.Signals(-child.exitcode).name
        if process.oom_killed(oom_kills_before):
            return Outcome("oom", f"{phase}: killed by the kernel's OOM killer ({killer})")
        return Outcome("failed", f"{phase}: the cell process was killed by {killer}")
    return Outcome("failed", f"{phase}: the cell process exited with code {child.exitcode} "
                             "without a result")
