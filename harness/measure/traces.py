"""Memory of a cell, as the runner records it: the sampler process beside the cell, its trace
turned into peaks per phase, MLflow series and artifacts; and, inside the cell, the breakdown of
the live tensors into parameters, gradients and optimizer state.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from harness.core.units import MIB
from harness.measure import gpus
from harness.measure.sampler import RANKS_SUFFIX

PHASES = ("load", "train", "eval", "infer")
GPU_SOURCES = {"process": "NVML used memory of the cell's processes",
               "device": "NVML used memory of the device (no per-process figures from the "
                         "driver; other processes on the GPU are included)"}


def interval_ms(sampler_cfg, on_gpu: bool) -> float:
    """The sampler's interval for a cell: sampler.interval_ms where it trains on a GPU (its
    host's cores mostly wait on the device, so a wake-up takes no time from it), and the longer
    sampler.cpu_interval_ms where it trains on the CPU, whose threads take every core: there
    each wake-up costs the training about 0.2 ms (make bench measures it)."""
    return sampler_cfg.interval_ms if on_gpu else sampler_cfg.cpu_interval_ms


class SamplerProcess:
    """`python -m harness.measure.sampler` beside a cell: start it, watch(pid), and stop() it."""

    def __init__(self, interval_ms: float, out: Path, cuda_visible_devices: str | None = None):
        self.out = Path(out)
        environment = dict(os.environ)
        if cuda_visible_devices is not None:  # the GPU the cell sees (harness/measure/gpus.py)
            environment["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness.measure.sampler", "--interval-ms", str(interval_ms),
             "--out", str(self.out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=environment)
        # Wait until it has imported and initialised NVML, so the cell's first moments count.
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the memory sampler did not start (exit {self.process.wait()})")
        # Its start-up, before the cell exists, costs the cell nothing: count from here.
        self.start_cpu_s = self._cpu_s()

    def _cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def watch(self, pid: int) -> None:
        self.process.stdin.write(f"{pid}\n")
        self.process.stdin.flush()

    def watch_ranks(self, pids: dict) -> None:
        """A distributed cell's ranks on this host, {rank: pid}: each is sampled on its own too."""
        if self.process.poll() is None:
            pairs = " ".join(f"{rank}:{pid}" for rank, pid in pids.items())
            self.process.stdin.write(f"ranks {pairs}\n")
            self.process.stdin.flush()

    def stop(self) -> float | None:
        """Stop sampling; return the CPU seconds the sampler used while it watched, if known."""
        cpu_s = None
        if self.process.poll() is None:
            cpu_s = self._cpu_s() - self.start_cpu_s
            self.process.stdin.close()  # the sampler stops when its stdin closes
        self.process.wait(timeout=30)
        return cpu_s


def read_trace(path: Path, phase_starts: list[tuple[str, float]]) -> pd.DataFrame:
    """The sampler's csv as time_s (since the first sample), phase, gpu_mib, gpu_device_mib,
    cpu_mib, and a distributed cell's cpu_mib_rank<n> / gpu_mib_rank<n>. gpu_mib is the
    per-process figure where the driver gave one, else the device's; `trace.attrs["gpu_source"]`
    says which (None without a GPU)."""
    raw = pd.read_csv(path)
    per_rank = Path(f"{path}{RANKS_SUFFIX}")
    if per_rank.exists():  # the same rows, from when the ranks started
        raw = raw.merge(pd.read_csv(per_rank).dropna(axis="columns", how="all"), on="time",
                        how="left")
    trace = pd.DataFrame({"time": raw["time"], "time_s": raw["time"] - raw["time"].min()})
    # A sample belongs to the last phase that started before it; before the first, to load.
    names = [name for name, _ in phase_starts] or [PHASES[0]]
    starts = np.array([start for _, start in phase_starts] or [raw["time"].min()])
    index = np.searchsorted(starts, raw["time"].to_numpy(), side="right") - 1
    trace["phase"] = np.array(names)[np.clip(index, 0, None)]
    per_process = raw["gpu_mib"]
    if per_process.notna().any() and (per_process > 0).any():
        trace["gpu_mib"], source = per_process.fillna(0.0), "process"
    elif raw["gpu_device_mib"].notna().any():
        trace["gpu_mib"], source = raw["gpu_device_mib"], "device"
    else:
        trace["gpu_mib"], source = np.nan, None
    trace["gpu_device_mib"] = raw["gpu_device_mib"]
    trace["cpu_mib"] = raw["cpu_mib"]
    for column in rank_columns(raw):
        trace[column] = raw[column]
    trace.attrs["gpu_source"] = source
    return trace


def rank_columns(trace: pd.DataFrame, kind: str | None = None) -> list[str]:
    """The per-rank columns (cpu_mib_rank0, gpu_mib_rank0, ...), of one kind where given."""
    return [column for column in trace.columns if "_mib_rank" in column
            and (kind is None or column.startswith(f"{kind}_"))]


def peaks(trace: pd.DataFrame) -> dict:
    """gpu_peak_mib, cpu_peak_mib over the cell, and per phase (gpu_train_peak_mib, ...); with
    ranks, each rank's too (gpu_peak_mib_rank1, cpu_train_peak_mib_rank1, ...). cpu_peak_mib is
    the whole process tree's; a distributed cell's gpu_peak_mib is its fullest GPU's (one rank
    each), the figure to hold against one card's memory."""
    columns = ["cpu_mib"] + (["gpu_mib"] if trace.attrs.get("gpu_source") else [])
    columns += rank_columns(trace, "cpu")
    if trace.attrs.get("gpu_source") == "process":
        columns += rank_columns(trace, "gpu")
    metrics = {}
    for column in columns:
        kind, _, rank = column.removesuffix("_mib").partition("_mib_")
        suffix = f"_{rank}" if rank else ""
        kind = kind.removesuffix("_mib")
        metrics[f"{kind}_peak_mib{suffix}"] = trace[column].max()
        for phase, peak in trace.groupby("phase")[column].max().items():
            metrics[f"{kind}_{phase}_peak_mib{suffix}"] = peak
    gpu_ranks = [key for key in metrics if key.startswith("gpu_") and "_rank" in key]
    for key in {key.rsplit("_rank", 1)[0] for key in gpu_ranks}:
        metrics[key] = max(metrics[name] for name in gpu_ranks
                           if name.rsplit("_rank", 1)[0] == key)
    if trace.attrs.get("gpu_source"):
        metrics["gpu_device_peak_mib"] = trace["gpu_device_mib"].max()
    return metrics


def with_high_water_marks(metrics: dict, reported: dict) -> dict:
    """peaks()'s `metrics`, each host peak raised to the cell process's own high-water mark
    where the cell `reported` a higher one (cpu_<phase>_hwm_mib[_rank<n>]: harness/measure/
    host_peak.py): a sample falls once an interval and misses a peak between two; the kernel's
    mark misses none. It covers the cell's process alone, not its children, so it raises the
    sampled peak of the tree and never replaces it."""
    raised = dict(metrics)
    for key, mark in reported.items():
        if "_hwm_mib" in key:
            peak = key.replace("_hwm_mib", "_peak_mib")
            overall = "cpu_peak_mib" + peak.partition("_peak_mib")[2]
            raised[peak] = max(raised.get(peak, 0.0), mark)
            raised[overall] = max(raised.get(overall, 0.0), mark)
    return raised


def downsample(trace: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most max_points rows: the maximum of each run of consecutive samples, so that no peak
    is lost (a plain stride would skip a spike between two kept samples)."""
    if len(trace) <= max_points:
        return trace
    bucket = np.arange(len(trace)) * max_points // len(trace)
    frame = trace.select_dtypes("number").groupby(bucket).max()
    frame[["time", "time_s"]] = trace[["time", "time_s"]].groupby(bucket).min()
    frame["phase"] = trace["phase"].groupby(bucket).last()
    frame = frame[trace.columns].reset_index(drop=True)
    frame.attrs = dict(trace.attrs)
    return frame


def last_sample(trace: pd.DataFrame) -> str:
    """The last sampled memory, for an oom's status_reason."""
    if trace.empty:
        return "no memory sample"
    row = trace.iloc[-1]
    gpu = f", gpu {row['gpu_mib']:.0f} MiB" if trace.attrs.get("gpu_source") else ""
    return f"last sampled at {row['time_s']:.1f} s: cpu {row['cpu_mib']:.0f} MiB{gpu}"


def plot(trace: pd.DataFrame, path: Path, title: str) -> None:
    """Memory over time, one line per source, the phases shaded and named."""
    # Imported here: the cell process uses this module too and need not carry matplotlib.
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4), dpi=100)
    axes.plot(trace["time_s"], trace["cpu_mib"], label="host RSS (cell's processes)")
    if trace.attrs.get("gpu_source"):
        axes.plot(trace["time_s"], trace["gpu_mib"],
                  label=f"GPU ({GPU_SOURCES[trace.attrs['gpu_source']].split(' (')[0]})")
    kind = "gpu" if trace.attrs.get("gpu_source") == "process" else "cpu"
    for column in rank_columns(trace, kind):  # a distributed cell's ranks, one line each
        axes.plot(trace["time_s"], trace[column], linewidth=0.8, linestyle="--",
                  label=f"{'GPU' if kind == 'gpu' else 'host RSS'} of {column.split('_')[-1]}")
    spans = trace.groupby("phase", sort=False)["time_s"].agg(["min", "max"])
    for shade, (phase, span) in zip(("#f2f2f2", "#e0ecf8", "#fdf0dc", "#e6f4e6"),
                                    spans.iterrows()):
        axes.axvspan(span["min"], span["max"], color=shade, zorder=0)
        axes.text((span["min"] + span["max"]) / 2, 1.0, phase, ha="center", va="bottom",
                  transform=axes.get_xaxis_transform())
    axes.set(xlabel="time since the cell started (s)", ylabel="MiB")
    axes.set_title(title, pad=18)
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def limits(runner_cfg, gpu: str | None = None) -> dict:
    """The memory a cell may use here, in MiB: {"cpu": runner.cpu_memory_limit_mib, else the
    host's memory; "gpu": the GPU it holds (`gpu`), else the smallest it may get, else None}."""
    cpu = runner_cfg.cpu_memory_limit_mib or psutil.virtual_memory().total / MIB
    found = gpus.describe([gpu] if gpu is not None else gpus.candidates(runner_cfg.gpus))
    return {"cpu": float(cpu),
            "gpu": min((g["total_mib"] for g in found), default=None)}
