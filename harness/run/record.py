"""The record of a run, on the runner's side: what the cell sends, written into its MLflow run
(through the run's journal, harness/tracking/journal.py) as it arrives, and what the runner adds
once the cell has ended (memory trace, dataset inputs, the plan's estimate, cost, an oom's limit).
What fails to be added is tagged "not recorded" and never changes the cell's own outcome.
"""

import contextlib
import json
import socket
import time
import traceback
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from harness.cell.to_runner import (
    Artifact,
    Datasets,
    Metrics,
    Params,
    Phase,
    Ranks,
    Tag,
)
from harness.config import cost
from harness.core.errors import disk_full
from harness.core.outcome import Outcome
from harness.data import checks, encoding
from harness.estimate import estimate, timing, work
from harness.measure import gpus, peaks, traces
from harness.model import tokenizers
from harness.tracking import mlflow_store
from harness.tracking.journal import Journal


class CellRecord:
    """Writes what the cell sends into its run's journal as it arrives, and keeps the phases and
    what the cell reported of its outcome (`reported`, None until it has)."""

    def __init__(self, journal: Journal):
        self.journal, self.run_id = journal, journal.run_id
        self.phases = []
        self.params = {}  # those the cell logged (the resolved lengths)
        self.gpu = None  # the GPU the cell held
        self.latest = {}  # the last value of each metric the cell sent
        self.datasets = {}  # split: rows, once the cell has loaded its data
        self.reported = None  # the cell's own Outcome, once it has sent one
        self.ranks = []  # a distributed cell's rank pids in rank order (None: another host's)
        self.on_ranks = None  # called with {rank: pid} of this host's (the sampler watches them)
        self.cell_ended = False  # the runner records what the cell left (phase "record")

    def __call__(self, message) -> None:
        """Record one of harness/cell/to_runner.py's messages."""
        match message:
            case Phase(name, started):
                self.phases.append((name, started))
                self.journal.set_tag("phase", name)  # where a run whose runner vanished was
            case Metrics(values, step, timestamp_ms):
                self.journal.metrics(values, step, timestamp_ms)
                self.latest.update(values)
            case Tag(name, value):
                self.journal.set_tag(name, value)
            case Datasets(rows):
                self.datasets = rows
            case Params(values):
                self.params.update(values)
                self.journal.params(values)
            case Artifact(path, folder):
                self.journal.artifact(path, folder)
            case Ranks(processes):  # for whoever must find a rank
                here = socket.gethostname()
                self.ranks = [pid if host == here else None for host, pid in processes]
                self.journal.set_tag("rank_pids", ",".join(
                    f"{pid}" if host == here else f"{host}:{pid}" for host, pid in processes))
                if self.on_ranks is not None:  # the sampler watches this host's
                    self.on_ranks({rank: pid for rank, pid in enumerate(self.ranks)
                                   if pid is not None})
            case Outcome():
                self.reported = message
            case _:
                raise TypeError(f"not a message of harness/cell/to_runner.py: {message!r}")

    @property
    def phase(self) -> str:
        """Where the cell is: start (before it loads), load, train, eval, infer, or record (the
        runner's, once the cell has ended). Every status_reason starts with it."""
        if self.cell_ended:
            return "record"
        return self.phases[-1][0] if self.phases else "start"


@contextlib.contextmanager
def not_recorded(record: CellRecord, tag: str, words: str = "not recorded"):
    """Run the block; if it fails, print the traceback and tag the run `tag`: "<words>: <the
    error's last line>", leaving the cell's outcome as it is."""
    try:
        yield
    except Exception as error:
        full = disk_full(error)  # said in one line: a full disk fails every write alike
        if full is None:
            traceback.print_exc()
        else:
            print(f"[harness] run {record.run_id}: {tag} {words}: {full}")
        record.journal.set_tag(tag, f"{words}: "
                               + (full or traceback.format_exc().strip().splitlines()[-1]))


def tag_oom_limit(record: CellRecord, cfg: DictConfig, outcome: Outcome) -> None:
    """Which memory an oom ran out of and how much there was (oom_limit: cpu or gpu,
    oom_limit_mib): a rerun skips the cell only where there is no more of it."""
    kind = "gpu" if "CUDA" in outcome.reason else "cpu"
    available = traces.limits(cfg.runner, record.gpu)[kind]
    if available is not None:
        record.journal.tags({"oom_limit": kind, "oom_limit_mib": f"{available:.0f}"})


def record_cost(record: CellRecord, cfg: DictConfig) -> None:
    """cost_usd and train_tokens_per_usd at the price of the GPU the cell held (conf/cost/),
    with the price and where it comes from as tags; nothing where no price is known."""
    trained = {key: record.latest.get(key) for key in ("train_time_s", "train_tokens")}
    rate = cost.price(cfg.cost, _gpu_name(record))
    if None in trained.values() or rate is None:
        return
    record.journal.metrics(cost.of_run(rate[0], **trained), 0, _now_ms())
    record.journal.tags({"cost_usd_per_hour": f"{rate[0]:g}", "cost_price_from": rate[1]})


def _gpu_name(record: CellRecord) -> str | None:
    """The name NVML gives the GPU the cell held; None without one, or when NVML cannot tell."""
    found = gpus.describe([record.gpu]) if record.gpu is not None else []
    return found[0]["name"] if found else None


def record_datasets(record: CellRecord, cfg: DictConfig, cell_cfg: dict) -> None:
    """The splits the cell loaded as the run's dataset inputs; the same data under the same
    tokenizer and cut has one digest. A failure here leaves the cell's outcome as it is."""
    what = json.dumps([cell_cfg["data"], tokenizers.tokenizer_identity(cfg.model), record.params],
                      sort_keys=True, default=str)
    with not_recorded(record, "datasets"):
        mlflow_store.log_datasets(record.journal, cfg.data, record.datasets, what)


def record_estimate(record: CellRecord, cfg: DictConfig, cell_cfg: dict) -> None:
    """The plan's estimate of the cell's peak GPU memory beside what it measured, at the lengths
    the cell resolved: estimate_gpu_mib and its parts (estimate_weights_mib, ...); and its work
    (record_work)."""
    lengths = {side: record.params.get(f"data.{key}_resolved")
               for side, key in checks.SIDES.items()}
    if None in lengths.values():  # the cell ended before it loaded its data
        lengths, _ = encoding.planned_lengths(cfg.data, cfg.model, cfg.cache_dir)
    if lengths is None:
        return
    parts = None
    with not_recorded(record, "estimate", "not computed"):
        parts = estimate.gpu_peak_mib(cell_cfg, lengths, cfg.cache_dir)
    if parts is None:
        return
    record.journal.metrics({("estimate_gpu_mib" if name == "total" else f"estimate_{name}_mib"):
                            value for name, value in parts.items()}, 0, _now_ms())
    with not_recorded(record, "work"):
        record_work(record, cfg, cell_cfg, lengths)


def record_work(record: CellRecord, cfg: DictConfig, cell_cfg: dict, lengths: dict) -> None:
    """What one optimizer step computes on one rank (train_flops_per_step), at the mean lengths
    its batches were padded to (the resolved cuts for a cell that did not train: exact for
    batches padded to them), and on the device the cell ran on (conf/peaks/ for its GPU, this
    machine's measured peaks for a CPU): the predicted step and training time beside the
    measured, the achieved TFLOP/s over the timed steps (step_time_mean_s) and MFU, the time the
    step's FLOPs take at the device's peak for the dtypes they run in over the measured."""
    padded = {side: record.latest.get(f"train_{side}_length_mean") for side in lengths}
    if None not in padded.values():  # dynamic padding: shorter batches than the cut
        lengths = {side: max(1, round(length)) for side, length in padded.items()}
    device = peaks.of_cpu() if record.gpu is None else peaks.of_gpu(cfg.peaks, _gpu_name(record))
    # A calibrated CPU prices the ops a CPU runs (attention's math path, the optimizer tensor by
    # tensor); otherwise the step simulated as on CUDA, whose FLOPs are the same.
    on_cpu = record.gpu is None and device is not None and "calibration" in device
    work_rows = estimate.step_work(cell_cfg, lengths, cfg.cache_dir,
                                   "cpu" if on_cpu else "cuda")
    flops = work.flops(work_rows)
    figures = {"train_flops_per_step": flops}
    steps, step_s = record.latest.get("train_steps"), record.latest.get("step_time_mean_s")
    if device is not None:
        # A calibrated CPU: each of the step's ops measured here (harness/measure/op_times.py).
        predicted = (timing.on_this_cpu(cell_cfg, lengths, cfg.cache_dir, device) if on_cpu
                     else timing.step_seconds(work_rows, device))["step_s"]
        figures["predicted_step_s"] = predicted
        if steps is not None:
            figures["predicted_train_time_s"] = predicted * steps
    if step_s:
        figures["train_tflops_per_s"] = flops / step_s / 1e12
        if device is not None:
            figures["mfu"] = timing.ideal_seconds(work_rows, device) / step_s
    record.journal.metrics(figures, 0, _now_ms())
    if device is not None:
        record.journal.tags({"peaks_device": device["name"], "peaks_from": device["source"]})


def record_memory(record: CellRecord, scratch: Path, sampler_cfg, title: str,
                  outcome: Outcome | None) -> Outcome | None:
    """Peaks as metrics, the series as gpu_mib / cpu_mib, the trace as csv and png artifacts;
    `outcome`, with the last sample in an oom's reason. A failure here leaves it as it is."""
    journal = record.journal
    trace = None
    with not_recorded(record, "memory_trace"):
        trace = traces.read_trace(scratch / "sampler.csv", record.phases)
        journal.metrics(traces.with_high_water_marks(traces.peaks(trace), record.latest), 0,
                        _now_ms())
        names = ["cpu_mib"] + (["gpu_mib"] if trace.attrs["gpu_source"] else [])
        journal.series([[name, getattr(row, name), int(row.time * 1000), int(row.time_s * 1000)]
                        for row in traces.downsample(trace, sampler_cfg.metric_max_points)
                        .itertuples() for name in names])
        if trace.attrs["gpu_source"]:
            journal.set_tag("gpu_memory_source", traces.GPU_SOURCES[trace.attrs["gpu_source"]])
        csv_path, png_path = scratch / "memory_trace.csv", scratch / "memory_trace.png"
        traces.downsample(trace, sampler_cfg.csv_max_rows).drop(columns="time").to_csv(
            csv_path, index=False, float_format="%.3f")
        traces.plot(trace, png_path, title)
        journal.artifact(csv_path)
        journal.artifact(png_path)
        if outcome is not None and outcome.status == "oom":
            outcome = replace(outcome, reason=f"{outcome.reason}; {traces.last_sample(trace)}")
    return outcome


def _now_ms() -> int:
    return int(time.time() * 1000)
