"""A training step on PyTorch's meta device, as CUDA would run it, with the bytes of every tensor it
allocates and frees, in order. harness/estimate/estimate.py runs the cell's own step code under it.

Meta tensors have shapes, dtypes and storages but no data, so two steps of flan-t5-xl cost
1 to 3.5 s of one core (LoRA; LoRA+LOMO checkpointed) and no memory (a fraction of that written
out from five blocks: harness/estimate/depth.py). Two things differ from a CUDA run and are made
to match it here:

- autocast: meta tensors take no autocast, so `AsOnCuda` casts the arguments of the functions
  that CUDA autocast runs in half (linear, matmul, ...) or in float32 (softmax, pow, losses, ...),
  per the "Autocast Op Reference" of PyTorch's AMP documentation, above autograd as autocast
  does: the casts a backward needs are kept, as on CUDA.
- attention: on meta, scaled_dot_product_attention runs the math kernel, which keeps the S x S
  attention probabilities; on CUDA, T5's call (an additive float mask for its position bias,
  dropout in training) goes to the memory-efficient kernel, which keeps the output and a
  log-sum-exp per query. `AsOnCuda` calls that kernel's own op, whose meta version allocates what
  CUDA allocates, with the mask padded to a multiple of 16 as PyTorch pads it for that kernel.
  (Without a mask, in half precision, CUDA may pick flash attention, which keeps the same.)

`Trace` records every storage an op creates (not the weights and buffers that existed before)
and when it is freed; the outputs of an op it has seen on the same shapes it makes without the
op's meta kernel (harness/estimate/meta_outputs.py: the same tensors, sooner). Reads of values
(`.item()`, `if tensor:`), which meta tensors do not have, get the answers of an ordinary
training step: numbers are 1 (a step count, a norm), a check of `isfinite` is true (no
overflow), and any other truth value is false, so that a padding mask counts as holding padding
and the attention mask is built, as for the padded batches of the run.
"""

import functools
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from harness.estimate.meta_outputs import MetaOutputs, SimulationMode, mapped, tensors_in

# PyTorch's AMP "Autocast Op Reference", CUDA: the functions (of those transformer models call)
# that autocast runs in the lower precision, and those it runs in float32.
HALF_FUNCTIONS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                  torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.baddbmm,
                  torch.addmm, torch.einsum}
FLOAT32_FUNCTIONS = {F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
                     torch.log_softmax, torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss,
                     F.layer_norm, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
                     torch.Tensor.__rpow__, torch.rsqrt, torch.Tensor.rsqrt, torch.exp,
                     torch.Tensor.exp, torch.log, torch.Tensor.log, torch.sum, torch.Tensor.sum,
                     torch.cumsum, torch.Tensor.cumsum, F.mse_loss}
# PyTorch pads an attention mask to this multiple in its last dimension for the memory-efficient
# kernel (the kernel's alignment; see _scaled_dot_product_efficient_attention's meta backward).
MASK_ALIGNMENT = 16


class Trace(SimulationMode):
    """Every storage allocated inside the block, but the `existing` storages (the weights):
    `events` is a list of (serial, bytes) in order, bytes < 0 for a free. `serial_of(tensor)`
    names a live one. With `reuse_outputs`, ops on meta tensors go through the process's
    MetaOutputs (shared by every simulation in it: the blocks of all cells repeat shapes)."""

    SHARED = MetaOutputs()

    def __init__(self, existing=(), reuse_outputs: bool = True, marks=None):
        super().__init__()
        # marks.Marks: `event_marks` gets each event's block (harness/estimate/marks.py)
        self.marks, self.event_marks = marks, []
        self.call = self.SHARED if reuse_outputs else (
            lambda func, args, kwargs: func(*args, **kwargs))
        self.events = []
        self.live = {}  # storage address: serial
        self.sizes = {}
        # serial: a weak reference to its storage, whose callback notes the free (lighter than
        # weakref.finalize, at some 60,000 storages a simulation)
        self.watched = {}
        self.known = {storage._cdata for storage in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return self._scalar(args[0])
        out = self.call(func, args, kwargs or {})
        outputs = tensors_in(out)
        if self.marks is None:
            for tensor in outputs:
                self._track(tensor)
        elif any(self._new(tensor) for tensor in outputs):
            for tensor, mark in zip(outputs, self.marks.of_outputs(func, args, outputs)):
                self._track(tensor, mark)
        return out

    def _new(self, tensor: torch.Tensor) -> bool:
        address = tensor.untyped_storage()._cdata
        return address not in self.known and address not in self.live

    @staticmethod
    def _scalar(tensor: torch.Tensor):
        # Truth values that are checks of isfinite never get here (AsOnCuda answers them).
        if tensor.dtype == torch.bool:
            return False
        return 1.0 if tensor.is_floating_point() else 1

    def _track(self, tensor: torch.Tensor, mark=None) -> None:
        storage = tensor.untyped_storage()
        address = storage._cdata
        if address in self.known or address in self.live:  # a weight, or a view of a new one
            return
        serial = len(self.sizes)
        self.live[address], self.sizes[serial] = serial, storage.nbytes()
        self.events.append((serial, storage.nbytes()))
        if self.marks is not None:
            self.marks.allocated(address, serial, mark)
            self.event_marks.append(mark)
        self.watched[serial] = weakref.ref(storage, functools.partial(self._free, address, serial))

    def _free(self, address: int, serial: int, _reference=None) -> None:
        del self.watched[serial]
        if self.live.get(address) == serial:
            del self.live[address]
            self.events.append((serial, -self.sizes[serial]))
            if self.marks is not None:
                self.event_marks.append(self.marks.freed(address, serial))

    def serial_of(self, tensor: torch.Tensor) -> int | None:
        return self.live.get(tensor.untyped_storage()._cdata)


class AsOnCuda(TorchFunctionMode):
    """What CUDA does that meta tensors do not: autocast's casts to `half` (None: no autocast)
    and the memory-efficient attention kernel; and `if torch.isfinite(x):` is true."""

    def __init__(self, half: torch.dtype | None, fused_attention: bool = True):
        super().__init__()
        self.half = half
        # False: a CPU's step, whose attention takes the math path (PyTorch's own decomposition
        # on meta tensors: the score matrix materialised).
        self.on_cpu = not fused_attention
        self.finite_checks = {}  # id: weak reference (a WeakSet would compare tensors with ==)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if self.on_cpu:
                return self._cpu_attention(func, *args, **kwargs)
            return self._attention(*args, **kwargs)
        if func is torch.isfinite:
            result = func(*args, **kwargs)
            self.finite_checks[id(result)] = weakref.ref(result)
            return result
        if func is torch.Tensor.__bool__ and args[0].device.type == "meta":
            check = self.finite_checks.get(id(args[0]))
            return check is not None and check() is args[0]
        if self.half is not None and func in HALF_FUNCTIONS:
            args, kwargs = _cast((args, kwargs), torch.float32, self.half)
        elif self.half is not None and func in FLOAT32_FUNCTIONS:
            args, kwargs = _cast((args, kwargs), self.half, torch.float32)
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False):
        if self.half is not None:  # autocast runs attention in half, mask included
            query, key, value, attn_mask = _cast((query, key, value, attn_mask), torch.float32,
                                                 self.half)
        attn_mask = _additive(attn_mask, query)
        if attn_mask is not None:
            attn_mask = _aligned(attn_mask).expand(query.shape[0], query.shape[1],
                                                   query.shape[2], key.shape[2])
        needs_grad = torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad for tensor in (query, key, value,
                                                                         attn_mask))
        out, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale)
        return out


    def _cpu_attention(self, func, query, key, value, attn_mask=None, dropout_p=0.0,
                       is_causal=False, scale=None, enable_gqa=False):
        """As a CPU runs it: its fused kernel, but where the mask needs a gradient (T5's trained
        position bias) or the heads are grouped, the math path (meta tensors take it: the score
        matrix materialised)."""
        if self.half is not None:
            query, key, value, attn_mask = _cast((query, key, value, attn_mask), torch.float32,
                                                 self.half)
        if enable_gqa or (attn_mask is not None and attn_mask.requires_grad):
            return func(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        attn_mask = _additive(attn_mask, query)
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out


def _additive(mask, query: torch.Tensor):
    """As PyTorch does first: a boolean mask becomes an additive float one (others as they are)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype,
                       device=query.device).masked_fill(~mask, float("-inf"))


def _cast(tree, source: torch.dtype, target: torch.dtype):
    return mapped(tree, lambda value: value.to(target) if isinstance(value, torch.Tensor)
                  and value.dtype == source else value)


def _aligned(mask: torch.Tensor) -> torch.Tensor:
    """The mask as the memory-efficient kernel takes it: a copy padded in its last dimension to
    a multiple of MASK_ALIGNMENT, sliced back, unless its rows are aligned already."""
    if all(stride % MASK_ALIGNMENT == 0 for stride in mask.stride()[:-1]):
        return mask
    last = mask.shape[-1]
    padded = F.pad(mask, (0, -last % MASK_ALIGNMENT))
    return padded[..., :last]


def peak(events) -> tuple[int, int]:
    """(the most bytes alive at once, the index of the event that reached it)."""
    alive = top = at = 0
    for index, (_, size) in enumerate(events):
        alive += size
        if alive > top:
            top, at = alive, index
    return top, at


def alive_at(events, index: int) -> set:
    """The serials alive just after event `index`."""
    alive = set()
    for serial, size in events[:index + 1]:
        if size > 0:
            alive.add(serial)
        else:
            alive.discard(serial)
    return alive
