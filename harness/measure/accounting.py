"""Tensor accounting inside the cell: the bytes of parameters, gradients and optimizer state
from the live tensors (the memory breakdown).
"""

from harness.core.units import MIB


def tensors_mib(tensors) -> float:
    """MiB held by these tensors, each storage counted once (tied weights share one); a sharded
    tensor (FSDP2's DTensor) by the shard this rank holds."""
    storages = {}
    for tensor in tensors:
        if hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / MIB


def quant_state_tensors(state) -> list:
    """The tensors a bitsandbytes 4-bit weight keeps beside its packed values: the block scales
    and the code, and with double quantization the scales' own scales, code and offset."""
    if state is None:
        return []
    found = [state.absmax, state.code, getattr(state, "offset", None)]
    if state.nested:
        found += [state.state2.absmax, state.state2.code]
    return [tensor for tensor in found if hasattr(tensor, "untyped_storage")]


def weight_tensors(model) -> list:
    """The parameters, with the scales quantized weights keep beside them (int8: a float32
    scale per row; 4-bit: quant_state_tensors)."""
    parameters = list(model.parameters())
    scales = [tensor for weight in parameters
              for tensor in [getattr(weight, "SCB", None),
                             *quant_state_tensors(getattr(weight, "quant_state", None))]
              if hasattr(tensor, "untyped_storage")]
    return parameters + scales


def breakdown(model, optimizers) -> dict:
    """The live weights (with their quantization scales), gradients and optimizer state now, in
    MiB (named as in docs/design.md)."""
    parameters = list(model.parameters())
    state = [value for optimizer in optimizers for per_parameter in optimizer.state.values()
             for value in per_parameter.values() if hasattr(value, "untyped_storage")]
    return {"mem_params_mib": tensors_mib(weight_tensors(model)),
            "mem_grads_mib": tensors_mib(p.grad for p in parameters if p.grad is not None),
            "mem_optimizer_mib": tensors_mib(state)}


def largest_trained_mib(model) -> float:
    """The largest weight that trains, in MiB: LOMO's claim is that no more gradient than this
    one weight's is alive at once."""
    return max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
               default=0) / MIB


def lomo_claim(parts: dict) -> str:
    """LOMO's own claim on its simulated step: at the peak, no more gradient than its largest
    weight's (the others are freed as soon as each is applied) and no optimizer state."""
    largest = parts["largest_trained_weight"]
    holds = parts["gradients"] <= largest + 1e-6 and parts["optimizer"] == 0
    return (f"{'holds' if holds else 'does not hold'}: gradients {parts['gradients']:.4g} MiB "
            f"(largest weight {largest:.4g}), optimizer state {parts['optimizer']:.4g}")
