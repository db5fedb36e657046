"""Per-stream pools of the caching-allocator model (memprof.simulation.allocator) and the streams FSDP2 allocates
on (memprof.simulation.distributed.FSDPStorageEvents). Every figure is computed by hand in its test; each test
has a negative control (one pool, or every request forced onto one stream)."""

import types

import pytest
import torch

from memprof.simulation.allocator import CachingAllocatorModel, SimulatedOOM
from memprof.simulation.events import ALLOC

MiB = 1 << 20


def requests(a: CachingAllocatorModel, streams=("all-gather copy-in", "default", "reduce-scatter")):
    """4 MiB on the first stream, freed; 4 MiB on the second; 2 MiB on the third (each < 10 MiB: a 20 MiB
    kLargeBuffer segment when a new one is needed)."""
    a.malloc(1, 4 * MiB, streams[0])
    a.free(1)
    a.malloc(2, 4 * MiB, streams[1])
    a.malloc(3, 2 * MiB, streams[2])
    return a


def test_best_fit_stays_within_the_requests_stream():
    """Per stream: the freed all-gather block cannot serve the default request, nor the default segment's 16 MiB
    remainder the reduce-scatter one: three 20 MiB segments = 62,914,560 B. One pool (negative control): the
    4 MiB reuses the freed segment and the 2 MiB fits its remainder: 20,971,520 B."""
    per_stream = requests(CachingAllocatorModel())
    assert per_stream.peak_reserved == per_stream.reserved == 62_914_560
    assert [(s[0].stream, sum(b.size for b in s)) for s in per_stream.segments()] == [
        ("all-gather copy-in", 20 * MiB), ("default", 20 * MiB), ("reduce-scatter", 20 * MiB)]
    one = requests(CachingAllocatorModel(), ("default",) * 3)
    assert one.peak_reserved == 20_971_520 and len(one.segments()) == 1
    assert per_stream.peak_allocated == one.peak_allocated == 6 * MiB  # both blocks split: no rounding up


def test_a_freed_block_goes_back_to_its_own_streams_pool():
    """A reduce-scatter block freed (whichever stream frees it) serves the next reduce-scatter request, not a
    default one: the default request cudaMallocs a segment of its own (20 -> 40 MiB); one pool reuses it."""
    a = CachingAllocatorModel()
    a.malloc(1, 2 * MiB, "reduce-scatter")
    a.free(1)
    a.malloc(2, 2 * MiB)
    assert a.reserved == 40 * MiB
    a.malloc(3, 2 * MiB, "reduce-scatter")
    assert a.reserved == 40 * MiB and a.segments()[0][0].rid == 3  # the reduce-scatter segment's front again
    one = CachingAllocatorModel()
    one.malloc(1, 2 * MiB)
    one.free(1)
    one.malloc(2, 2 * MiB)
    assert one.reserved == 20 * MiB


def test_the_oom_retry_releases_cached_segments_of_every_stream():
    """Capacity 50 MiB: the 2 MiB reduce-scatter request would make 60 MiB, so release_cached_blocks frees the
    entirely free all-gather segment (another stream's) and the retry succeeds at 41,943,040 B."""
    a = requests(CachingAllocatorModel(capacity=50 * MiB, record=True))
    assert a.reserved == a.peak_reserved == 41_943_040
    assert [s[0].stream for s in a.segments()] == ["default", "reduce-scatter"]
    freed = [h for h in a.history if h[0] == "segment_free"]
    assert [(h[2], h[3]) for h in freed] == [(20 * MiB, a.stream_number("all-gather copy-in"))]
    # empty_cache likewise walks every stream: the two segments in use stay
    a.free(2), a.free(3)
    a.release_cached()
    assert a.reserved == 0


def test_per_stream_pools_can_run_out_where_one_pool_fits():
    """Capacity 30 MiB: the default request first releases the cached all-gather segment (20 + 20 > 30), then the
    reduce-scatter one finds nothing to release (the default segment is in use): OOM at 20,971,520 B reserved.
    One pool (negative control) fits in its single 20 MiB segment."""
    with pytest.raises(SimulatedOOM) as oom:
        requests(CachingAllocatorModel(capacity=30 * MiB))
    assert (oom.value.requested, oom.value.reserved) == (2 * MiB, 20_971_520)
    one = requests(CachingAllocatorModel(capacity=30 * MiB), ("default",) * 3)
    assert one.peak_reserved == 20 * MiB


def test_the_snapshot_names_each_stream_by_a_stable_number():
    """Stream numbers: 0 the default stream, then in the order of first use (all-gather copy-in 1, reduce-scatter
    2), in the segments and the trace entries; the trace replays to the model's peaks. A single-stream snapshot
    (negative control) has stream 0 throughout."""
    from memprof.reports.snapshot import build_snapshot, trace_peaks

    a = CachingAllocatorModel(record=True)
    requests(a)
    snap = build_snapshot(a, [], {}, {})
    assert [s["stream"] for s in snap["segments"]] == [1, 0, 2]
    assert [(e["action"], e["stream"]) for e in snap["device_traces"][0]] == [
        ("segment_alloc", 1), ("alloc", 1), ("free_requested", 1), ("free_completed", 1),
        ("segment_alloc", 0), ("alloc", 0), ("segment_alloc", 2), ("alloc", 2)]
    peaks = trace_peaks(snap)
    assert (peaks.peak_allocated_bytes, peaks.peak_reserved_bytes) == (a.peak_allocated, a.peak_reserved)
    one = CachingAllocatorModel(record=True)
    requests(one, ("default",) * 3)
    snap = build_snapshot(one, [], {}, {})
    assert {e["stream"] for e in snap["device_traces"][0]} | {s["stream"] for s in snap["segments"]} == {0}


# --- FSDP2 through memprof's own pipeline ------------------------------------------------------------------

class Toy(torch.nn.Module):
    """Two FSDP units of Linear(1024, 1024, bias=False): 4 MiB unsharded, 2 MiB a shard at world size 2."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(1024, 1024, bias=False) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return x


def toy_prediction():
    """fully_shard (each block, then the root) at world size 2, fp32, batch 8, SGD, 2 steps, on the h100-80g card,
    through the engine's entrance (prediction_of) with the CUDA rules and the FSDP rules."""
    from memprof.simulation import distributed
    from memprof.simulation.simulate import prediction_of
    from memprof.simulation.tracing import trace_step

    def build():
        return Toy(), (lambda params: torch.optim.SGD(params, lr=0.1)), []

    def run(model, optimizer, on_phase):
        for step in range(2):
            on_phase("forward", step)
            loss = model(torch.randn(8, 1024)).sum()
            on_phase("backward", step)
            loss.backward()
            del loss
            on_phase("optimizer", step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        on_phase("done", 2)

    spec = types.SimpleNamespace(world_size=2, reshard_after_forward=True, parallel="fsdp")

    def make_trace(rules):
        return trace_step(build, run, (*rules, *distributed.parallel_rules(spec)), True, None,
                          lambda m: distributed.shard(m, spec), distributed.fake_process_group(2))

    return prediction_of(make_trace, "h100-80g")


@pytest.fixture(scope="module")
def toy():
    return toy_prediction()


def test_fsdp_allocates_on_its_copy_in_and_reduce_scatter_streams(toy):
    """The all-gather outputs (4 MiB: 2 ranks x a 2 MiB shard) are made on the all-gather copy-in stream, the
    reduce-scatter outputs (the new 2 MiB gradient shards) on the reduce-scatter stream; the reduce-scatter inputs
    (4 MiB) and the unsharded parameters on the default stream (foreach_all_gather / foreach_reduce in torch's
    _fsdp_collectives.py)."""
    t = toy.trace
    allocs = [ev for ev in t.events if ev.kind is ALLOC]
    on = {ev.sid: t.stream.get(ev.sid, "default") for ev in allocs}
    gathers = [ev for ev in allocs if ev.op.startswith("communication: all-gather")]
    reduces = [ev for ev in allocs if ev.op.startswith("communication: reduce-scatter")]
    assert len(gathers) == 8 and {(ev.nbytes, on[ev.sid]) for ev in gathers} == {(4 * MiB, "all-gather copy-in")}
    assert len(reduces) == 8  # input then output, for each of 2 units in each of 2 steps
    assert [(ev.nbytes, on[ev.sid]) for ev in reduces] == [(4 * MiB, "default"), (2 * MiB, "reduce-scatter")] * 4
    assert {on[ev.sid] for ev in allocs if ev.op.startswith("unsharded parameter:")} == {"default"}
    assert set(t.stream) == {ev.sid for ev in gathers + reduces[1::2]}  # nothing else is off the default stream


def test_fsdp_streams_reserve_a_segment_each(toy):
    """One pool: 86 MiB (a 20 MiB large segment, a 2 MiB small one and the two 32 MiB cuBLAS workspaces); the
    copy-in and reduce-scatter buffers fit the default segment's free space. Per stream the default pool needs
    the same segments, and each FSDP stream cudaMallocs one 20 MiB segment (at most 2 x 4 MiB all-gather outputs
    and 2 x 2 MiB gradient shards live at once, each stream's under its 20 MiB): +41,943,040 B. Peak allocated is
    the same (every block of those segments is split off, so no block rounds up differently). Negative control:
    the same stream replayed as one pool."""
    from memprof.simulation.simulate import replay

    assert toy.metrics["peak_reserved_bytes"] == toy.full.peak_reserved == 132_120_576
    one = replay(toy.trace.events)
    assert one.peak_reserved == 90_177_536 == (20 + 2 + 32 + 32) * MiB
    assert toy.metrics["peak_reserved_bytes"] - one.peak_reserved == 41_943_040
    assert toy.metrics["peak_allocated_bytes"] == one.peak_allocated == 86_082_560
    by_stream = {}
    for blocks in toy.full.allocator.segments():
        by_stream.setdefault(blocks[0].stream, []).append(sum(b.size for b in blocks))
    assert {s: sorted(v) for s, v in by_stream.items()} == {
        "default": [2 * MiB, 20 * MiB, 32 * MiB, 32 * MiB], "all-gather copy-in": [20 * MiB],
        "reduce-scatter": [20 * MiB]}


def test_every_request_on_one_stream_is_the_single_pool_model(toy):
    """Negative control: the toy's requests all forced onto one stream (any name) replay exactly as with no
    streams given: the same peaks, peak event, block sizes and history."""
    from memprof.simulation.simulate import replay

    events = toy.trace.events
    forced = {ev.sid: "reduce-scatter" for ev in events if ev.kind is ALLOC}
    a, b = replay(events, record=True), replay(events, record=True, streams=forced)
    assert (a.peak_allocated, a.peak_reserved, a.peak_index, a.phase_peaks, a.block_bytes) == \
        (b.peak_allocated, b.peak_reserved, b.peak_index, b.phase_peaks, b.block_bytes)
    renumbered = [(*h[:-2], 0, h[-1]) for h in b.allocator.history]  # reduce-scatter is stream 1 there
    assert renumbered == a.allocator.history
    assert replay(events, streams=toy.trace.stream).peak_reserved != a.peak_reserved  # (the streams do matter)


def test_a_run_without_fsdp_records_no_streams():
    """DDP and single-process runs: the tracker never asks for a stream (no callable set), the trace has none."""
    from memprof.simulation.simulate import prediction
    from memprof.spec import RunSpec

    for spec in (RunSpec("test-vit", "sgd"), RunSpec("test-vit", "sgd", parallel="ddp", world_size=2)):
        assert prediction(spec).trace.stream == {}
    fsdp = prediction(RunSpec("test-vit", "sgd", parallel="fsdp", world_size=2))
    assert set(fsdp.trace.stream.values()) == {"all-gather copy-in", "reduce-scatter"}  # (control)


SCRIPT = """import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

dist.init_process_group("nccl")
model = torch.nn.Module()
model.blocks = torch.nn.ModuleList([torch.nn.Linear(1024, 1024, bias=False) for _ in range(2)])
model.forward = lambda x: torch.relu(model.blocks[1](torch.relu(model.blocks[0](x))))
model.cuda()
for block in model.blocks:
    fully_shard(block)
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(2):
    model(torch.randn(8, 1024, device="cuda")).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
print("RESERVED", torch.cuda.max_memory_reserved())
"""


def test_an_fsdp_script_reads_the_per_stream_figures(tmp_path, monkeypatch):
    """A torchrun-style FSDP2 script on the simulated device: torch.cuda.max_memory_reserved() (the live allocator
    feed) equals the record's figure, which counts the two FSDP streams' 20 MiB segments. Negative control: the
    stream names suppressed (every request on the default stream) gives 40 MiB less."""
    import contextlib
    import io

    from memprof.script.runner import run_script
    from memprof.simulation.distributed import FSDPStorageEvents

    path = tmp_path / "train_fsdp.py"
    path.write_text(SCRIPT)

    def reserved():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            result = run_script(str(path), [], budget="h100-80g", world_size=2)
        printed = int(out.getvalue().split("RESERVED")[1].split()[0])
        return printed, result.record["metrics"]["peak_reserved_bytes"]

    printed, recorded = reserved()
    assert printed == recorded
    monkeypatch.setattr(FSDPStorageEvents, "stream_name", lambda self: None)
    printed_one, recorded_one = reserved()
    assert printed_one == recorded_one == recorded - 41_943_040
