"""The runner: validates a cell, owns its MLflow run and its memory sampler, runs the cell in a
fresh process, and records how it ended. A crash, a kill or an out-of-memory in the cell cannot
take the sweep, or any other cell's result, down with it.
"""

import os
import platform
import signal
import socket
import tempfile
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import RunTag
from omegaconf import DictConfig, OmegaConf

from harness.cell import entry
from harness.config import hub, identity, validation
from harness.core.errors import ConfigError
from harness.core.options import OTHER_GROUPS
from harness.measure import gpus, traces
from harness.run import process, stops
from harness.run.record import (
    CellRecord,
    record_cost,
    record_datasets,
    record_estimate,
    record_memory,
    tag_oom_limit,
)
from harness.tracking import mlflow_store


def run(cfg: DictConfig) -> str:
    """Run one cell; return its status (ok, oom, diverged, skipped, failed; killed by Ctrl-C,
    which is raised on)."""
    validation.validate(cfg)
    check_machine(cfg)
    invalid = (validation.invalid_cell_reason(cfg)
               or validation.machine_reason(cfg, torch.cuda.is_available()))
    if invalid and not _in_sweep():
        raise ConfigError(invalid)
    if not invalid:
        hub.check([cfg])
    cell = identity.cell_config(cfg)
    fingerprint = identity.fingerprint(cell)
    name = identity.run_name(cell)
    client, experiment_id = mlflow_store.connect(cfg.tracking)

    if not cfg.force:
        previous = mlflow_store.finished_run(client, experiment_id, fingerprint,
                                         traces.limits(cfg.runner))
        if previous is not None:
            status = previous.data.tags["status"]
            print(f"[harness] {name}: already {status} in run {previous.info.run_id} "
                  f"(cell {fingerprint}); not run again")
            return status

    resolved = OmegaConf.to_yaml(
        {**cell, **{group: cfg[group] for group in OTHER_GROUPS}},
        resolve=True)
    run_id = mlflow_store.start_run(client, experiment_id, name, identity.flat_params(cell, cfg),
                                {"cell": fingerprint, "status": "running"}, resolved)
    if invalid:
        print(f"[harness] {name}: skipped: {invalid}")
        mlflow_store.end_run(client, run_id, "skipped", invalid)
        return "skipped"

    record, stopped = CellRecord(client, run_id), None
    with stops.stop_signals():
        try:
            with (tempfile.TemporaryDirectory(prefix="harness-cell-") as folder,
                  gpus.claim(gpus.candidates(cfg.runner.gpus),
                             Path(cfg.runner.gpu_lock_dir)) as gpu):
                if gpu is not None:
                    client.set_tag(run_id, "gpu", gpu)
                record.gpu = gpu
                client.set_tag(run_id, "device", _device(gpu))
                scratch = Path(folder)
                try:
                    _run_in_process(cfg, cell, scratch, record, gpu)
                    if record.outcome[0] == "ok" and (scratch / "adapter").is_dir():
                        mlflow_store.log_adapter_model(client, experiment_id, run_id,
                                                   cfg.tracking.uri, scratch / "adapter",
                                                   _adapter_model_config(cfg, cell))
                finally:  # the memory trace so far, however the cell ended
                    if (scratch / "sampler.csv").exists():
                        record_memory(record, scratch, cfg.sampler, name)
                    if record.datasets:
                        record_datasets(record, cfg, cell)
            record_estimate(record, cfg, cell)
            record_cost(record, cfg)
        except KeyboardInterrupt as stop:
            # Ctrl-C, a kill, a time limit: this run is KILLED, every finished one stays as it is.
            stopped = stop
            why = stop.reason if isinstance(stop, stops.Stopped) else "interrupted"
            record.outcome = ("killed", f"{why} in phase {record.phase}; a rerun runs this cell "
                                        "again")
            raise
        finally:
            record.log.flush()
            if record.outcome is None:  # the runner itself failed
                record.outcome = ("failed", "the runner was interrupted")
            if record.outcome[0] == "oom":  # out of memory here; elsewhere it may fit
                tag_oom_limit(client, run_id, cfg, record)
            mlflow_store.end_run(client, run_id, *record.outcome)
            if isinstance(stopped, stops.Stopped):  # now whoever handled the signal before
                stopped.pass_on()
    status, reason = record.outcome
    print(f"[harness] {name}: {status}" + (f": {reason}" if reason else ""))
    if not _in_sweep():  # a sweep ends with its summary instead
        print(_headline(client.get_run(run_id), cfg.tracking))
    return status


def _adapter_model_config(cfg: DictConfig, cell: dict) -> dict:
    """What the adapter's MLflow model needs to rebuild its base and summarise as the cell did."""
    return {"model": cell["model"], "prefix": cfg.data.get("prefix", ""),
            "max_new_tokens": cfg.eval.max_new_tokens}


def _device(gpu: str | None) -> str:
    """What the cell ran on, in words: its GPU's name, else the host's processor."""
    found = gpus.describe([gpu]) if gpu is not None else []
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
               figure("CPU peak", "cpu_peak_mib", " MiB")]
    if "cost_usd" in metrics:
        figures.append(figure("cost", "cost_usd", " USD", 4))
    uri = tracking_cfg.uri
    browse = (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/"
              f"{run.info.run_id}" if uri.startswith(("http://", "https://"))
              else f"make ui (or: mlflow ui --backend-store-uri {uri})")
    return (f"[harness] {', '.join(figures)}\n"
            f"[harness] logged to experiment {tracking_cfg.experiment!r}, run "
            f"{run.info.run_id}, in {uri}\n[harness] browse it: {browse}")


def check_machine(cfg: DictConfig) -> None:
    """Refuse what this machine cannot run (ConfigError), before any run is created."""
    cuda = torch.cuda.is_available()
    if cfg.requires_gpu and not cfg.allow_cpu and not cuda:
        raise ConfigError(f"experiment {cfg.tracking.experiment} is meant for a GPU "
                          "(requires_gpu=true) and this machine has no CUDA device: run "
                          "`make demo` for the CPU grid, or add allow_cpu=true to run it here")
    if cfg.runner.start_method == "forkserver" and cuda:
        raise ConfigError("runner.start_method=forkserver cannot start a cell that uses CUDA: "
                          "the server imports bitsandbytes, which initialises CUDA, and a forked "
                          "child cannot use it; use runner.start_method=spawn (or auto)")


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_in_process(cfg: DictConfig, cell: dict, scratch: Path, record: CellRecord,
                    gpu: str | None) -> None:
    """Start the sampler, then the cell, both seeing only `gpu` (None: what this process sees);
    record what the cell sends until it ends, and how it ended."""
    context = process.context(cfg.runner.start_method, torch.cuda.is_available())
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=entry.main, name="harness-cell",
        args=(cell, cfg.cache_dir, str(scratch), cfg.runner.cpu_memory_limit_mib, send))
    sampler = (traces.SamplerProcess(cfg.sampler.interval_ms, scratch / "sampler.csv", gpu)
               if cfg.sampler.enabled else None)
    oom_kills_before = process.kernel_oom_kills()
    try:
        with process.visible_gpu(gpu):  # a spawned cell starts with this environment
            child.start()
        send.close()
        if sampler:
            sampler.watch(child.pid)
        # Which process is this run, for a user (or a test) who has to find or stop it.
        record.client.log_batch(record.run_id, tags=[RunTag("host", socket.gethostname()),
                                                     RunTag("pid", str(child.pid))])
        process.follow(receive, child, record)
    finally:
        if child.is_alive():  # interrupted: the cell must not outlive its run
            child.terminate()
        child.join()
        if sampler:
            sampler_cpu_s = sampler.stop()
            if sampler_cpu_s is not None:  # what the measurement cost
                record.log({"sampler_cpu_s": sampler_cpu_s})

    phase = record.phase
    if record.outcome is not None:
        status, reason = record.outcome
        if status == "oom":
            record.outcome = ("oom", f"out of memory in phase {phase}: {reason}")
    elif child.exitcode < 0:
        killer = signal.Signals(-child.exitcode).name
        if process.oom_killed(oom_kills_before):
            record.outcome = ("oom", f"killed by the kernel's OOM killer ({killer}) in phase "
                                     f"{phase}")
        else:
            record.outcome = ("failed", f"the cell process was killed by {killer} in phase "
                                        f"{phase}")
    else:
        record.outcome = ("failed", f"the cell process exited with code {child.exitcode} in "
                                    f"phase {phase} without a result")


