"""The runner: validates a cell, owns its MLflow run, runs it in a fresh process, records how it
ended. A crash, a kill or an out-of-memory in the cell cannot take the sweep down with it.
"""

import multiprocessing
import signal

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness import cell as cell_module
from harness import config, tracking
from harness.errors import ConfigError
from harness.memory import PeakSampler


def run(cfg: DictConfig) -> str:
    """Run one cell; return its status (ok, oom, diverged, skipped, failed)."""
    config.validate(cfg)
    invalid = config.invalid_cell_reason(cfg)
    if invalid and not _in_sweep():
        raise ConfigError(invalid)
    cell = config.cell_config(cfg)
    fingerprint = config.fingerprint(cell)
    name = config.run_name(cell)
    client, experiment_id = tracking.connect(cfg.tracking)

    if cfg.runner.skip_finished:
        previous = tracking.finished_run(client, experiment_id, fingerprint)
        if previous is not None:
            status = previous.data.tags["status"]
            print(f"[harness] {name}: already {status} in run {previous.info.run_id} "
                  f"(cell {fingerprint}); not run again")
            return status

    resolved = OmegaConf.to_yaml({**cell, "tracking": cfg.tracking, "runner": cfg.runner},
                                 resolve=True)
    run_id = tracking.start_run(client, experiment_id, name, config.flat_params(cell, cfg),
                                {"cell": fingerprint, "status": "running"}, resolved)
    if invalid:
        print(f"[harness] {name}: skipped: {invalid}")
        tracking.end_run(client, run_id, "skipped", invalid)
        return "skipped"

    status, reason = "failed", "the runner was interrupted"
    try:
        status, reason, peaks = _run_in_process(cfg, cell, run_id)
        client.log_metric(run_id, "cpu_peak_mib", peaks.cpu_peak_mib)
        if peaks.gpu_peak_mib is not None:
            client.log_metric(run_id, "gpu_peak_mib", peaks.gpu_peak_mib)
    finally:
        tracking.end_run(client, run_id, status, reason)
    print(f"[harness] {name}: {status}" + (f": {reason}" if reason else ""))
    return status


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_in_process(cfg: DictConfig, cell: dict, run_id: str):
    context = multiprocessing.get_context(cfg.runner.start_method)
    if cfg.runner.start_method == "forkserver":
        # The server imports torch and transformers once; every cell forks from it.
        context.set_forkserver_preload(["harness.cell"])
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=cell_module.main, name="harness-cell",
        args=(cell, cfg.cache_dir, cfg.tracking.uri, run_id, cfg.runner.cpu_memory_limit_mib,
              send))
    process.start()
    send.close()
    with PeakSampler(process.pid, cfg.runner.sample_interval_ms / 1000) as peaks:
        try:
            process.join()
        except KeyboardInterrupt:
            process.terminate()
            process.join()
            raise
    if receive.poll():
        status, reason = receive.recv()
    elif process.exitcode < 0:
        status = "failed"
        reason = f"the cell process was killed by {signal.Signals(-process.exitcode).name}"
    else:
        status = "failed"
        reason = f"the cell process exited with code {process.exitcode} without a result"
    return status, reason, peaks
