"""A cell's peak GPU memory, estimated before it runs from its architecture, method and precision.

Nothing is allocated: the model is built on PyTorch's meta device, the method is applied to it as
the cell would, and one forward pass of the longest batch the data allows (train.batch_size x
data.source_max_length, target length data.target_max_length) runs under autograd's
saved-tensor hooks, which see every activation kept for backward. Then

  peak = weights + optimizer state + max(activations, gradients) + CUDA context

because activations are freed during backward while the gradients are being written. Weights
are counted in the dtype the cell stores them in (int8: LLM.int8 linear layers with their row
scales, T5's wo and the rest in float32). Half-precision autocast is approximated by running the
forward pass in that dtype. The CUDA context is a typical figure for PyTorch on a recent GPU;
temporaries inside a kernel and the allocator's fragmentation are not counted.
"""

import json
from functools import lru_cache

import torch
from omegaconf import OmegaConf

from harness import methods, models
from harness.sampler import MIB

CUDA_CONTEXT_MIB = 500  # what nvidia-smi shows for a process that has initialised CUDA in torch
PARTS = ("weights", "gradients", "optimizer", "activations", "cuda_context")


def gpu_peak_mib(cell: dict) -> dict:
    """{weights, gradients, optimizer, activations, cuda_context, total} in MiB for the cell
    (config.cell_config of a resolved cell)."""
    # Only what the estimate reads, as a string: the cache key (a grid repeats architectures).
    spec = {"model": cell["model"], "method": cell["method"],
            "precision": cell["precision"]["name"], "batch_size": cell["train"]["batch_size"],
            "lengths": [cell["data"]["source_max_length"], cell["data"]["target_max_length"]]}
    return dict(_estimate(json.dumps(spec, sort_keys=True)))


@lru_cache(maxsize=64)
def _estimate(spec_json: str) -> tuple:
    spec = json.loads(spec_json)
    method, precision = OmegaConf.create(spec["method"]), spec["precision"]
    with torch.device("meta"):
        model = models.random_model(OmegaConf.create(spec["model"]))
    if precision in models.HALF_DTYPES and methods.base_frozen(method.name):
        model = model.to(models.HALF_DTYPES[precision])
    model = methods.apply(model, method, "fp32")  # int8 storage is counted by _stored_bytes

    fused = {id(weight) for weight in methods.fused_parameters(model, method.name)}
    stepped = [p for p in model.parameters() if p.requires_grad and id(p) not in fused]
    weights = sum(_stored_bytes(name, p, precision) for name, p in model.named_parameters())
    gradients = sum(p.numel() * 4 for p in stepped)
    if fused:  # one fused gradient lives at a time: the largest
        gradients += max(p.numel() for p in model.parameters() if id(p) in fused) * 4
    # AdamW: two float32 moments per weight and a step count per tensor; plain SGD: nothing.
    optimizer = sum(p.numel() * 8 + 4 for p in stepped) if method.optimizer == "adamw" else 0
    if precision in models.HALF_DTYPES:  # autocast computes in half, adapters included
        model = model.to(models.HALF_DTYPES[precision])
    activations = _saved_for_backward(model, spec["batch_size"], *spec["lengths"])
    parts = {"weights": weights / MIB, "gradients": gradients / MIB,
             "optimizer": optimizer / MIB, "activations": activations / MIB,
             "cuda_context": CUDA_CONTEXT_MIB}
    parts["total"] = (parts["weights"] + parts["optimizer"] + CUDA_CONTEXT_MIB
                      + max(parts["activations"], parts["gradients"]))
    return tuple(parts.items())


def _stored_bytes(name: str, parameter, precision: str) -> int:
    """Bytes of one weight as the cell stores it: LLM.int8 quantizes the linear layers of the
    blocks except T5's wo (one byte per weight plus a float32 scale per row)."""
    if precision == "int8" and not parameter.requires_grad and ".block." in name \
            and name.endswith(".weight") and parameter.dim() == 2 \
            and not name.endswith("wo.weight") and "lora_" not in name:
        return parameter.numel() + parameter.shape[0] * 4
    if parameter.requires_grad:
        return parameter.numel() * 4
    return parameter.numel() * parameter.element_size()


def _saved_for_backward(model, batch_size: int, source_length: int, target_length: int) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward pass of a full
    batch (each storage once, weights left out)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        # No attention mask: a full batch is all tokens, and masks cannot be read on meta.
        model(input_ids=torch.zeros(batch_size, source_length, dtype=torch.long, device="meta"),
              labels=torch.zeros(batch_size, target_length, dtype=torch.long, device="meta"))
    return sum(saved.values())
