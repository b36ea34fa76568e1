"""A cell's peak GPU memory, estimated before it runs, on any machine, without a GPU (its command
line: harness/estimate/__main__.py).

What it does: it builds the cell's model on PyTorch's meta device (shapes and dtypes, no data) as
the cell does (weights stored in the cell's precision: float32, half for the frozen weights of
bf16 / fp16 LoRA, bitsandbytes LLM.int8 or 4-bit layers for int8 / nf4), applies the method with
peft, switches on activation checkpointing where train.gradient_checkpointing says so, and runs
two training steps of the cell's own code (harness/model/training_step.py: forward and Updates:
loss, backward, clipping, the optimizer, bitsandbytes' 8-bit one included, or LOMO's fused updates)
on a batch of train.batch_size examples padded to the resolved source and target lengths, as
the model's family builds a batch (a causal model: prompt and response as one sequence).
harness/estimate/simulate.py makes that step behave as on CUDA (autocast's casts, the
memory-efficient attention kernel) and records every tensor it allocates and frees (a deep
model's middle blocks repeat: its step is written out from the same model with five blocks a
stack, harness/estimate/depth.py, where that is exact). Then:

  weights      the weights and quantization scales, as stored (nf4: two weights a byte, a scale
               per 64, itself quantized per 256 with double quantization);
  gradients    the gradients alive at the step's peak (all trainable weights' for an optimizer,
               one weight's at a time for LOMO's fused updates);
  optimizer    the optimizer state alive at the peak (AdamW: two moments and a step per tensor;
               8-bit AdamW: two int8 moments and a float32 scale per 256 values; a paged
               optimizer counts as resident, as it is until the GPU runs short);
  activations  everything else alive at the peak: what autograd keeps for backward (with
               checkpointing: the inputs of every block, plus the block being recomputed), the
               logits, the loss and their gradients, autocast's half copies, and the
               temporaries of the op that set the peak;
  allocator    what PyTorch's caching allocator reserves beyond the tensors alive at its peak,
               from a replay of the same allocations and frees through its documented rules
               (harness/estimate/allocator.py): blocks rounded up, segments of 2 / 20 MiB, freed
               blocks cached rather than returned; with the cuBLAS workspaces it hands out;
  cuda_context what a process that has initialised CUDA, cuBLAS and PyTorch's kernels holds
               outside the allocator: a typical figure (CUDA_CONTEXT_MIB), not a measurement.

  total = weights + the simulated peak (gradients + optimizer + activations) + allocator
          + cuda_context

Under a distributed strategy the step simulated is one rank's, at its micro-batch (train.batch_size
/ ranks), and harness/estimate/sharding.py shares the weights, gradients and optimizer state out
as the engine does: `total` is one rank's GPU, `host` what that rank keeps on the host (offload).

which is what NVML (nvidia-smi) shows for the cell's process during training; `allocated`
(total less allocator and cuda_context) is what torch.cuda.max_memory_allocated shows.

Left out: the memory inside a kernel that is not a tensor (cuBLAS and attention workspaces
beyond what the allocator hands out), LLM.int8's outlier columns (data-dependent; counted as
none), evaluation and generation (smaller than training for these cells), the loading phase
(the cell returns what loading cached to the device before it trains), the fp16 loss scale (two
numbers), and other processes on the GPU. The study's own figures may include some of these.
"""

import gc
import hashlib
import json
import multiprocessing
import signal
import sys
import time
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from harness.config import identity
from harness.core.cores import usable_cores
from harness.core.files import write_whole
from harness.core.units import MIB
from harness.estimate import (
    allocator,
    depth,
    meta_outputs,
    sharding,
    simulate,
    steps,
    work,
)
from harness.estimate import marks as block_marks
from harness.measure import accounting
from harness.model import (
    families,
    lomo,
    methods,
    models,
    optimizers,
    tokenizers,
    training_step,
)
from harness.strategy.sizes import world_size

# A CUDA context with PyTorch's kernels loaded lazily (CUDA >= 11.7), cuBLAS initialised: about
# what nvidia-smi shows for a process that has run a matmul. `make gpu-check` measures it on a
# GPU as NVML's peak less the allocator's reserved peak.
CUDA_CONTEXT_MIB = 500
# cuBLAS's workspace per thread, from the caching allocator, kept for the process's life: PyTorch's
# documented default CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8 (Hopper GPUs get more).
CUBLAS_WORKSPACE_BYTES = 2 * 4096 * 1024 + 8 * 16 * 1024
PARTS = ("weights", "gradients", "optimizer", "activations", "allocator", "cuda_context")
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
# A spawned worker takes about this long to import torch, transformers and peft: a plan's
# simulations go side by side once those done one by one have taken longer (a forked one starts
# at once).
WORKER_START_S = 3.0


def gpu_peak_mib(cell_cfg: dict, lengths: dict, cache_dir: str | None = None) -> dict:
    """{weights, gradients, optimizer, activations, allocator, cuda_context, total} in MiB for a
    cell (`cell_cfg`: identity.cell_config of a resolved config) whose sources and targets are
    cut at `lengths` ({"source": tokens, "target": tokens}). A simulation takes seconds (for
    flan-t5-xl on one core, 0.3 to 1 written out from five blocks, else 1 to 3.5); with
    `cache_dir` its result is kept there for the next plan
    or run of the same cell, under a key that changes with the harness's code and the library
    versions."""
    parts = _one_rank(cell_cfg, lengths, cache_dir)
    return _shared_out(cell_cfg, {name: value for name, value in parts.items()
                                  if name != "work"})


def step_work(cell_cfg: dict, lengths: dict, cache_dir: str | None = None,
              device_type: str = "cuda") -> list:
    """The ops of one optimizer step of one rank (work.per_step's rows: kind, FLOPs, bytes,
    launches, count), from the same simulation as gpu_peak_mib (and its cache). With
    device_type "cpu", the ops a CPU runs for the same step: attention by its math path (the
    score matrix materialised) and torch's optimizers tensor by tensor, as they run there."""
    return _one_rank(cell_cfg, lengths, cache_dir, device_type)["work"]


def step_calls(cell_cfg: dict, lengths: dict, cache_dir: str | None = None) -> list:
    """The op calls of one optimizer step on a CPU, as [signature, count] rows (work.signature's),
    from the same simulation as step_work(device_type="cpu")."""
    return _one_rank(cell_cfg, lengths, cache_dir, "cpu")["calls"]


def _one_rank(cell_cfg: dict, lengths: dict, cache_dir: str | None,
              device_type: str = "cuda") -> dict:
    """The simulated step of one rank, holding the whole model (cached)."""
    spec = _spec(cell_cfg, lengths, device_type)
    if cache_dir is None:
        return dict(_estimate(spec))
    path = _cache_path(spec, cache_dir)
    if path.exists():
        return json.loads(path.read_text())
    parts = dict(_estimate(spec))
    write_whole(path, lambda partial: partial.write_text(json.dumps(parts)))
    return parts


def _shared_out(cell_cfg: dict, parts: dict) -> dict:
    strategy = cell_cfg.get("strategy", {"name": "single"})
    if strategy["name"] == "single":
        return {**parts, "host": 0.0}
    return sharding.per_rank(parts, strategy, cell_cfg["method"]["name"])


def gpu_peaks_mib(requests: list[tuple[dict, dict, str]]) -> list[dict]:
    """gpu_peak_mib of each (cell, lengths, cache_dir), as a plan needs them. The cells not in
    the cache yet are simulated once each: here, one after the other, until that has taken longer
    than a worker takes to start (at once where workers are forked); then the rest side by side,
    a process per CPU core (a simulation uses one core: meta tensors compute nothing)."""
    pending = {}
    for cell_cfg, lengths, cache_dir in requests:
        path = cache_dir and _cache_path(_spec(cell_cfg, lengths), cache_dir)
        if path and not path.exists():
            pending.setdefault(path, (cell_cfg, lengths, cache_dir))
    pending = list(pending.values())
    started, cores = time.monotonic(), usable_cores()
    start_method = _start_method()
    head_start_s = WORKER_START_S if start_method == "spawn" else 0.0
    # A simulation takes seconds: say how many are done and which cell is being simulated.
    with tqdm(total=len(pending), desc="estimating", unit="cell", disable=not pending) as bar:
        for index, request in enumerate(pending):
            left = len(pending) - index
            if left > 1 and cores > 1 and time.monotonic() - started >= head_start_s:
                # Forked, the workers start at once, with torch imported and the ops' outputs
                # seen so far (simulate.Trace.SHARED).
                with multiprocessing.get_context(start_method).Pool(
                        min(left, cores), initializer=_worker_started) as pool:
                    bar.set_postfix_str(f"{min(left, cores)} side by side")
                    for name in pool.imap_unordered(_simulated, pending[index:]):
                        bar.set_postfix_str(f"{min(left, cores)} side by side; done: {name}")
                        bar.update()
                break
            bar.set_postfix_str(identity.run_name(request[0]))
            gpu_peak_mib(*request)
            bar.update()
    return [gpu_peak_mib(*request) for request in requests]  # from the cache, shared out


def _start_method() -> str:
    """fork, unless this process has initialised CUDA, which a forked child cannot use."""
    return "spawn" if torch.cuda.is_initialized() else "fork"


def _worker_started() -> None:
    """A worker ignores Ctrl-C (it stops the plan, whose pool then ends the workers) and runs
    one thread: a forked child that enters an OpenMP parallel region its parent used hangs (as
    torch's DataLoader workers, it keeps to one; a simulation uses one core anyway)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _simulated(request: tuple) -> str:
    """In a pool's worker: gpu_peak_mib of one request, into its cache; the cell's name."""
    gpu_peak_mib(*request)
    return identity.run_name(request[0])


def _spec(cell_cfg: dict, lengths: dict, device_type: str = "cuda") -> str:
    """Only what the estimate reads: the key of both caches (a grid repeats architectures). The
    batch is one rank's share of the global batch; a CPU's step (device_type "cpu") is a spec of
    its own."""
    train_cfg = cell_cfg["train"]
    ranks = world_size(cell_cfg["strategy"]) if "strategy" in cell_cfg else 1
    train = {key: train_cfg[key] for key in ("batch_size", "grad_accum_steps", "max_grad_norm",
                                             "weight_decay", "gradient_checkpointing")}
    train["batch_size"] = max(1, train["batch_size"] // ranks)
    if train_cfg.get("optimizer_impl", "auto") != "auto":  # auto keeps the keys cached before it
        train["optimizer_impl"] = train_cfg["optimizer_impl"]
    found = {"model": cell_cfg["model"], "method": cell_cfg["method"],
             "precision": cell_cfg["precision"], "lengths": lengths, "train": train}
    if device_type != "cuda":  # cuda keeps the keys cached before the device came
        found["device"] = device_type
    return json.dumps(found, sort_keys=True)


def _cache_path(spec: str, cache_dir: str) -> Path:
    return Path(cache_dir) / "estimates" / f"{_cache_key(spec)}.json"


def _cache_key(spec: str) -> str:
    return hashlib.sha256(spec.encode() + _code_digest()).hexdigest()[:20]


@lru_cache(maxsize=1)
def _code_digest() -> bytes:
    """The source of the code the estimate runs and the versions of the libraries whose kernels
    and layers it simulates, as this process loaded them (read once: a file edited while a plan
    runs does not change its keys midway; forked workers inherit them)."""
    digest = hashlib.sha256()
    for module in (allocator, block_marks, depth, meta_outputs, methods, models, simulate,
                   steps, training_step, lomo, families, optimizers, tokenizers, accounting,
                   sharding, work, sys.modules[__name__]):
        digest.update(Path(module.__file__).read_bytes())
    for package in LIBRARIES:
        digest.update(version(package).encode())
    return digest.digest()


@lru_cache(maxsize=64)
def _estimate(spec_json: str) -> tuple:
    # A simulation makes some 100,000 small objects (traced tensors, events, weak references),
    # so the cyclic garbage collector runs often: with what existed before kept out of its view
    # (torch's, transformers' and the plan's objects), each run looks at the simulation's only
    # (about a tenth of its time). Nothing the simulation frees waits for a collection: the
    # events are the same either way (tested).
    gc.freeze()
    try:
        return _simulated_parts(json.loads(spec_json))
    finally:
        gc.unfreeze()


def _simulated_parts(spec: dict) -> tuple:
    cfg = OmegaConf.create({**spec, "train": {"optimizer_impl": "auto", **spec["train"],
                                              "lr": 1e-3, "warmup_steps": 0}})
    on_cpu = spec.get("device") == "cpu"
    on_cuda = simulate.AsOnCuda(models.HALF_DTYPES.get(cfg.precision.name)
                                if models.compute_autocast(cfg.precision) else None,
                                fused_attention=not on_cpu)
    model, traced, more_blocks = _deep_from_shallow(cfg, spec, on_cuda)
    if traced is None:
        model = steps.meta_model(cfg, on_cuda)
        traced = steps.simulated_steps(model, cfg, spec["lengths"], steps.META, on_cuda)

    peak, at = simulate.peak(traced.events)
    alive = simulate.alive_at(traced.events, at)
    parts = {"weights": sum(traced.weights),
             "gradients": traced.bytes_of(alive & traced.gradients),
             "optimizer": traced.bytes_of(alive & traced.states)}
    parts["activations"] = peak - parts["gradients"] - parts["optimizer"]
    # The weights were allocated first, one tensor each, when the model was loaded; cuBLAS takes
    # a workspace from the allocator for each thread that runs matmuls (the loop's, autograd's).
    loading = [(("weight", index), size) for index, size in enumerate(traced.weights)]
    workspaces = [(("cublas", thread), CUBLAS_WORKSPACE_BYTES) for thread in ("loop", "backward")]
    parts["allocator"] = (allocator.replay(loading + workspaces + traced.events)
                          - parts["weights"] - peak)
    parts = {name: value / MIB for name, value in parts.items()}
    parts["cuda_context"] = CUDA_CONTEXT_MIB
    parts["total"] = sum(parts.values())
    parts["allocated"] = parts["total"] - parts["allocator"] - parts["cuda_context"]
    # LOMO's claim is checked against it: at most this one weight's gradient alive at once.
    parts["largest_trained_weight"] = accounting.largest_trained_mib(model)
    # what a strategy shares out (harness/estimate/sharding.py)
    parts.update(steps.sizes(model, more_blocks))
    parts.update(steps.optimizer_step(traced))
    # What one optimizer step computes and moves, op by op (harness/estimate/timing.py).
    parts["work"] = work.per_step(traced.ops, cfg.train.grad_accum_steps)
    if on_cpu:  # each op as called, for the ops' times measured here (harness/measure/op_times.py)
        parts["calls"] = work.calls_per_step(traced.calls, cfg.train.grad_accum_steps)
    return tuple(parts.items())


def _deep_from_shallow(cfg, spec: dict, on_cuda: simulate.AsOnCuda) -> tuple:
    """(the shallow model, the deep model's steps written out from its own, the blocks the deep
    model has beyond it) where the model's middle blocks repeat (harness/estimate/depth.py);
    (None, None, []) where they do not, or for a CPU's step, whose op calls are not repeated."""
    blocks = None if on_cuda.on_cpu else depth.depth(spec["model"]["architecture"])
    if blocks is None:
        return None, None, []
    shallow_cfg = cfg.copy()
    shallow_cfg.model.architecture = depth.shallow(spec["model"]["architecture"])
    model = steps.meta_model(shallow_cfg, on_cuda)
    marks = block_marks.Marks(model, models.blocks(model))
    shallow = steps.simulated_steps(model, shallow_cfg, spec["lengths"], steps.META, on_cuda,
                                    marks=marks)
    marks.remove()
    deep = depth.deepened(shallow, marks, blocks)
    if deep is None:
        return None, None, []
    return model, deep, marks.centres * (blocks - block_marks.SHALLOW)
