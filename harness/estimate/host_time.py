"""What a cell's training step spends on this CPU outside its ops: Python (transformers' and
peft's modules, the loop), autograd's graph and the backward engine's scheduling, for each op the
step calls. harness/estimate/timing.py's on_this_cpu adds it to the ops' own times (harness/
measure/op_times.py), which leave it out.

It is measured on the cell's own model, method and loop, with a batch of one example of a few
tokens: every op is then tiny, so the step is mostly this time, and the same ops measured one by
one say how much is not. The model calls as many ops per block at any batch and length, so the
time per call carries over to the cell's own step; measured on two tiny cells of different shape
against their replayed ops, it was 2-5 us per call on a two-core CPU.

The loop also waits for each batch: its loader draws the examples and pads them into tensors
(`loader_seconds_per_batch`), on the loop's own thread, before the step can begin. It is
measured on the cell's loader (harness/data/loaders.py, its family's collate and its tokenizer)
over examples of the step's lengths.
"""

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from harness.data import loaders, synthetic
from harness.estimate import work
from harness.measure import calibration, op_times
from harness.model import families, models, training_step

CPU = torch.device("cpu")
TINY = {"source": 4, "target": 4}  # tokens: every op small
WARMUP, TIMED = 3, 10
LOADER_BATCHES, LOADER_PASSES = 16, 3


def seconds_per_call(cfg, op_cache: Path | None = None, device: torch.device = CPU) -> float:
    """Seconds per op call a training step of `cfg`'s cell (a resolved cell config) spends on
    this CPU outside its ops (the ops' own times cached in the user's cache or `op_cache`). On a
    GPU (`device`) the step's tiny kernels run while the host dispatches the next op, so the
    step is the host's time, and its time per call is all of the host's: dispatch, Python,
    autograd (bench/step_profile.py sets it beside the calibration's op_us)."""
    step, updates = training_step.one_batch_steps(cfg, 1, TINY, device, WARMUP + TIMED + 1,
                                                  "fp32")
    best = training_step.best_seconds(step, device, WARMUP, TIMED)
    counted = work.Work(signatures=True)
    with counted:
        counted.recording = True
        step()
    updates.close()
    calls = work.calls_per_step(counted.calls, 1)
    if device.type != "cpu":
        return best / sum(count for _, count in calls)
    measured = op_times.seconds([called for called, _ in calls], CPU, op_cache)
    in_ops = sum(count * (measured[called] or 0.0) for called, count in calls)
    return max(0.0, best - in_ops) / sum(count for _, count in calls)


def loader_seconds_per_batch(cfg, lengths: dict) -> float:
    """Seconds the training loop of `cfg`'s cell (a resolved cell config) waits for each batch
    of examples of `lengths` (the fastest of LOADER_PASSES passes through step_loader's). Each
    batch is drawn after a write through calibration.WORKING_SET bytes: in the loop the step's
    ops between two batches evict the loader's data from the caches (a tiny-llama batch of 8
    took 0.17 ms with the caches warm, 0.42 ms after the write, 0.55 ms in the loop)."""
    loader = step_loader(cfg, lengths)
    evicting = torch.zeros(calibration.WORKING_SET // 4)
    best = float("inf")
    for _ in range(LOADER_PASSES):
        waited, batches = 0.0, iter(loader)
        for _ in range(len(loader)):
            evicting.add_(1.0)
            start = time.perf_counter()
            next(batches)
            waited += time.perf_counter() - start
        best = min(best, waited)
    return best / len(loader)


def step_loader(cfg, lengths: dict) -> DataLoader:
    """The cell's loader (its batch size, its family's collate, its tokenizer) over
    LOADER_BATCHES batches of synthetic examples of exactly `lengths`, assembled as its family
    does."""
    family, tokenizer = families.of(cfg.model), models.load_tokenizer(cfg.model)
    shape = OmegaConf.create({
        "seed": cfg.train.seed, "train_size": cfg.train.batch_size * LOADER_BATCHES,
        "validation_size": 1, "test_size": 1, "length_sigma": 0.0, "padding": cfg.data.padding,
        "train_on_inputs": cfg.data.get("train_on_inputs", False),
        **{f"{side}_length_median": lengths[side] for side in lengths},
        **{f"longest_{side}": lengths[side] for side in lengths}})
    examples = synthetic.synthetic(shape, len(tokenizer), lengths, family)["train"]
    return loaders.training(examples, cfg.train.batch_size, cfg.train.seed,
                            family.collate(tokenizer))
