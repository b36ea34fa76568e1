"""A deep model's simulated step made from a shallow one's: what brings a simulation of
flan-t5-xl's cells (24 blocks a stack) to a quarter of the time.

A simulation costs about the same for every block it runs (some 0.05 s a block pair for
flan-t5-large or -xl), and every block of a stack but the first and the last does the same thing:
the same ops on the same shapes, allocating and freeing the same tensors in the same order. So
the cell's model is simulated with SHALLOW blocks a stack, every event and op marked with the
block it belongs to (`Marks`), and the deep step is written out from it (`deepened`):

- A mark is (stack, block index), or None outside every block (embeddings, the loss, the final
  norm). An event or op belongs to the block running forward (module hooks: a checkpointed
  block's recomputation too), else to the block whose backward is running (autograd's current
  node, by the sequence numbers its forward gave the nodes), else to the block of the tensors it
  reads or frees (an optimizer's per-weight work and zero_grad's frees; a foreach op's outputs
  position by position).
- In each stack, the middle blocks' events come in runs: block 1's, 2's and 3's in order (or 3, 2,
  1: backward). The deep step repeats each run: block 1's, then block 2's once for each middle
  block of the deep model but two, then block 3's. A free of a middle block's tensor frees the
  copy as far from its own as in the shallow step (block k's backward frees block k's
  activations and block k-1's output), and a free of anything else frees that. The ops are
  counted the same way; an op over a list of every block's tensors (foreach updates, clipping's
  stacked norms) is priced again over the deep list, and so is a stack of such a list, its size
  included.
- The written-out step is the deep one's up to the order of frees between two allocations: a
  graph torn down when a step ends (bitsandbytes' int8 layers keep activations backward does not
  free) frees in an order that follows the graph's shape, and where other blocks' frees fall in
  it moves with the depth. Nothing the estimate reads depends on that order: the peak comes at an
  allocation, and the allocator's blocks after a run of frees are the same whatever their order
  (each freed block merges with its free neighbours).
- Whatever does not fit makes `deepened` return None, and the caller simulates the deep model
  as it is: a run whose blocks allocate unlike or free unlike (blocks 1 and 3, written out once,
  may free more outside the middle blocks: T5's position bias goes in block 1's backward), a run
  broken by other blocks' events (a LoRA LLaMA's torn-down graph frees its blocks' tensors
  interleaved), a free whose copy cannot be told, and an op reading several blocks' tensors that
  is not a list. tests/test_depth.py holds the written-out step equal, event for event (frees
  between two allocations as a set) and op for op, to a simulation of the deep model itself; so
  did all 162 distinct steps of experiments/full_grid.yaml when this was written.
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
# What sets a model's depth, by family (T5's encoder and decoder, a causal model's one stack).
DEPTH_KEYS = ("num_layers", "num_decoder_layers", "num_hidden_layers", "n_layer")
AGGREGATES = {torch.ops.aten.stack.default, torch.ops.aten.cat.default}


def depth(architecture: dict) -> int | None:
    """The blocks in each stack of a model of this architecture, where every stack has as many
    and there are more than SHALLOW (else None: it is simulated as it is)."""
    found = {architecture[key] for key in DEPTH_KEYS if architecture.get(key) is not None}
    if len(found) != 1:
        return None
    (blocks,) = found
    return blocks if blocks > SHALLOW else None


def shallow(architecture: dict) -> dict:
    return {**architecture, **{key: SHALLOW for key in DEPTH_KEYS if key in architecture}}


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


class _NotRepeatable(Exception):
    pass


def _layout(marks: list, middle, alike: bool = True) -> list:
    """The items in order: an index where the item is outside the middle blocks, or a run
    (stack, ascending, {block: (start, end)} for blocks 1, 2 and 3) of middle blocks' items,
    `alike` as many for each block."""
    segments, index = [], 0
    while index < len(marks):
        mark = marks[index]
        if not middle(mark):
            segments.append(index)
            index += 1
            continue
        end = index
        while end < len(marks) and middle(marks[end]) and marks[end][0] == mark[0]:
            end += 1
        chunks = []
        for at in range(index, end):
            if chunks and chunks[-1][0] == marks[at][1]:
                chunks[-1][2] = at + 1
            else:
                chunks.append([marks[at][1], at, at + 1])
        layers = tuple(chunk[0] for chunk in chunks)
        if layers not in (MIDDLE, MIDDLE[::-1]):
            raise _NotRepeatable(f"blocks {layers} in a run")
        if alike and len({chunk[2] - chunk[1] for chunk in chunks}) != 1:
            raise _NotRepeatable("middle blocks of different lengths")
        segments.append((mark[0], layers == MIDDLE,
                         {chunk[0]: (chunk[1], chunk[2]) for chunk in chunks}))
        index = end
    return segments


def _source(copy: int, blocks: int) -> int:
    """The shallow block a deep middle block's copy is written from."""
    return MIDDLE[0] if copy == 1 else MIDDLE[-1] if copy == blocks - 2 else MIDDLE[1]


def _expanded(segments: list, blocks: int):
    """(shallow index, deep block or None, shallow block or None, run) per deep item."""
    for number, segment in enumerate(segments):
        if isinstance(segment, int):
            yield segment, None, None, None
            continue
        _, ascending, chunks = segment
        copies = range(1, blocks - 1) if ascending else range(blocks - 2, 0, -1)
        for copy in copies:
            source = _source(copy, blocks)
            for index in range(*chunks[source]):
                yield index, copy, source, number


def _positions_deep(positions: tuple, middle, blocks: int) -> list:
    return [positions[index] for index, *_ in
            _expanded(_layout([mark for mark, *_ in positions], middle), blocks)]


def _aggregate_bytes(aggregate: Aggregate, middle, blocks: int) -> int:
    return sum(size for _, size in _positions_deep(tuple(aggregate.positions), middle, blocks))


def deepened(steps, marks: Marks, blocks: int):
    """`steps` (steps.Steps of the shallow model, simulated with `marks`) as the same model with
    `blocks` blocks a stack would have taken them, or None where the step does not repeat."""
    if marks.unrepeatable or set(marks.layers.values()) != {SHALLOW}:
        return None
    try:
        return _deepened(steps, marks, blocks)
    except (_NotRepeatable, KeyError, IndexError):
        return None


def _deepened(steps, marks: Marks, blocks: int):
    middle = marks.middle
    weights = [steps.weights[index] for index, *_ in
               _expanded(_layout(steps.weight_marks, middle), blocks)]
    layout = _layout(steps.event_marks, middle, alike=False)
    # a middle block's allocation: (run, its place among its block's allocations, block)
    slot_of, placed = {}, Counter()
    for index, copy, _, run in _expanded(layout, SHALLOW):
        serial, size = steps.events[index]
        if size > 0 and copy is not None:
            slot_of[serial] = (run, placed[(run, copy)], copy)
            placed[(run, copy)] += 1
    for run, segment in enumerate(layout):
        if not isinstance(segment, int):
            _check_run(steps, segment, run, slot_of, layout)
    events, sizes, serials, starts = [], [], {}, {}
    copies = {}  # (run, deep block): its allocations' new serials, by place
    gradients, states = set(), set()

    def allocated(serial: int, size: int) -> int:
        new = len(sizes)
        sizes.append(size)
        events.append((new, size))
        if serial in steps.gradients:
            gradients.add(new)
        if serial in steps.states:
            states.add(new)
        return new

    for run, segment in enumerate(layout):
        if isinstance(segment, int):  # written out once
            starts[segment] = len(events)
            serial, size = steps.events[segment]
            if size > 0:
                mark = marks.of_serial[serial]
                serials[serial] = allocated(serial, _aggregate_bytes(mark, middle, blocks)
                                            if isinstance(mark, Aggregate) else size)
                continue
            target = _freed(serial, slot_of, None, None, blocks)
            new = serials[serial] if target is None else copies[target[0], target[2]][target[1]]
            events.append((new, -sizes[new]))
            continue
        _, ascending, chunks = segment
        for copy in range(1, blocks - 1) if ascending else range(blocks - 2, 0, -1):
            source = _source(copy, blocks)
            first, last = chunks[source]
            starts.setdefault(first, len(events))
            placed = copies[run, copy] = []
            for serial, size in steps.events[first:last]:
                if size > 0:
                    placed.append(allocated(serial, size))
                    continue
                target = _freed(serial, slot_of, copy, source, blocks)
                new = serials[serial] if target is None else copies[target[0], target[2]][
                    target[1]]
                events.append((new, -sizes[new]))
    spans = [tuple(starts[bound] if bound < len(steps.events) else len(events)
                   for bound in span) for span in steps.optimizer_steps]
    return type(steps)(weights, events, dict(enumerate(sizes)), gradients, states, spans,
                       _ops(marks, blocks))


def _freed(serial: int, slot_of: dict, copy, source, blocks: int):
    """The slot (run, place, deep block) of the allocation a deep item's free frees, or None
    where it frees an allocation outside the middle blocks (written out once)."""
    if serial not in slot_of:
        return None
    run, place, layer = slot_of[serial]
    if copy is None:  # from outside the middle blocks: the first middle block's, or the last's
        if layer == MIDDLE[0]:
            return run, place, 1
        if layer == MIDDLE[-1]:
            return run, place, blocks - 2
        raise _NotRepeatable("a free of the centre block from outside the middle blocks")
    target = layer + copy - source
    if not 1 <= target <= blocks - 2:
        raise _NotRepeatable("a free beyond the middle blocks' copies")
    return run, place, target


def _check_run(steps, segment: tuple, run: int, slot_of: dict, layout: list) -> None:
    """Blocks 1, 2 and 3 of a run allocate the same sizes in the same order and free alike:
    each what lies as far from its own block in the same run and place, in this stack, or
    (where that is outside the middle blocks) an allocation outside them. Block 2, whose copies
    the deep step repeats, frees nothing outside the middle blocks; blocks 1 and 3, written out
    once, may (the first frees what the stack's first block kept for all: T5's position bias)."""
    stack, _, chunks = segment
    centre = [steps.events[index] for index in range(*chunks[MIDDLE[1]])]
    if any(size < 0 and serial not in slot_of for serial, size in centre):
        raise _NotRepeatable("the centre block frees an allocation outside the middle blocks")
    for layer in (MIDDLE[0], MIDDLE[-1]):
        found = [steps.events[index] for index in range(*chunks[layer])]
        at = 0
        for serial, size in found:
            if at < len(centre) and _alike((serial, size), centre[at], layer, slot_of, layout,
                                           stack):
                at += 1
            elif size > 0 or serial in slot_of:
                raise _NotRepeatable("middle blocks that allocate or free unlike")
        if at != len(centre):
            raise _NotRepeatable("middle blocks that allocate or free unlike")


def _alike(event: tuple, centre: tuple, layer: int, slot_of: dict, layout: list,
           stack: int) -> bool:
    (serial, size), (centre_serial, centre_size) = event, centre
    if size != centre_size:
        return False
    if size > 0:
        return True
    run, place, other = slot_of[centre_serial]
    shifted = other + layer - MIDDLE[1]
    if layout[run][0] != stack:
        return False
    return (slot_of.get(serial) == (run, place, shifted) if shifted in MIDDLE
            else serial not in slot_of)


def _ops(marks: Marks, blocks: int) -> Counter:
    """The deep step's op counts: each middle block's as often as it is written out, and each
    Resized op priced over its deep list."""
    ops = Counter()
    copies = Counter(_source(copy, blocks) for copy in range(1, blocks - 1))
    for (mark, key), count in marks.ops.items():
        ops[key] += count * (copies[mark[1]] if marks.middle(mark) else 1)
    for op in marks.resized:
        positions = _positions_deep(op.positions, marks.middle, blocks)
        moved = op.fixed + sum(size for _, size, _ in positions)
        launches = op.launches if op.lists is None else work.foreach_launches(
            op.lists, [elements for *_, elements in positions])
        ops[(op.kind, op.flops, moved, launches, op.phase)] += 1
    return ops
