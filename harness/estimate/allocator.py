"""PyTorch's CUDA caching allocator, replayed: how much memory it reserves from the device (what
nvidia-smi shows beside the CUDA context) for a sequence of tensor allocations and frees.

The allocator never hands a freed block back to the device; it caches it for later requests of a
size that fits, so it reserves more than the tensors alive at any moment add up to. The rules
below are those its source documents (c10/cuda/CUDACachingAllocator.cpp, the comment at its top
and its constants), with the default settings (no PYTORCH_CUDA_ALLOC_CONF):

- every request is rounded up to a multiple of 512 bytes;
- requests up to 1 MiB come from a pool of 2 MiB segments, larger ones from a pool of segments of
  20 MiB (requests under 10 MiB) or of the request rounded up to 2 MiB;
- a request takes the smallest cached free block of its pool that fits (best fit), and is split
  off it when what remains is at least 512 bytes (small pool) or more than 1 MiB (large pool);
  otherwise it keeps the whole block;
- a freed block merges with free neighbours in its segment; no segment is ever released.

Left out: streams (one stream here), the retry that releases cached segments when the device is
full, and expandable segments.
"""

import bisect
import math

MIB = 2**20
MIN_BLOCK = 512
SMALL_REQUEST = 1 * MIB
SMALL_SEGMENT = 2 * MIB
LARGE_SEGMENT = 20 * MIB
MIN_LARGE_SEGMENT_REQUEST = 10 * MIB
LARGE_ROUNDING = 2 * MIB


def rounded(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if size < MIN_LARGE_SEGMENT_REQUEST:
        return LARGE_SEGMENT
    return math.ceil(size / LARGE_ROUNDING) * LARGE_ROUNDING


class CachingAllocator:
    """Replays allocations (`allocate(serial, bytes)`) and frees (`free(serial)`); `reserved`
    and `peak_reserved` are what it holds from the device now and at most."""

    def __init__(self):
        self.free_blocks = {True: [], False: []}  # small pool?: sorted [(size, segment, offset)]
        self.segments = []                        # per segment: {offset: (size, is_free)}
        self.ends = []                            # per segment: {a block's end: its offset}
        self.small_segments = set()
        self.taken = {}                           # serial: (segment, offset)
        self.reserved = self.peak_reserved = 0

    def allocate(self, serial, size: int) -> None:
        if size <= 0:  # an empty tensor allocates nothing
            return
        size = rounded(size)
        small = size <= SMALL_REQUEST
        pool = self.free_blocks[small]
        found = bisect.bisect_left(pool, (size, -1, -1))
        if found < len(pool):
            block_size, segment, offset = pool.pop(found)
            del self.ends[segment][offset + block_size]
        else:
            block_size, segment, offset = segment_size(size), len(self.segments), 0
            self.segments.append({})
            self.ends.append({})
            if small:
                self.small_segments.add(segment)
            self.reserved += block_size
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block_size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_REQUEST:
            self._put(segment, offset, size, False)
            self._put(segment, offset + size, remaining, True)
            bisect.insort(pool, (remaining, segment, offset + size))
        else:
            self._put(segment, offset, block_size, False)
        self.taken[serial] = (segment, offset)

    def free(self, serial) -> None:
        if serial not in self.taken:
            return
        segment, offset = self.taken.pop(serial)
        blocks = self.segments[segment]
        size, _ = blocks.pop(offset)
        del self.ends[segment][offset + size]
        small = segment in self.small_segments
        # Merge with the free block after, then with the free block before (the one that ends
        # where this one starts).
        after = offset + size
        if after in blocks and blocks[after][1]:
            size += self._take_free(small, segment, after)
        before = self.ends[segment].get(offset)
        if before is not None and blocks[before][1]:
            size += self._take_free(small, segment, before)
            offset = before
        self._put(segment, offset, size, True)
        bisect.insort(self.free_blocks[small], (size, segment, offset))

    def _put(self, segment: int, offset: int, size: int, is_free: bool) -> None:
        self.segments[segment][offset] = (size, is_free)
        self.ends[segment][offset + size] = offset

    def _take_free(self, small: bool, segment: int, offset: int) -> int:
        size, _ = self.segments[segment].pop(offset)
        del self.ends[segment][offset + size]
        pool = self.free_blocks[small]  # sorted: found by bisection, not a scan
        del pool[bisect.bisect_left(pool, (size, segment, offset))]
        return size


def replay(events) -> int:
    """The most memory the allocator reserves for `events`, a list of (serial, bytes) in order,
    bytes < 0 for the free of that serial."""
    allocator = CachingAllocator()
    for serial, size in events:
        if size > 0:
            allocator.allocate(serial, size)
        else:
            allocator.free(serial)
    return allocator.peak_reserved
