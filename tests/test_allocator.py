"""The caching-allocator model against hand-worked sequences (c10/cuda/CUDACachingAllocator.cpp rules)."""

import pytest

from memprof.simulation.allocator import CachingAllocatorModel, SimulatedOOM, round_size, segment_size

KiB, MiB = 1 << 10, 1 << 20


def test_round_size():
    assert round_size(1) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert round_size(4 * MiB + 1) == 4 * MiB + 512


def test_segment_size():
    assert segment_size(512) == 2 * MiB  # small pool
    assert segment_size(1 * MiB) == 2 * MiB
    assert segment_size(1 * MiB + 512) == 20 * MiB  # large, under 10 MiB
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(11 * MiB + 512) == 12 * MiB  # rounded up to 2 MiB


def test_small_request_splits_a_2mib_segment():
    a = CachingAllocatorModel()
    assert a.malloc(1, 1000) == 1024
    assert (a.allocated, a.reserved) == (1024, 2 * MiB)
    assert a.malloc(2, 1000) == 1024  # served from the remainder, no new segment
    assert a.reserved == 2 * MiB


def test_large_split_then_unsplit_reuse_counts_the_whole_block():
    a = CachingAllocatorModel()
    a.malloc(1, 5 * MiB)  # 20 MiB segment, remainder 15 MiB > 1 MiB: split
    assert (a.allocated, a.reserved) == (5 * MiB, 20 * MiB)
    a.free(1)  # merges back into one 20 MiB free block
    assert a.allocated == 0
    # 19.5 MiB fits the 20 MiB block; the 0.5 MiB remainder is not > 1 MiB: no split, counts whole
    assert a.malloc(2, 19 * MiB + 512 * KiB) == 20 * MiB
    assert (a.allocated, a.reserved, a.peak_allocated) == (20 * MiB, 20 * MiB, 20 * MiB)


def test_large_remainder_of_exactly_1mib_is_not_split():
    a = CachingAllocatorModel()
    a.malloc(1, 19 * MiB)  # 20 MiB segment, remainder exactly 1 MiB: not > 1 MiB
    assert a.allocated == 20 * MiB


def test_best_fit_takes_the_smallest_block_that_fits():
    a = CachingAllocatorModel()
    a.malloc(1, 12 * MiB)  # own 12 MiB segment
    a.malloc(2, 30 * MiB)  # own 30 MiB segment
    a.free(1)
    a.free(2)
    a.malloc(3, 11 * MiB)  # fits both; best fit is the 12 MiB block (remainder 1 MiB: not split)
    assert a.block_size(3) == 12 * MiB
    assert a.reserved == 42 * MiB


def test_pools_are_separate():
    a = CachingAllocatorModel()
    a.malloc(1, 12 * MiB)
    a.free(1)
    a.malloc(2, 4 * KiB)  # a small request never takes a large-pool block
    assert a.reserved == 14 * MiB


def test_free_merges_neighbours_both_sides():
    a = CachingAllocatorModel()
    for rid in (1, 2, 3):
        a.malloc(rid, 4 * MiB)  # three splits of one 20 MiB segment
    assert a.reserved == 20 * MiB
    a.free(1)
    a.free(3)
    a.free(2)  # joins the free block before and the one after
    assert a.malloc(4, 20 * MiB) == 20 * MiB
    assert a.reserved == 20 * MiB


def test_oom_releases_cached_segments_before_failing():
    a = CachingAllocatorModel(capacity=40 * MiB)
    a.malloc(1, 30 * MiB)
    a.free(1)  # 30 MiB cached, nothing allocated
    a.malloc(2, 36 * MiB)  # needs the cache released first
    assert a.reserved == 36 * MiB
    with pytest.raises(SimulatedOOM) as err:
        a.malloc(3, 10 * MiB)
    assert err.value.requested == 10 * MiB and err.value.reserved == 36 * MiB


def test_history_and_segments_follow_the_model():
    """With record=True: the history names every segment and request in order, segments() tiles each
    segment with its blocks, and recording changes no figure (a mixed stream of 300 requests)."""
    import random

    rng = random.Random(0)
    plain, rec = CachingAllocatorModel(), CachingAllocatorModel(record=True)
    live = []
    for rid in range(300):
        if live and rng.random() < 0.45:
            victim = live.pop(rng.randrange(len(live)))
            plain.free(victim), rec.free(victim)
        else:
            nbytes = rng.choice([700, 40 * KiB, 900 * KiB, 3 * MiB, 12 * MiB])
            assert plain.malloc(rid, nbytes) == rec.malloc(rid, nbytes)
            live.append(rid)
    assert (plain.peak_allocated, plain.peak_reserved) == (rec.peak_allocated, rec.peak_reserved)
    assert plain.history is None
    kinds = [h[0] for h in rec.history]
    assert kinds.count("alloc") + kinds.count("free") == 300 and kinds.count("alloc") - kinds.count("free") == len(live)
    assert kinds.count("segment_alloc") == len(rec.segments())  # nothing released without a capacity
    allocated = 0
    for blocks in rec.segments():
        for a, b in zip(blocks, blocks[1:]):
            assert a.addr + a.size == b.addr and not (a.free and b.free)  # contiguous, free neighbours merged
        allocated += sum(b.size for b in blocks if not b.free)
    assert allocated == rec.allocated and sum(sum(b.size for b in s) for s in rec.segments()) == rec.reserved
    freed = {h[1] for h in rec.history if h[0] == "free"}
    assert freed.isdisjoint(live) and all(h[4] >= round_size(h[3]) for h in rec.history if h[0] == "alloc")


def test_oom_history_releases_cache_then_records_the_oom():
    a = CachingAllocatorModel(capacity=30 * MiB, record=True)
    a.malloc(1, 5 * MiB)
    a.free(1)
    a.malloc(2, 1000)
    with pytest.raises(SimulatedOOM):
        a.malloc(3, 29 * MiB)
    assert [h[0] for h in a.history][-2:] == ["segment_free", "oom"]
    assert a.history[-1][1:3] == (29 * MiB, 30 * MiB - 2 * MiB)  # rounded request, bytes left under the cap
