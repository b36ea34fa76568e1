"""What a cell's training step spends on this CPU outside its ops: Python (transformers' and
peft's modules, the loop), autograd's graph and the backward engine's scheduling, for each op the
step calls. harness/estimate/timing.py's on_this_cpu adds it to the ops' own times (harness/
measure/op_times.py), which leave it out.

It is measured on the cell's own model, method and loop, with a batch of one example of a few
tokens: every op is then tiny, so the step is mostly this time, and the same ops measured one by
one say how much is not. The model calls as many ops per block at any batch and length, so the
time per call carries over to the cell's own step; measured on two tiny cells of different shape
against their replayed ops, it was 2-5 us per call on a two-core CPU.
"""

import time
from pathlib import Path

import torch

from harness.estimate import work
from harness.measure import op_times
from harness.model import training_step

CPU = torch.device("cpu")
TINY = {"source": 4, "target": 4}  # tokens: every op small
WARMUP, TIMED = 3, 10


def seconds_per_call(cfg, op_cache: Path | None = None) -> float:
    """Seconds per op call a training step of `cfg`'s cell (a resolved cell config) spends on
    this CPU outside its ops (the ops' own times cached in the user's cache or `op_cache`)."""
    step, updates = training_step.one_batch_steps(cfg, 1, TINY, CPU, WARMUP + TIMED + 1, "fp32")
    for _ in range(WARMUP):
        step()
    best = float("inf")
    for _ in range(TIMED):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    counted = work.Work(signatures=True)
    with counted:
        counted.recording = True
        step()
    updates.close()
    calls = work.calls_per_step(counted.calls, 1)
    measured = op_times.seconds([called for called, _ in calls], CPU, op_cache)
    in_ops = sum(count * (measured[called] or 0.0) for called, count in calls)
    return max(0.0, best - in_ops) / sum(count for _, count in calls)
