"""The caching allocator's replay follows the rules its source documents."""

from harness.estimate.allocator import MIB, CachingAllocator, replay


def test_requests_are_rounded_and_take_segments_by_size():
    allocator = CachingAllocator()
    allocator.allocate("small", 100)          # up to 1 MiB: a 2 MiB segment
    allocator.allocate("medium", 3 * MIB)     # 1 to 10 MiB: a 20 MiB segment
    allocator.allocate("large", 30 * MIB + 1)  # from 10 MiB: rounded up to 2 MiB
    assert allocator.reserved == (2 + 20 + 32) * MIB
    allocator.allocate("tiny", 1)  # fits in the small segment's remainder
    allocator.allocate("another medium", 5 * MIB)  # fits in the 20 MiB segment's remainder
    assert allocator.reserved == (2 + 20 + 32) * MIB


def test_freed_blocks_are_cached_reused_best_fit_and_merged():
    allocator = CachingAllocator()
    allocator.allocate("a", 12 * MIB)
    allocator.allocate("b", 40 * MIB)
    allocator.free("a")
    allocator.free("b")
    assert allocator.reserved == 52 * MIB  # nothing is handed back to the device
    allocator.allocate("c", 11 * MIB)  # the 12 MiB block fits best
    assert allocator.taken["c"][0] == 0
    allocator.free("c")
    allocator.allocate("d", 30 * MIB)  # split off the 40 MiB block
    allocator.allocate("e", 10 * MIB)  # the 10 MiB left of it (more than 1 MiB remained)
    assert allocator.reserved == 52 * MIB
    allocator.free("d")
    allocator.free("e")
    allocator.allocate("f", 40 * MIB)  # the two halves merged back into one block
    assert allocator.reserved == 52 * MIB


def test_a_block_too_small_for_a_request_is_not_used():
    # Fragmentation: 20 MiB free in two blocks of 10 MiB (segments of their own) cannot hold a
    # request of 15 MiB, which gets a new segment.
    events = [("a", 10 * MIB), ("b", 10 * MIB), ("keep", 10 * MIB), ("a", -10 * MIB),
              ("b", -10 * MIB), ("c", 15 * MIB)]
    assert replay(events) == (10 + 10 + 10 + 16) * MIB
