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
memory-efficient attention kernel) and records every tensor it allocates and frees. Then:

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

import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import Counter
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from harness.config import identity
from harness.core.files import write_whole
from harness.core.options import QUANTIZED
from harness.core.units import MIB
from harness.estimate import allocator, sharding, simulate, work
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

# A CUDA context with PyTorch's kernels loaded lazily (CUDA >= 11.7), cuBLAS initialised: about
# what nvidia-smi shows for a process that has run a matmul. `make gpu-check` measures it on a
# GPU as NVML's peak less the allocator's reserved peak.
CUDA_CONTEXT_MIB = 500
# cuBLAS's workspace per thread, from the caching allocator, kept for the process's life: PyTorch's
# documented default CUBLAS_WORKSPACE_CONFIG=:4096:2:16:8 (Hopper GPUs get more).
CUBLAS_WORKSPACE_BYTES = 2 * 4096 * 1024 + 8 * 16 * 1024
PARTS = ("weights", "gradients", "optimizer", "activations", "allocator", "cuda_context")
META = torch.device("meta")
STEPS = 2  # the second step runs with the optimizer state the first one created
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")
# A worker process takes about this long to import torch, transformers and peft: a plan's
# simulations go side by side once those done one by one have taken longer.
WORKER_START_S = 3.0


def gpu_peak_mib(cell_cfg: dict, lengths: dict, cache_dir: str | None = None) -> dict:
    """{weights, gradients, optimizer, activations, allocator, cuda_context, total} in MiB for a
    cell (`cell_cfg`: identity.cell_config of a resolved config) whose sources and targets are
    cut at `lengths` ({"source": tokens, "target": tokens}). A simulation takes seconds (about
    10 for flan-t5-xl on one core); with `cache_dir` its result is kept there for the next plan
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
    than a worker takes to start; then the rest side by side, a process per CPU core (a
    simulation uses one core: meta tensors compute nothing)."""
    pending = {}
    for cell_cfg, lengths, cache_dir in requests:
        path = cache_dir and _cache_path(_spec(cell_cfg, lengths), cache_dir)
        if path and not path.exists():
            pending.setdefault(path, (cell_cfg, lengths, cache_dir))
    pending = list(pending.values())
    started, cores = time.monotonic(), _usable_cores()
    # A simulation takes seconds: say how many are done and which cell is being simulated.
    with tqdm(total=len(pending), desc="estimating", unit="cell", disable=not pending) as bar:
        for index, request in enumerate(pending):
            left = len(pending) - index
            if left > 1 and cores > 1 and time.monotonic() - started > WORKER_START_S:
                # spawn: a plan may run in a process that has initialised CUDA (a sweep's
                # callback). The workers ignore Ctrl-C: it stops the plan, whose pool then ends
                # them.
                with multiprocessing.get_context("spawn").Pool(
                        min(left, cores), initializer=signal.signal,
                        initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
                    bar.set_postfix_str(f"{min(left, cores)} side by side")
                    for name in pool.imap_unordered(_simulated, pending[index:]):
                        bar.set_postfix_str(f"{min(left, cores)} side by side; done: {name}")
                        bar.update()
                break
            bar.set_postfix_str(identity.run_name(request[0]))
            gpu_peak_mib(*request)
            bar.update()
    return [gpu_peak_mib(*request) for request in requests]  # from the cache, shared out


def _simulated(request: tuple) -> str:
    """In a pool's worker: gpu_peak_mib of one request, into its cache; the cell's name."""
    gpu_peak_mib(*request)
    return identity.run_name(request[0])


def _usable_cores() -> int:
    """The cores this process may run on (a container's share, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):  # not on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _spec(cell_cfg: dict, lengths: dict, device_type: str = "cuda") -> str:
    """Only what the estimate reads: the key of both caches (a grid repeats architectures). The
    batch is one rank's share of the global batch; a CPU's step (device_type "cpu") is a spec of
    its own."""
    train_cfg = cell_cfg["train"]
    ranks = sharding.world_size(cell_cfg["strategy"]) if "strategy" in cell_cfg else 1
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
    """The spec, the source of the code the estimate runs, and the versions of the libraries
    whose kernels and layers it simulates."""
    code = [Path(module.__file__).read_bytes() for module in (
        allocator, methods, models, simulate, training_step, lomo, families, optimizers,
        tokenizers, accounting, sharding, work,
        sys.modules[__name__])]
    versions = [version(package) for package in LIBRARIES]
    digest = hashlib.sha256(spec.encode())
    for part in [*code, *(text.encode() for text in versions)]:
        digest.update(part)
    return digest.hexdigest()[:20]


@lru_cache(maxsize=64)
def _estimate(spec_json: str) -> tuple:
    spec = json.loads(spec_json)
    cfg = OmegaConf.create({**spec, "train": {"optimizer_impl": "auto", **spec["train"],
                                              "lr": 1e-3, "warmup_steps": 0}})
    on_cpu = spec.get("device") == "cpu"
    on_cuda = simulate.AsOnCuda(models.HALF_DTYPES.get(cfg.precision.name)
                                if models.compute_autocast(cfg.precision) else None,
                                fused_attention=not on_cpu)
    model = _meta_model(cfg, on_cuda)
    steps = simulated_steps(model, cfg, spec["lengths"], META, on_cuda)

    peak, at = simulate.peak(steps.events)
    alive = simulate.alive_at(steps.events, at)
    parts = {"weights": sum(steps.weights), "gradients": steps.bytes_of(alive & steps.gradients),
             "optimizer": steps.bytes_of(alive & steps.states)}
    parts["activations"] = peak - parts["gradients"] - parts["optimizer"]
    # The weights were allocated first, one tensor each, when the model was loaded; cuBLAS takes
    # a workspace from the allocator for each thread that runs matmuls (the loop's, autograd's).
    loading = [(("weight", index), size) for index, size in enumerate(steps.weights)]
    workspaces = [(("cublas", thread), CUBLAS_WORKSPACE_BYTES) for thread in ("loop", "backward")]
    parts["allocator"] = (allocator.replay(loading + workspaces + steps.events)
                          - parts["weights"] - peak)
    parts = {name: value / MIB for name, value in parts.items()}
    parts["cuda_context"] = CUDA_CONTEXT_MIB
    parts["total"] = sum(parts.values())
    parts["allocated"] = parts["total"] - parts["allocator"] - parts["cuda_context"]
    # LOMO's claim is checked against it: at most this one weight's gradient alive at once.
    parts["largest_trained_weight"] = accounting.largest_trained_mib(model)
    parts.update(_sizes(model))  # what a strategy shares out (harness/estimate/sharding.py)
    parts.update(_optimizer_step(steps))
    # What one optimizer step computes and moves, op by op (harness/estimate/timing.py).
    parts["work"] = work.per_step(steps.ops, cfg.train.grad_accum_steps)
    return tuple(parts.items())


def _optimizer_step(steps: "Steps") -> dict:
    """MiB of: the most the optimizer's step allocates beyond what was alive when it began (its
    temporaries: foreach AdamW's whole-model intermediates), and the activations part at the
    peak outside the step. A sharded optimizer steps its shard: harness/estimate/sharding.py
    shares these temporaries out."""
    inside = {index for start, end in steps.optimizer_steps for index in range(start, end)}
    alive = top_outside = temporaries = 0
    at_outside, at_start = 0, 0
    for index, (_, size) in enumerate(steps.events):
        if any(start == index for start, _ in steps.optimizer_steps):
            at_start = alive
        alive += size
        if index in inside:
            temporaries = max(temporaries, alive - at_start)
        elif alive > top_outside:
            top_outside, at_outside = alive, index
    held = simulate.alive_at(steps.events, at_outside)
    outside = (top_outside - steps.bytes_of(held & steps.gradients)
               - steps.bytes_of(held & steps.states))
    return {"step_temporaries": temporaries / MIB, "activations_outside_step": outside / MIB}


def _sizes(model) -> dict:
    """MiB of: the trained weights as stored and in float32 (DeepSpeed's partitions); the largest
    transformer block (what FSDP2 gathers at once) and its trained part; the largest layer's own
    weights (what ZeRO-3 gathers at once)."""
    def stored(parameters) -> float:
        return sum(p.numel() * p.element_size() for p in parameters) / MIB

    trained = [p for p in model.parameters() if p.requires_grad]
    largest = max(models.blocks(model), key=lambda block: stored(block.parameters()),
                  default=model)
    states = {tensor.untyped_storage()._cdata: tensor.untyped_storage().nbytes()
              for weight in model.parameters()
              for tensor in accounting.quant_state_tensors(getattr(weight, "quant_state", None))}
    return {"quantization_state": sum(states.values()) / MIB,  # on every rank: not sharded
            "trained_weights": stored(trained),
            "trained_weights_fp32": sum(p.numel() for p in trained) * 4 / MIB,
            "largest_block": stored(largest.parameters()),
            "largest_block_trained": stored(p for p in largest.parameters() if p.requires_grad),
            "largest_layer": max((stored(module.parameters(recurse=False))
                                  for module in model.modules()), default=0.0)}



class Steps(NamedTuple):
    """What simulated_steps saw: the weights' sizes, every later allocation and free in order
    (simulate.Trace's events), which of them were gradients and optimizer state, and the spans
    of events inside the optimizer's steps ([start, end) indices), and the last step's ops
    (work.Work's)."""
    weights: list
    events: list
    sizes: dict
    gradients: set
    states: set
    optimizer_steps: list = []
    ops: Counter = Counter()

    def bytes_of(self, serials) -> int:
        return sum(self.sizes[serial] for serial in serials)


def simulated_steps(model, cfg, lengths: dict, device: torch.device,
                    on_cuda: simulate.AsOnCuda | None = None) -> Steps:
    """STEPS training steps of the cell's own code on a batch padded to `lengths`, every tensor
    traced. On the meta device for the estimate; on the CPU, the same steps for real (the tests
    check that both see the same allocations)."""
    weights = _weight_storages(model)
    on_cpu = on_cuda is not None and on_cuda.on_cpu  # a CPU's step: estimate.step_work
    trace, counted = simulate.Trace(existing=weights.values()), work.Work(random_apart=on_cpu)
    gradients, states = set(), set()
    with trace, on_cuda or contextlib.nullcontext(), counted:
        batch = families.of(cfg.model).training_batch(cfg.train.batch_size, lengths, device,
                                                      tokenizers.PAD_ID, tokenizers.EOS_ID + 1)
        # LOMO frees each fused gradient inside backward: note them as they appear (registered
        # first, so that these hooks run before the updates' own).
        hooks = [weight.register_post_accumulate_grad_hook(
            lambda weight: gradients.add(trace.serial_of(weight.grad)))
            for weight in methods.fused_parameters(model, cfg.method.name)]
        # auto: what torch.optim picks, foreach on CUDA and tensor by tensor on a CPU.
        simulated = {"auto": "for_loop" if on_cpu else "foreach",
                     "fused": "for_loop"}.get(cfg.train.optimizer_impl,
                                              cfg.train.optimizer_impl)
        updates = training_step.Updates(model, cfg, STEPS, device, implementation=simulated,
                                        loss_scaling=False, paging=False)
        spans = []

        def stepping(*_) -> None:  # where the optimizer's temporaries live, and its work
            spans.append([len(trace.events), None])
            counted.phase = "update"

        def stepped(*_) -> None:
            spans[-1][1] = len(trace.events)
            counted.phase = "pass"

        if updates.optimizer is not None:
            updates.optimizer.register_step_pre_hook(stepping)
            updates.optimizer.register_step_post_hook(stepped)
        model.train()
        for step in range(STEPS):
            counted.recording = step == STEPS - 1  # the work of a step with optimizer state
            updates.backward(training_step.forward(model, batch, "fp32", device), update=True)
            gradients.update(trace.serial_of(p.grad) for p in model.parameters()
                             if p.grad is not None)
            if updates.optimizer is not None:
                states.update(trace.serial_of(value)
                              for state in updates.optimizer.state.values()
                              for value in state.values() if isinstance(value, torch.Tensor))
            updates.next_step()
        updates.close()
        for hook in hooks:
            hook.remove()
    return Steps([storage.nbytes() for storage in weights.values()], trace.events, trace.sizes,
                 gradients - {None}, states - {None}, [tuple(span) for span in spans],
                 counted.ops)


def _meta_model(cfg, on_cuda: simulate.AsOnCuda):
    """The cell's model on the meta device, stored and prepared as harness/cell/entry.py does. A
    checkpointed block is recomputed inside backward, where the forward's function modes are not
    active: it gets `on_cuda` of its own, as on CUDA checkpointing re-enters autocast."""
    with torch.device(META):
        model = models.random_model(cfg.model, models.stored_dtype(
            cfg.precision, methods.base_frozen(cfg.method.name)))
    if cfg.precision.name in QUANTIZED:
        _quantize(model, cfg.precision)
    return methods.prepare(model, cfg, context_fn=lambda: (contextlib.nullcontext(), on_cuda))


def _quantize(model, precision_cfg) -> None:
    """bitsandbytes layers where from_pretrained puts them (transformers' own bitsandbytes
    quantizer chooses): LLM.int8, an int8 weight and a float32 scale per row; 4-bit, the weight
    quantized by bitsandbytes' own quantize_4bit (whose meta version gives the packed weight and
    its scales)."""
    import bitsandbytes as bnb  # imported here: only quantized cells need it
    from transformers.quantizers import AutoHfQuantizer

    # bitsandbytes caches its double quantization's code map on the device of the first tensor
    # it quantizes: made here on the CPU, a meta copy is not what later real loads get.
    bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    # uint8 storage: a strategy's float storage packs the same bytes (harness/model/models.py).
    settings = models.quantization(precision_cfg)
    AutoHfQuantizer.from_config(settings).preprocess_model(model, device_map={"": META})
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            layer.weight.CB = layer.weight.data
            layer.weight.SCB = torch.empty(layer.out_features, device=META)
            # Outlier columns depend on the data, which meta tensors do not have: none here.
            layer.state.threshold = 0.0
        elif isinstance(layer, bnb.nn.Linear4bit):
            full = torch.empty(layer.out_features, layer.in_features, device=META)
            packed, state = bnb.functional.quantize_4bit(
                full, blocksize=layer.weight.blocksize,
                compress_statistics=settings.bnb_4bit_use_double_quant,
                quant_type=settings.bnb_4bit_quant_type)
            layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state,
                                             blocksize=layer.weight.blocksize,
                                             compress_statistics=state.nested,
                                             quant_type=state.quant_type, bnb_quantized=True,
                                             module=layer)


def _weight_storages(model) -> dict:
    """Every storage the model holds before training, once each: weights, buffers, the int8
    layers' row scales and the 4-bit layers' block scales."""
    tensors = [*accounting.weight_tensors(model), *model.buffers()]
    return {tensor.untyped_storage()._cdata: tensor.untyped_storage() for tensor in tensors}
