"""What a simulated training step computes and moves, kernel by kernel: the FLOPs, bytes and
kernel launches of every op it dispatches (harness/estimate/estimate.py runs the step under
`Work`; harness/estimate/timing.py turns the ops into seconds on a device).

FLOPs are PyTorch's own count: the formulas of `torch.utils.flop_counter` (matmuls, attention
kernels, convolutions, forward and backward), which `FlopCounterMode` applies, plus one for
bitsandbytes' LLM.int8 matmul, which PyTorch does not know. Every other op (elementwise, norms,
softmax, casts, the optimizer's updates) counts no FLOPs: its time is its memory traffic. Since the
step itself runs, what it recomputes under gradient checkpointing, LOMO's extra pass for the
gradient norm, LoRA's frozen weights that get no weight gradient, and a sharded strategy's one
rank's share of the batch are counted as they happen, not assumed.

Bytes are those of the op's tensor arguments and results (a view's own elements, at most its
storage): what the kernel reads and writes if nothing stays in cache. A view (transpose, reshape,
expand, detach) launches no kernel and moves nothing; a foreach op launches as many kernels as
PyTorch's multi_tensor_apply does (it fills a launch with up to 110, 64, 48, 36 or 30 tensors for
1 to 5 tensor lists, and at most 320 blocks of 65,536 elements).
"""

import json
import math
from collections import Counter

import torch
from torch.utils import flop_counter

from harness.estimate.meta_outputs import SimulationMode, mapped, tensors_in

# multi_tensor_apply's limits (ATen's MultiTensorApply.cuh): tensors per launch by the number of
# tensor lists, blocks per launch, elements per block.
FOREACH_TENSORS = (110, 64, 48, 36, 30)
FOREACH_BLOCKS, FOREACH_CHUNK = 320, 65536
# Ops that allocate or describe a tensor without a kernel over its data.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "lift_fresh", "detach", "_unsafe_view", "alias", "set_",
             "_record_function_enter_new", "_record_function_exit"}
# Ops that draw random numbers (dropout's masks): kind "random", priced by what drawing costs where
# a calibration measured it (harness/measure/calibration.py), by their bytes where not.
RANDOM = {"native_dropout", "bernoulli", "bernoulli_", "rand", "rand_like", "randn",
          "randn_like", "normal", "normal_", "uniform_"}
# Profiler markers, and a value read back: no kernel to replay (their host time is another op's).
UNTIMED = {torch.ops.profiler._record_function_enter_new.default,
           torch.ops.profiler._record_function_exit._RecordFunction,
           torch.ops.aten._local_scalar_dense.default}
# What a matmul's inputs are stored in, by the peak it runs at (conf/peaks/).
KINDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int8: "int8"}


def _int8_scaled_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """bitsandbytes' LLM.int8 matmul: A (..., K) int8 times B (N, K) int8 transposed."""
    return 2 * math.prod(a_shape[:-1]) * b_shape[0] * a_shape[-1]


def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    """A CPU's fused attention: as many FLOPs as the other fused kernels'."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                 out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape,
                                                 value_shape)


def flop_formulas() -> dict:
    """FlopCounterMode's custom_mapping: the formulas PyTorch lacks (a CPU's fused attention;
    bitsandbytes', once it is imported: only quantized cells load it)."""
    formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    _cpu_attention_backward_flop}
    if hasattr(torch.ops, "bitsandbytes") and hasattr(torch.ops.bitsandbytes, "int8_scaled_mm"):
        formulas[torch.ops.bitsandbytes.int8_scaled_mm] = _int8_scaled_mm_flop
    return formulas


class Work(SimulationMode):
    """Every op dispatched while `recording`: `ops` counts (kind, flops, bytes, launches, phase)
    tuples, kind being the matmul inputs' dtype ("random" for an op that draws random numbers,
    with `random_apart`; "" for any other op without FLOPs) and phase "update"
    inside an optimizer's step (set by the caller), else "pass" (forward and backward). With
    `signatures`, `calls` counts (signature, phase): each op as it was called, to be replayed on
    real tensors (harness/measure/op_times.py)."""

    def __init__(self, random_apart: bool = False, signatures: bool = False, marks=None):
        super().__init__()
        self.marks = marks  # marks.Marks: each op counted under its block too
        # A CPU's step (estimate.step_work(device_type="cpu")) keeps the ops that draw random
        # numbers apart, for the calibration's dropout curve, and their signatures; a GPU's
        # rows stay as they were.
        self.random_apart, self.signatures = random_apart, signatures
        self.calls = Counter()
        # op: (formula, whether it takes shapes). torch registers most formulas wrapped to take
        # shapes (flop_counter.shape_wrapper, whose tree_map costs more than the formula): they
        # are unwrapped here and given shapes made by meta_outputs.mapped; those it registers
        # raw take the tensors.
        self.formulas = {op: (getattr(formula, "__wrapped__", formula),
                              hasattr(formula, "__wrapped__"))
                         for op, formula in flop_counter.flop_registry.items()}
        self.formulas.update({op: (formula, True) for op, formula in flop_formulas().items()})
        self.ops = Counter()
        self.recording, self.phase = False, "pass"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.recording:
            key = self._cost(func, args, kwargs, out)
            self.ops[key] += 1
            if self.marks is not None:
                self.marks.count(func, args, kwargs, out, key)
            if self.signatures and func not in UNTIMED:
                self.calls[(signature(func, args, kwargs), self.phase)] += 1
        return out

    def _cost(self, func, args, kwargs, out) -> tuple:
        packet = func._overloadpacket
        name = packet.__name__
        if func.is_view or name in NO_KERNEL:
            return ("", 0, 0, 0, self.phase)
        inputs, outputs = tensors_in((args, kwargs)), tensors_in(out)
        formula, takes_shapes = self.formulas.get(packet, (None, False))
        if formula is None:
            flops = 0
        elif takes_shapes:
            flops = formula(*mapped(args, _shape), **mapped(kwargs, _shape),
                            out_shape=mapped(out, _shape))
        else:
            flops = formula(*args, **kwargs, out_val=out)
        kind = KINDS.get(inputs[0].dtype, "fp32") if flops and inputs else \
            "random" if self.random_apart and name in RANDOM else ""
        moved = sum(tensor_bytes(tensor) for tensor in inputs + outputs)
        launches = _foreach_launches(args) if name.startswith("_foreach_") else 1
        return (kind, int(flops), moved, launches, self.phase)


def signature(func, args: tuple, kwargs: dict) -> str:
    """The op ("aten::mm.default") and its arguments as JSON: a tensor as ["tensor", shape,
    stride, offset, dtype, its storage's elements], a dtype, memory format or layout as
    ["dtype", its name in torch], a device as
    ["device"], any other value as itself; what cannot be said so as ["unknown", its type] (the
    op is then not replayed)."""
    name = f"{func.namespace}::{func._overloadpacket.__name__}.{func._overloadname}"
    return json.dumps([name, _described(list(args)), _described(kwargs)])


def _described(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), list(value.stride()), value.storage_offset(),
                str(value.dtype).removeprefix("torch."),
                value.untyped_storage().nbytes() // value.element_size()]
    if isinstance(value, (list, tuple)):
        return [_described(item) for item in value]
    if isinstance(value, dict):
        return {name: _described(item) for name, item in value.items()}
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
        # torch's own name for it: torch.float32, torch.contiguous_format, torch.strided
        return ["dtype", str(value).removeprefix("torch.")]
    if isinstance(value, torch.device):
        return ["device"]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return ["unknown", type(value).__name__]


def _shape(value):
    return value.shape if isinstance(value, torch.Tensor) else value


def tensor_bytes(tensor: torch.Tensor) -> int:
    """What an op reads or writes of a tensor: a view's own elements, at most its storage."""
    return min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())


def tensor_lists(args) -> list:
    """An op's arguments that are lists of tensors (a foreach op's, torch.stack's)."""
    return [value for value in args if isinstance(value, (list, tuple)) and value
            and isinstance(value[0], torch.Tensor)]


def _foreach_launches(args) -> int:
    lists = tensor_lists(args)
    if not lists:
        return 1
    return foreach_launches(len(lists), [tensor.numel() for tensor in lists[0]])


def foreach_launches(lists: int, elements: list) -> int:
    """The kernels a foreach op over `lists` tensor lists launches, the first list's tensors
    holding `elements` each."""
    chunks = sum(math.ceil(count / FOREACH_CHUNK) for count in elements)
    per_launch = FOREACH_TENSORS[min(lists, len(FOREACH_TENSORS)) - 1]
    return max(1, math.ceil(len(elements) / per_launch), math.ceil(chunks / FOREACH_BLOCKS))


def per_step(ops: Counter, grad_accum_steps: int) -> list:
    """The ops of one optimizer step, as [kind, flops, bytes, launches, count] rows: the forward
    and backward `grad_accum_steps` times, the update once."""
    rows = Counter()
    for (kind, flops, moved, launches, phase), count in ops.items():
        if launches:
            rows[(kind, flops, moved, launches)] += count * (
                1 if phase == "update" else grad_accum_steps)
    return [[*key, count] for key, count in sorted(rows.items())]


def calls_per_step(calls: Counter, grad_accum_steps: int) -> list:
    """The op calls of one optimizer step, as [signature, count] rows (see per_step)."""
    found = Counter()
    for (called, phase), count in calls.items():
        found[called] += count * (1 if phase == "update" else grad_accum_steps)
    return [[called, count] for called, count in sorted(found.items())]


def flops(rows: list) -> int:
    return sum(row_flops * count for _, row_flops, _, _, count in rows)


def flops_by_kind(rows: list) -> dict:
    found = Counter()
    for kind, row_flops, _, _, count in rows:
        if row_flops:
            found[kind] += row_flops * count
    return dict(found)
