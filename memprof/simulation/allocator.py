"""A model of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, default settings).

Replays allocation requests and releases and reports what torch.cuda would: allocated bytes (sum of the
blocks handed out, which can exceed the sum of tensor sizes) and reserved bytes (sum of cudaMalloc'd
segments). Rules, with the constants of the C++ source:

- a request rounds up to a multiple of 512 B (kMinBlockSize), at least 512 B;
- rounded sizes <= 1 MiB (kSmallSize) use the small pool, larger ones the large pool;
- blocks belong to the stream that was current when their segment was cudaMalloc'd (`Block.stream`, from
  `getCurrentCUDAStream` in `NativeCachingAllocator::allocate`): the pools are one per (stream, small/large)
  (`BlockComparatorSize` orders by stream first), a segment and every block split from it keep its stream
  (`alloc_block`, `alloc_found_block`), and a freed block goes back to its own stream's pool whichever
  stream frees it (`free_block`); `record_stream` and its events are not modelled (FSDP2 never calls it);
- a request is served by the smallest free block of its stream's pool that is large enough (best fit
  within the stream, `get_free_block`; ties go to the lower address);
- with no such block a new segment is cudaMalloc'd: 2 MiB (kSmallBuffer) for small requests, 20 MiB
  (kLargeBuffer) for large ones under 10 MiB (kMinLargeAlloc), else the size rounded up to 2 MiB;
- a block is split, keeping the front for the request, when the remainder is >= 512 B (small pool) or
  > 1 MiB (large pool); an unsplit block counts whole in allocated bytes;
- a freed block merges with free neighbours in its segment; segments are only returned to the driver
  when a cudaMalloc would exceed the device (release_cached_blocks, then one retry) or on empty_cache,
  both of which free the entirely free segments of every stream.
Default settings (no max_split_size, no expandable segments, no garbage threshold). A request names its
stream (`malloc(rid, nbytes, stream)`, a name; DEFAULT_STREAM unless given): requests that all name one
stream are one pool. (The C++ functions are cited by name, read from pytorch@001074d2 and a recent copy,
whose stream logic is the same; not checked line by line against the v2.14.1 source.)

With `record=True` the model also keeps its history, in the order torch's allocator would record it
(`torch.cuda.memory._record_memory_history`): ("segment_alloc", addr, size), ("alloc", rid, addr, nbytes,
block size), ("free", rid, addr, nbytes, block size), ("segment_free", addr, size), ("oom", rounded size,
bytes left under the capacity), each followed by the stream (its number, `stream_number`: 0 for the default
stream, then in the order streams are first used) and `clock` (memprof.simulation.simulate.replay sets it to the event's
index in the tracker's stream); `segments()` lists the segments and their blocks as they are now. Both feed
memprof.reports.snapshot, which writes them in torch's snapshot format.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20
DEFAULT_STREAM = "default"


def round_size(nbytes: int) -> int:
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(rounded: int) -> int:
    if rounded <= SMALL_SIZE:
        return SMALL_BUFFER
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-rounded // ROUND_LARGE) * ROUND_LARGE


class SimulatedOOM(Exception):
    def __init__(self, requested: int, allocated: int, reserved: int, capacity: int):
        self.requested, self.allocated, self.reserved, self.capacity = requested, allocated, reserved, capacity
        super().__init__(f"tried to allocate {requested} B with {reserved} B reserved of {capacity} B usable")


@dataclass(eq=False)
class Block:
    addr: int
    size: int
    small: bool
    segment: int
    free: bool = True
    prev: "Block | None" = None
    next: "Block | None" = None
    rid: int | None = None  # the request it serves (None while free)
    requested: int = 0  # bytes asked for (before rounding); 0 while free
    stream: str = DEFAULT_STREAM  # its segment's stream
    pool: list | None = None  # the free list of its (stream, small/large) pool


class CachingAllocatorModel:
    """Best-fit caching allocator; `capacity` (bytes the device leaves for segments) enables OOM."""

    def __init__(self, capacity: int | None = None, record: bool = False):
        self.capacity = capacity
        self.history: list | None = [] if record else None
        self.clock = 0
        self._heads: dict[int, Block] = {}  # segment number -> its first block (the segment's address)
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._pools: dict[str, dict] = {}  # stream -> {small?: sorted [(size, addr, block)]}
        self.streams: dict[str, int] = {DEFAULT_STREAM: 0}  # stream -> its number (in the order of first use)
        self._blocks: dict[int, Block] = {}  # request id -> block
        self._next_addr = 0
        self._segments = 0

    # --- free lists ---------------------------------------------------------------------------------
    def _insert(self, b: Block) -> None:
        bisect.insort(b.pool, (b.size, b.addr, b))

    def _remove(self, b: Block) -> None:
        lst = b.pool
        del lst[bisect.bisect_left(lst, (b.size, b.addr))]

    @staticmethod
    def _best_fit(lst: list, size: int) -> Block | None:
        i = bisect.bisect_left(lst, (size, -1))
        return lst[i][2] if i < len(lst) else None

    def _pool(self, stream: str) -> dict:
        pools = self._pools.get(stream)
        if pools is None:
            pools = self._pools[stream] = {True: [], False: []}
            self.streams.setdefault(stream, len(self.streams))
        return pools

    def stream_number(self, stream: str) -> int:
        """A stream's number: 0 for the default stream, then 1, 2, ... in the order streams were first used."""
        return self.streams[stream]

    # --- segments -----------------------------------------------------------------------------------
    def _new_segment(self, small: bool, size: int, rounded: int, stream: str, pool: list) -> Block:
        if self.capacity is not None and self.reserved + size > self.capacity:
            self.release_cached()
            if self.reserved + size > self.capacity:
                if self.history is not None:
                    self.history.append(("oom", rounded, self.capacity - self.reserved, self.streams[stream],
                                         self.clock))
                raise SimulatedOOM(rounded, self.allocated, self.reserved, self.capacity)
        # segments sit at increasing addresses; the gap keeps segments from looking adjacent
        self._segments += 1
        block = Block(self._next_addr, size, small, self._segments, stream=stream, pool=pool)
        self._next_addr += size + ROUND_LARGE
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self._heads[block.segment] = block
        if self.history is not None:
            self.history.append(("segment_alloc", block.addr, size, self.streams[stream], self.clock))
        return block

    def release_cached(self) -> None:
        """Return every entirely free segment, of every stream, to the driver (what empty_cache and the OOM
        retry do: release_cached_blocks -> release_blocks over the whole large and small BlockPools)."""
        for small in (True, False):
            for stream, pools in self._pools.items():
                for size, _addr, b in list(pools[small]):
                    if b.prev is None and b.next is None:
                        self._remove(b)
                        self.reserved -= size
                        del self._heads[b.segment]
                        if self.history is not None:
                            self.history.append(("segment_free", b.addr, size, self.streams[stream], self.clock))

    # --- requests -----------------------------------------------------------------------------------
    def malloc(self, rid: int, nbytes: int, stream: str = DEFAULT_STREAM) -> int:
        """Serve request `rid`, made on `stream`; returns the bytes it adds to `allocated` (its block's size)."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = (self._pools.get(stream) or self._pool(stream))[small]
        block = self._best_fit(pool, size)
        if block is not None:
            self._remove(block)
        else:
            block = self._new_segment(small, segment_size(size), size, stream, pool)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = Block(block.addr + size, remaining, small, block.segment, True, block, block.next,
                         stream=stream, pool=pool)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._insert(rest)
        block.free = False
        block.rid, block.requested = rid, nbytes
        self._blocks[rid] = block
        if self.history is not None:
            self.history.append(("alloc", rid, block.addr, nbytes, block.size, self.streams[stream], self.clock))
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block.size

    def free(self, rid: int) -> int:
        """Release request `rid`; returns the bytes it gave back."""
        block = self._blocks.pop(rid)
        freed = block.size
        self.allocated -= freed
        if self.history is not None:
            self.history.append(("free", rid, block.addr, block.requested, freed, self.streams[block.stream],
                                 self.clock))
        block.free = True
        block.rid, block.requested = None, 0
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        self._insert(block)
        return freed

    def block_size(self, rid: int) -> int:
        return self._blocks[rid].size

    def segments(self) -> list[list[Block]]:
        """Every segment's blocks, in address order (segments too); each block's `stream` is its segment's."""
        out = []
        for _seg, head in sorted(self._heads.items(), key=lambda kv: kv[1].addr):
            blocks, b = [], head
            while b is not None:
                blocks.append(b)
                b = b.next
            out.append(blocks)
        return out
