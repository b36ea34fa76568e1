"""What the memory sampler costs the training it watches, measured in one process: the
benchmark cell's step (its model, its method's updates, one batch at the cell's fixed lengths)
runs in windows of a few steps while the sampler (harness/measure/sampler.py, as a cell runs it)
watches this process, and between windows the sampler is stopped (SIGSTOP: a stopped process
is never scheduled, so it costs nothing) or let run again. The windows alternate on, off, off,
on, ..., so that a drift of the machine's speed (other tenants, frequency) falls on both alike.

Two whole runs, one sampled and one not, differ by more than the sampler costs: on a shared
2-core machine a cell's throughput moves by 10 to 20 % from one run to the next. Within one
process, window against window, that noise mostly cancels. The ratio is the median over
neighbouring pairs of windows of the mean step time sampled over the mean step time not.
"""

import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness.config import identity
from harness.measure import traces
from harness.model import training_step


def measure(cfg, pairs: int = 20, window_steps: int = 8, warmup_steps: int = 10) -> dict:
    """{"ratio": the median pair's sampled / unsampled step time, "pooled": all sampled steps'
    mean over all unsampled steps', "on_step_s", "off_step_s", "pair_ratios", "samples_on" and
    "samples_off": the samples taken within each kind of window} for the cell `cfg` (a composed
    cell config) on this machine's CPU or GPU."""
    cell = identity.cell_config(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lengths = {"source": round(cell["data"]["source_length_median"]),
               "target": round(cell["data"]["target_length_median"])}
    total = warmup_steps + 2 * pairs * window_steps
    step, updates = training_step.one_batch_steps(cfg, cfg.train.batch_size, lengths, device,
                                                  total + 1)

    def steps(count: int) -> tuple[float, float, float]:
        """(start, end) in unix seconds and the seconds per step of `count` steps."""
        start, started = time.time(), time.perf_counter()
        for _ in range(count):
            step().item()  # as the training loop reads each step's loss
        training_step.synchronize(device)
        return start, time.time(), (time.perf_counter() - started) / count

    interval_ms = traces.interval_ms(cfg.sampler, device.type == "cuda")
    windows = {True: [], False: []}  # sampled or not: their (start, end, seconds per step)
    with tempfile.TemporaryDirectory(prefix="harness-sampler-cost-") as folder:
        trace_csv = Path(folder) / "trace.csv"
        sampler = traces.SamplerProcess(interval_ms, trace_csv)
        sampler.watch(os.getpid())
        try:
            steps(warmup_steps)
            for pair in range(pairs):
                for sampled in ((True, False) if pair % 2 == 0 else (False, True)):
                    os.kill(sampler.process.pid, signal.SIGCONT if sampled else signal.SIGSTOP)
                    windows[sampled].append(steps(window_steps))
        finally:
            os.kill(sampler.process.pid, signal.SIGCONT)  # a stopped process cannot stop
            sampler.stop()
        sample_times = traces.read_trace(trace_csv, [])["time"]
    updates.close()
    on, off = ([seconds for _, _, seconds in windows[sampled]] for sampled in (True, False))
    ratios = [sampled / unsampled for sampled, unsampled in zip(on, off)]
    # Proof that the windows are what they say: no sample falls in a window it was stopped for.
    samples = {sampled: sum(int(((sample_times > start) & (sample_times < end)).sum())
                            for start, end, _ in windows[sampled]) for sampled in (True, False)}
    return {"ratio": statistics.median(ratios), "pooled": sum(on) / sum(off),
            "on_step_s": statistics.median(on), "off_step_s": statistics.median(off),
            "pair_ratios": ratios, "pairs": pairs, "window_steps": window_steps,
            "interval_ms": interval_ms, "samples_on": samples[True], "samples_off": samples[False]}
