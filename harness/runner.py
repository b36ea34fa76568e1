"""The runner: validates a cell, owns its MLflow run and its memory sampler, runs the cell in a
fresh process, and records how it ended. A crash, a kill or an out-of-memory in the cell cannot
take the sweep, or any other cell's result, down with it.
"""

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import signal
import socket
import tempfile
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import Param, RunTag
from omegaconf import DictConfig, OmegaConf

from harness import cell as cell_module
from harness import cell_process, config, cost, data, estimate, gpus, hub, memory, stops, tracking
from harness.errors import ConfigError


def run(cfg: DictConfig) -> str:
    """Run one cell; return its status (ok, oom, diverged, skipped, failed; killed by Ctrl-C,
    which is raised on)."""
    config.validate(cfg)
    check_machine(cfg)
    invalid = (config.invalid_cell_reason(cfg)
               or config.machine_reason(cfg, torch.cuda.is_available()))
    if invalid and not _in_sweep():
        raise ConfigError(invalid)
    if not invalid:
        hub.check([cfg])
    cell = config.cell_config(cfg)
    fingerprint = config.fingerprint(cell)
    name = config.run_name(cell)
    client, experiment_id = tracking.connect(cfg.tracking)

    if not cfg.force:
        previous = tracking.finished_run(client, experiment_id, fingerprint,
                                         memory.limits(cfg.runner))
        if previous is not None:
            status = previous.data.tags["status"]
            print(f"[harness] {name}: already {status} in run {previous.info.run_id} "
                  f"(cell {fingerprint}); not run again")
            return status

    resolved = OmegaConf.to_yaml(
        {**cell, **{group: cfg[group] for group in config.OTHER_GROUPS}},
        resolve=True)
    run_id = tracking.start_run(client, experiment_id, name, config.flat_params(cell, cfg),
                                {"cell": fingerprint, "status": "running"}, resolved)
    if invalid:
        print(f"[harness] {name}: skipped: {invalid}")
        tracking.end_run(client, run_id, "skipped", invalid)
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
                        tracking.log_adapter_model(client, experiment_id, run_id,
                                                   cfg.tracking.uri, scratch / "adapter",
                                                   _adapter_model_config(cfg, cell))
                finally:  # the memory trace so far, however the cell ended
                    if (scratch / "sampler.csv").exists():
                        _record_memory(record, scratch, cfg.sampler, name)
                    if record.datasets:
                        _record_datasets(record, cfg, cell)
            _record_estimate(record, cfg, cell)
            _record_cost(record, cfg)
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
                _tag_oom_limit(client, run_id, cfg, record)
            tracking.end_run(client, run_id, *record.outcome)
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


class CellRecord:
    """Writes what the cell sends into its run as it arrives (metrics in batches), and keeps the
    phases and the outcome: (status, reason), None until known."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.log = tracking.MetricLogger(client, run_id)
        self.phases = []
        self.params = {}  # those the cell logged (the resolved lengths)
        self.gpu = None  # the GPU the cell held
        self.latest = {}  # the last value of each metric the cell sent
        self.datasets = {}  # split: rows, once the cell has loaded its data
        self.outcome = None

    def __call__(self, message: tuple) -> None:
        kind, *body = message
        if kind == "phase":
            self.phases.append(tuple(body))
        elif kind == "metrics":
            metrics, step, timestamp_ms = body
            self.log(metrics, step, timestamp_ms)
            self.latest.update(metrics)
        elif kind == "tag":
            self.client.set_tag(self.run_id, *body)
        elif kind == "datasets":
            self.datasets = body[0]
        elif kind == "params":
            self.params.update(body[0])
            self.client.log_batch(self.run_id, params=[Param(key, str(value))
                                                       for key, value in body[0].items()])
        elif kind == "artifact":
            path, folder = body
            write = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            write(self.run_id, path, folder)
        elif kind == "result":
            self.outcome = tuple(body)

    @property
    def phase(self) -> str:
        return self.phases[-1][0] if self.phases else "start"


def _in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_in_process(cfg: DictConfig, cell: dict, scratch: Path, record: CellRecord,
                    gpu: str | None) -> None:
    """Start the sampler, then the cell, both seeing only `gpu` (None: what this process sees);
    record what the cell sends until it ends, and how it ended."""
    context = cell_process.context(cfg.runner.start_method, torch.cuda.is_available())
    receive, send = context.Pipe(duplex=False)
    process = context.Process(
        target=cell_module.main, name="harness-cell",
        args=(cell, cfg.cache_dir, str(scratch), cfg.runner.cpu_memory_limit_mib, send))
    sampler = (memory.SamplerProcess(cfg.sampler.interval_ms, scratch / "sampler.csv", gpu)
               if cfg.sampler.enabled else None)
    oom_kills_before = kernel_oom_kills()
    try:
        with _visible_gpu(gpu):  # a spawned cell starts with this environment
            process.start()
        send.close()
        if sampler:
            sampler.watch(process.pid)
        # Which process is this run, for a user (or a test) who has to find or stop it.
        record.client.log_batch(record.run_id, tags=[RunTag("host", socket.gethostname()),
                                                     RunTag("pid", str(process.pid))])
        _follow(receive, process, record)
    finally:
        if process.is_alive():  # interrupted: the cell must not outlive its run
            process.terminate()
        process.join()
        if sampler:
            sampler_cpu_s = sampler.stop()
            if sampler_cpu_s is not None:  # what the measurement cost
                record.log({"sampler_cpu_s": sampler_cpu_s})

    phase = record.phase
    if record.outcome is not None:
        status, reason = record.outcome
        if status == "oom":
            record.outcome = ("oom", f"out of memory in phase {phase}: {reason}")
    elif process.exitcode < 0:
        killer = signal.Signals(-process.exitcode).name
        if _oom_killed(oom_kills_before):
            record.outcome = ("oom", f"killed by the kernel's OOM killer ({killer}) in phase "
                                     f"{phase}")
        else:
            record.outcome = ("failed", f"the cell process was killed by {killer} in phase "
                                        f"{phase}")
    else:
        record.outcome = ("failed", f"the cell process exited with code {process.exitcode} in "
                                    f"phase {phase} without a result")


@contextlib.contextmanager
def _visible_gpu(gpu: str | None):
    """CUDA_VISIBLE_DEVICES=gpu in this process's environment for the block (a no-op for None)."""
    if gpu is None:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _follow(receive, process, handle) -> None:
    """Hand each message of the cell to `handle` until the cell ends. Waits on the process too:
    a killed cell sends nothing more."""
    while True:
        ready = multiprocessing.connection.wait([receive, process.sentinel])
        if receive in ready:
            try:
                handle(receive.recv())
                continue
            except EOFError:  # the cell closed its end: it is exiting
                pass
        break
    process.join()
    while receive.poll():  # sent just before the exit
        try:
            handle(receive.recv())
        except EOFError:
            break


def kernel_oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this process's memory cgroup
    (cgroup v2 memory.events, v1 memory.oom_control); None where neither can be read."""
    root, own = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")
    if not own.exists():  # not Linux
        return None
    for line in own.read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            folders, name = (root / path.lstrip("/"), root), "memory.events"
        elif "memory" in controllers.split(","):
            folders, name = (root / "memory" / path.lstrip("/"), root / "memory"), \
                "memory.oom_control"
        else:
            continue
        # Inside a container the cgroup's own folder is often mounted as the root.
        for folder in folders:
            if (folder / name).exists():
                found = re.search(r"^oom_kill (\d+)$", (folder / name).read_text(), re.MULTILINE)
                if found:
                    return int(found.group(1))
    return None


def _oom_killed(before: int | None) -> bool:
    after = kernel_oom_kills()
    return before is not None and after is not None and after > before


def _tag_oom_limit(client, run_id: str, cfg: DictConfig, record: CellRecord) -> None:
    """Which memory the cell ran out of and how much there was (oom_limit: cpu or gpu,
    oom_limit_mib): a rerun skips the cell only where there is no more of it."""
    kind = "gpu" if "CUDA" in record.outcome[1] else "cpu"
    available = memory.limits(cfg.runner, record.gpu)[kind]
    if available is not None:
        client.log_batch(run_id, tags=[RunTag("oom_limit", kind),
                                       RunTag("oom_limit_mib", f"{available:.0f}")])


def _record_cost(record: CellRecord, cfg: DictConfig) -> None:
    """cost_usd and train_tokens_per_usd at the price of the GPU the cell held (conf/cost/),
    with the price and where it comes from as tags; nothing where no price is known."""
    trained = {key: record.latest.get(key) for key in ("train_time_s", "train_tokens")}
    found = gpus.describe([record.gpu]) if record.gpu is not None else []
    rate = cost.price(cfg.cost, found[0]["name"] if found else None)
    if None in trained.values() or rate is None:
        return
    record.log(cost.of_run(rate[0], **trained))
    record.client.log_batch(record.run_id, tags=[RunTag("cost_usd_per_hour", f"{rate[0]:g}"),
                                                 RunTag("cost_price_from", rate[1])])


def _record_datasets(record: CellRecord, cfg: DictConfig, cell: dict) -> None:
    """The splits the cell loaded as the run's dataset inputs; the same data under the same
    tokenizer and cut has one digest. A failure here leaves the cell's outcome as it is."""
    identity = json.dumps([cell["data"], data.tokenizer_identity(cfg.model), record.params],
                          sort_keys=True, default=str)
    try:
        tracking.log_datasets(record.client, record.run_id, cfg.data, record.datasets, identity)
    except Exception:
        traceback.print_exc()
        record.client.set_tag(record.run_id, "datasets", "not recorded: "
                              + traceback.format_exc().strip().splitlines()[-1])


def _record_estimate(record: CellRecord, cfg: DictConfig, cell: dict) -> None:
    """The plan's estimate of the cell's peak GPU memory beside what it measured, at the lengths
    the cell resolved: estimate_gpu_mib and its parts (estimate_weights_mib, ...)."""
    lengths = {side: record.params.get(f"data.{key}_resolved")
               for side, key in data.SIDES.items()}
    if None in lengths.values():  # the cell ended before it loaded its data
        lengths, _ = data.planned_lengths(cfg.data, cfg.model, cfg.cache_dir)
    if lengths is None:
        return
    try:
        parts = estimate.gpu_peak_mib(cell, lengths, cfg.cache_dir)
    except Exception:
        traceback.print_exc()
        record.client.set_tag(record.run_id, "estimate", "not computed: "
                              + traceback.format_exc().strip().splitlines()[-1])
        return
    record.log({("estimate_gpu_mib" if name == "total" else f"estimate_{name}_mib"): value
                for name, value in parts.items()})
    record.log.flush()


def _record_memory(record: CellRecord, scratch: Path, sampler_cfg, title: str) -> None:
    """Peaks as metrics, the series as gpu_mib / cpu_mib, the trace as csv and png artifacts; the
    last sample in an oom's reason. A failure here leaves the cell's own outcome as it is."""
    client, run_id = record.client, record.run_id
    try:
        trace = memory.read_trace(scratch / "sampler.csv", record.phases)
        log = record.log
        log(memory.peaks(trace))
        names = ["cpu_mib"] + (["gpu_mib"] if trace.attrs["gpu_source"] else [])
        for row in memory.downsample(trace, sampler_cfg.metric_max_points).itertuples():
            log({name: getattr(row, name) for name in names}, step=int(row.time_s * 1000),
                timestamp_ms=int(row.time * 1000))
        log.flush()
        if trace.attrs["gpu_source"]:
            client.set_tag(run_id, "gpu_memory_source",
                           memory.GPU_SOURCES[trace.attrs["gpu_source"]])
        csv_path, png_path = scratch / "memory_trace.csv", scratch / "memory_trace.png"
        memory.downsample(trace, sampler_cfg.csv_max_rows).drop(columns="time").to_csv(
            csv_path, index=False, float_format="%.3f")
        memory.plot(trace, png_path, title)
        client.log_artifact(run_id, str(csv_path))
        client.log_artifact(run_id, str(png_path))
    except Exception:
        traceback.print_exc()
        client.set_tag(run_id, "memory_trace", "not recorded: "
                       + traceback.format_exc().strip().splitlines()[-1])
        return
    if record.outcome is not None and record.outcome[0] == "oom":
        record.outcome = ("oom", f"{record.outcome[1]}; {memory.last_sample(trace)}")
