"""A deep model's simulated step made from a shallow one's: what brings a simulation of
flan-t5-xl's cells (24 blocks a stack) to a quarter of the time.

A simulation costs about the same for every block it runs (some 0.05 s a block pair for
flan-t5-large or -xl), and every block of a stack but the first and the last does the same thing:
the same ops on the same shapes, allocating and freeing the same tensors in the same order. So
the cell's model is simulated with SHALLOW blocks a stack, every event and op marked with the
block it belongs to (`Marks`), and the deep step is written out from it (`deepened`):

- Each event and op is marked with its block as the shallow step runs (harness/estimate/
  marks.py): the block running forward or backward, else the block of the tensors it reads.
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

from collections import Counter

from harness.estimate import work
from harness.estimate.marks import MIDDLE, SHALLOW, Aggregate, Marks

# What sets a model's depth, by family (T5's encoder and decoder, a causal model's one stack).
DEPTH_KEYS = ("num_layers", "num_decoder_layers", "num_hidden_layers", "n_layer")


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
