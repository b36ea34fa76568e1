"""Which block of the model each event and op of a simulated step belongs to: what
harness/estimate/depth.py needs to write a deep model's step out from a shallow one's.

A mark is (stack, block index), or None outside every block (embeddings, the loss, the final
norm). An event or op belongs to the block running forward (module hooks: a checkpointed block's
recomputation too), else to the block whose backward is running (autograd's current node, by the
sequence numbers its forward gave the nodes), else to the block of the tensors it reads or frees
(an optimizer's per-weight work and zero_grad's frees; a foreach op's outputs position by
position; a factory, such as an optimizer's step count, the block of the op before it). An op
over a list of every block's tensors (foreach updates, clipping's stacked norms) is kept as
`Resized`, to be priced again over the deep list, and a stack of such a list as an `Aggregate`,
its size included.
"""

import bisect
from collections import Counter
from typing import NamedTuple

import torch

from harness.estimate import work
from harness.estimate.meta_outputs import tensors_in
from harness.measure import accounting

SHALLOW = 5  # blocks a stack simulated: first, three middle ones (one with middle neighbours), last
MIDDLE = (1, 2, 3)
AGGREGATES = {torch.ops.aten.stack.default, torch.ops.aten.cat.default}


class Aggregate:
    """An op's output made of a list of every block's tensors (torch.stack of the per-weight
    norms): its bytes, position by position, as (mark, bytes)."""

    def __init__(self, positions: list):
        self.positions = positions


class Resized(NamedTuple):
    """An op whose bytes (and a foreach op's launches) grow with the depth: `fixed` bytes, and
    (mark, bytes, elements of the first list's tensor) per list position."""
    kind: str
    flops: int
    phase: str
    fixed: int
    positions: tuple
    lists: int | None  # a foreach op's tensor lists (its launches follow them), else None
    launches: int


class Marks:
    """Marks each event and op of a simulated step with its block (see the module's docstring)."""

    def __init__(self, model, blocks: list):
        self.layers = {}  # stack: its blocks
        self.of_storage = {}  # storage address: mark (weights, and each traced storage alive)
        self.of_serial = {}  # a traced storage's serial: the mark of its allocation
        self.active = []  # the blocks running forward (one, or none)
        self.last = None  # the block of the last op outside forward and backward
        self.opened = []  # the sequence number at which each began
        self.starts, self.ends, self.range_marks = [], [], []
        self.ops = Counter()  # (mark, work.Work's op key): count
        self.resized = []  # Resized, once per call
        self.unrepeatable = None  # why the step cannot be repeated, if it cannot
        self.hooks = []
        self.centres = []  # each stack's centre block, whose copies the deep model adds
        members = {id(block) for block in blocks}
        for module in model.modules():
            if not isinstance(module, torch.nn.ModuleList):
                continue
            stack = [block for block in module if id(block) in members]
            if not stack:
                continue
            number = len(self.layers)
            self.layers[number] = len(stack)
            for index, block in enumerate(stack):
                self._watch(block, (number, index))
            if len(stack) == SHALLOW:
                self.centres.append(stack[MIDDLE[1]])
        if sum(self.layers.values()) != len(blocks):
            self.unrepeatable = "a block outside a ModuleList"

    def _watch(self, block, mark: tuple) -> None:
        for tensor in [*accounting.weight_tensors(block), *block.buffers()]:
            address = tensor.untyped_storage()._cdata
            # a storage blocks share (bitsandbytes' code map) belongs to none of them
            self.of_storage[address] = mark if self.of_storage.get(address, mark) == mark else None

        def entered(_module, _args):
            self.active.append(mark)
            self.last = None
            self.opened.append(torch._C._autograd._get_sequence_nr())

        def left(_module, _args, _out):
            start, end = self.opened.pop(), torch._C._autograd._get_sequence_nr()
            self.active.pop()
            if end > start:
                if self.starts and start < self.ends[-1]:
                    self.unrepeatable = "blocks whose autograd nodes interleave"
                self.starts.append(start)
                self.ends.append(end)
                self.range_marks.append(mark)

        self.hooks += [block.register_forward_pre_hook(entered),
                       block.register_forward_hook(left, always_call=True)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

    def middle(self, mark) -> bool:
        return type(mark) is tuple and mark[1] in MIDDLE and self.layers[mark[0]] == SHALLOW

    def now(self):
        """The block running forward or backward now, if any."""
        if self.active:
            return self.active[-1]
        node = torch._C._current_autograd_node()
        if node is None:
            return None
        sequence = node._sequence_nr()
        index = bisect.bisect_right(self.starts, sequence) - 1
        return self.range_marks[index] if index >= 0 and sequence < self.ends[index] else None

    def of_tensor(self, tensor):
        mark = self.of_storage.get(tensor.untyped_storage()._cdata)
        return None if isinstance(mark, Aggregate) else mark

    def of_outputs(self, func, args, outputs: list) -> list:
        """The marks of an op's new outputs."""
        now = self.now()
        if now is not None:
            return [now] * len(outputs)
        lists = work.tensor_lists(args)
        if func._overloadpacket.__name__.startswith("_foreach_") and lists:
            return [self.of_tensor(tensor) for tensor in lists[0]]
        inputs = [tensor for tensor in tensors_in(args) if tensor.is_meta]
        if not inputs:  # a factory (an optimizer's step count): the block of the last op's
            return [self.last] * len(outputs)
        found = {self.of_tensor(tensor) for tensor in inputs} - {None}
        if len(found) <= 1 or not any(self.middle(mark) for mark in found):
            self.last = next(iter(found), None) if len(found) == 1 else None
            return [self.last] * len(outputs)
        if func in AGGREGATES and lists and len(outputs) == 1:
            positions = [(self.of_tensor(tensor), work.tensor_bytes(tensor))
                         for tensor in lists[0]]
            if sum(size for _, size in positions) == outputs[0].untyped_storage().nbytes():
                return [Aggregate(positions)]
        self.unrepeatable = f"{func} reads the tensors of several blocks"
        return [None] * len(outputs)

    def allocated(self, address: int, serial: int, mark) -> None:
        self.of_storage[address] = self.of_serial[serial] = mark

    def freed(self, address: int, serial: int):
        """The mark of a free: the block running, else the block of what is freed."""
        self.of_storage.pop(address, None)
        now = self.now()
        if now is not None:
            return now
        mark = self.of_serial[serial]
        return None if isinstance(mark, Aggregate) else mark

    def count(self, func, args, kwargs, out, key: tuple) -> None:
        """Counts an op (work.Work's key for it) under its block, or as Resized."""
        kind, flops, moved, launches, phase = key
        if not launches:
            return
        now = self.now()
        lists = work.tensor_lists(args)
        name = func._overloadpacket.__name__
        if now is None and lists and (name.startswith("_foreach_") or func in AGGREGATES):
            marks = [self.of_tensor(tensor) for tensor in lists[0]]
            if len({mark for mark in marks if self.middle(mark)}) > 1:
                outs = out if isinstance(out, (list, tuple)) and len(out) == len(lists[0]) else ()
                per_list = ([work.tensor_bytes(tensor) for tensor in lists[0]]
                            if func in AGGREGATES else ())
                positions = tuple(
                    (mark, sum(work.tensor_bytes(listed[index]) for listed in lists)
                     + (work.tensor_bytes(outs[index]) if outs else 0)
                     + (per_list[index] if per_list else 0),  # a stack's output, as its input
                     lists[0][index].numel()) for index, mark in enumerate(marks))
                fixed = moved - sum(size for _, size, _ in positions)
                self.resized.append(Resized(kind, flops, phase, fixed, positions,
                                            len(lists) if name.startswith("_foreach_") else None,
                                            launches))
                return
        read = [self.of_storage.get(tensor.untyped_storage()._cdata)
                for tensor in tensors_in((args, kwargs))]
        aggregates = [mark for mark in read if isinstance(mark, Aggregate)]
        if aggregates:  # reading a stacked list: its bytes grow with the depth too
            positions = tuple((mark, size, 0) for aggregate in aggregates
                              for mark, size in aggregate.positions)
            self.resized.append(Resized(kind, flops, phase,
                                        moved - sum(size for _, size, _ in positions),
                                        positions, None, launches))
            return
        if now is None:
            found = {mark for mark in read if mark is not None}
            if len(found) > 1 and any(self.middle(mark) for mark in found):
                self.unrepeatable = f"{func} reads the tensors of several blocks"
            now = next(iter(found)) if len(found) == 1 else None
        self.ops[(now, key)] += 1
