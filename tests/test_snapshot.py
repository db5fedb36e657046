"""Predicted allocator snapshots: torch's own _memory_viz reads them, and their trace gives back the
prediction's peaks (a corrupted snapshot does not). Module attribution at the peak."""

import copy
import os
import pickle

import pytest
from torch.cuda import _memory_viz

from memprof.simulation.allocator import CachingAllocatorModel
from memprof.backends.registry import get
from memprof.reports.snapshot import (BASE_ADDR, SnapshotError, build_snapshot, check_snapshot, load_snapshot,
                              snapshot_name, state_totals, trace_peaks)
from memprof.spec import RunSpec
from memprof.simulation.events import ALLOC, FREE, PHASE, alloc, free, phase

MiB = 1 << 20



def with_files(spec, **files):
    """The simulate backend's prediction of `spec` with the files it leaves (timeline, snapshot)."""
    outcome = get("simulate").run(spec, **files)
    return outcome.status, {**outcome.metrics, **outcome.artifacts}

@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """test-vit AdamW predicted with its snapshot and timeline written."""
    out = tmp_path_factory.mktemp("run")
    status, metrics = with_files(RunSpec("test-vit", "adamw"), out_dir=str(out), snapshot_dir=str(out / "snap"))
    return status, metrics, load_snapshot(metrics["snapshot_file"]), out


def test_snapshot_is_named_by_record_key(predicted):
    _, metrics, _, out = predicted
    key = "test-vit/adamw/ckpt-off/32bit/bs1/fp32/steps2/titan-x@simulate"
    assert metrics["snapshot_file"] == str(out / "snap" / snapshot_name(key))
    assert snapshot_name(key) == "test-vit_adamw_ckpt-off_32bit_bs1_fp32_steps2_titan-x@simulate.pickle"


def test_torch_memory_viz_reads_the_predicted_snapshot(predicted):
    """torch's own functions: trace_plot and segment_plot make their HTML (offline: they embed the pickle),
    segsum checks every segment's blocks add up, trace prints the history."""
    _, metrics, snap, _ = predicted
    for html in (_memory_viz.trace_plot(snap), _memory_viz.segment_plot(snap)):
        assert html.count("snapshot.pickle") == 1 and len(html) > 10_000
    summary = _memory_viz.segsum(snap)
    allocated, reserved = state_totals(snap)
    assert f"total_reserved: {_memory_viz.Bytes(reserved)}" in summary
    assert f"total_allocated: {_memory_viz.Bytes(allocated)}" in summary
    text = _memory_viz.trace(snap)
    assert "cudaMalloc" in text and f"{len(snap['device_traces'][0])} entries" in text


def test_memory_viz_command_line_writes_the_plots(predicted, tmp_path):
    """`python -m torch.cuda._memory_viz trace_plot|segment_plot SNAP -o out.html`, as a user runs it."""
    import subprocess
    import sys

    _, metrics, _, _ = predicted
    for cmd in ("trace_plot", "segment_plot"):
        out = tmp_path / f"{cmd}.html"
        subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", cmd, metrics["snapshot_file"], "-o", str(out)],
                       check=True, capture_output=True, timeout=300)
        assert "snapshot.pickle" in out.read_text()


def test_trace_peaks_equal_the_prediction(predicted):
    _, metrics, snap, _ = predicted
    peaks = trace_peaks(snap)
    assert peaks.peak_allocated_bytes == metrics["peak_allocated_bytes"]
    assert peaks.peak_reserved_bytes == metrics["peak_reserved_bytes"]
    # sizes in the trace are the bytes requested, as torch records them: their peak is the live-bytes peak
    assert peaks.peak_requested_bytes == metrics["peak_live_bytes"]
    assert check_snapshot(snap, metrics) == []


def test_snapshot_format_is_what_the_viewer_reads(predicted):
    """Plain types, pickle protocol <= 4, int device, contiguous blocks summing to total_size, requested_size
    with frames, states the viewer knows, addresses under 2**53, alloc/free_requested/free_completed order."""
    _, _, snap, _ = predicted
    raw = pickle.dumps(snap, protocol=4)
    assert pickle.loads(raw) == snap
    for seg in snap["segments"]:
        assert isinstance(seg["device"], int) and seg["address"] < 2**53
        addr = seg["address"]
        for b in seg["blocks"]:
            assert b["address"] == addr and b["state"] in ("active_allocated", "inactive")
            assert "requested_size" in b
            addr += b["size"]
        assert addr == seg["address"] + seg["total_size"]
    trace = snap["device_traces"][0]
    assert {e["action"] for e in trace} >= {"alloc", "free_requested", "free_completed", "segment_alloc"}
    for a, b in zip(trace, trace[1:]):
        if a["action"] == "free_requested":
            assert b["action"] == "free_completed" and b["addr"] == a["addr"]
    assert snap["memprof"]["source"] == "predicted"


def test_frames_name_the_op_and_the_module(predicted):
    _, _, snap, _ = predicted
    frames = [e["frames"] for e in snap["device_traces"][0] if e["action"] == "alloc"]
    where = {f[0]["filename"] for f in frames}
    assert "visual.transformer.resblocks.1.mlp.c_fc" in where
    assert any(f[0]["name"] == "aten.addmm.default" for f in frames)
    assert any("optimizer_state, optimizer step 0" == f[1]["name"] for f in frames)


@pytest.mark.parametrize("corrupt", ["drop_free", "grow_alloc", "drop_segment", "overlap"])
def test_a_corrupted_snapshot_fails_the_check(predicted, corrupt):
    """Negative control: each corruption is caught (wrong peaks, or a trace that contradicts itself)."""
    _, metrics, snap, _ = predicted
    bad = copy.deepcopy(snap)
    trace = bad["device_traces"][0]
    if corrupt == "drop_free":  # a release lost: the peak grows
        i = max((i for i, e in enumerate(trace) if e["action"] == "free_completed"), key=lambda i: trace[i]["size"])
        del trace[i - 1: i + 1]
    elif corrupt == "grow_alloc":  # an allocation recorded 4 MiB larger than it was
        e = next(e for e in trace if e["action"] == "alloc" and e["size"] > MiB)
        e["size"] += 4 * MiB
    elif corrupt == "drop_segment":
        del trace[next(i for i, e in enumerate(trace) if e["action"] == "segment_alloc")]
    else:  # two live blocks at one address
        allocs = [e for e in trace if e["action"] == "alloc"]
        allocs[1]["addr"] = allocs[0]["addr"]
    assert check_snapshot(bad, metrics) != []


def test_trace_peaks_rejects_an_inconsistent_trace():
    fr = []
    snap = {"segments": [], "device_traces": [[
        {"action": "segment_alloc", "addr": BASE_ADDR, "size": 2 * MiB, "stream": 0, "frames": fr},
        {"action": "alloc", "addr": BASE_ADDR, "size": 1000, "stream": 0, "frames": fr},
        {"action": "free_completed", "addr": BASE_ADDR, "size": 1000, "stream": 0, "frames": fr}]]}
    with pytest.raises(SnapshotError, match="without free_requested"):
        trace_peaks(snap)


def test_block_sizes_are_recovered_from_addresses():
    """A hand-made stream: the unsplit 19.5 MiB reuse of a 20 MiB segment counts whole (20 MiB), as the
    allocator model says, and the trace replay recovers it from the addresses alone."""
    a = CachingAllocatorModel(record=True)
    events = [phase("forward", 0), alloc(1, 5 * MiB, "forward", "op"), free(1),
              alloc(2, 19 * MiB + MiB // 2, "forward", "op"), alloc(3, 1000, "forward", "op")]
    for i, ev in enumerate(events):
        a.clock = i
        if ev[0] == ALLOC:
            a.malloc(ev[1], ev[2])
        elif ev[0] == FREE:
            a.free(ev[1])
    snap = build_snapshot(a, events, {1: "activations", 2: "activations", 3: "temporaries"}, {})
    peaks = trace_peaks(snap)
    assert (peaks.peak_allocated_bytes, peaks.peak_reserved_bytes) == (a.peak_allocated, a.peak_reserved)
    assert a.peak_allocated == 20 * MiB + 1024 and a.peak_reserved == 22 * MiB
    assert state_totals(snap) == (a.allocated, a.reserved)


def test_oom_snapshot_ends_in_oom(tmp_path):
    """A budget too small (10 MiB usable): the snapshot is the budget card's replay, which stops at the OOM."""
    status, metrics = with_files(RunSpec("test-vit", "adamw", budget="410MiB"), snapshot_dir=str(tmp_path))
    assert status == "oom"
    snap = load_snapshot(metrics["snapshot_file"])
    last = snap["device_traces"][0][-1]
    assert last["action"] == "oom" and last["size"] == metrics["oom"]["requested_bytes"]
    assert check_snapshot(snap, metrics) == []
    del snap["device_traces"][0][-1]  # negative control: the oom entry lost
    assert check_snapshot(snap, metrics) != []


def test_released_cache_is_a_segment_free():
    """The OOM retry returns entirely free segments (segment_free) before failing; the trace replays it."""
    a = CachingAllocatorModel(capacity=24 * MiB, record=True)
    events = [alloc(1, 5 * MiB, "forward", "op"), free(1), alloc(2, 21 * MiB, "forward", "op")]
    for i, ev in enumerate(events):
        a.clock = i
        a.malloc(ev[1], ev[2]) if ev[0] == ALLOC else a.free(ev[1])
    snap = build_snapshot(a, events, {}, {})
    actions = [e["action"] for e in snap["device_traces"][0]]
    assert actions == ["segment_alloc", "alloc", "free_requested", "free_completed", "segment_free",
                       "segment_alloc", "alloc"]
    peaks = trace_peaks(snap)
    # 20 MiB cached + a 22 MiB segment would pass 24 MiB: the cached segment goes first; the 21 MiB request
    # keeps its whole 22 MiB segment (a 1 MiB remainder is not split off)
    assert (peaks.peak_reserved_bytes, peaks.final_reserved_bytes) == (22 * MiB, 22 * MiB)
    assert peaks.peak_allocated_bytes == a.peak_allocated == 22 * MiB
    assert state_totals(snap) == (22 * MiB, 22 * MiB)


def test_top_modules_at_peak(predicted):
    _, metrics, _, _ = predicted
    top = metrics["top_modules_at_peak"]
    assert len(top) >= 5 and [t["bytes"] for t in top] == sorted((t["bytes"] for t in top), reverse=True)
    assert all(sum(t["categories_bytes"].values()) == t["bytes"] for t in top)
    assert sum(t["bytes"] for t in top) <= metrics["peak_allocated_bytes"]
    names = [t["module"] for t in top]
    assert names[0] == "(cuBLAS workspace)"  # test-vit is tiny: cuBLAS' workspaces dominate
    c_fc = next(t for t in top if t["module"] == "visual.transformer.resblocks.0.mlp.c_fc")
    # AdamW at the optimizer peak: weight + grad + two states of a 32x128 linear (+bias), each rounded to 512 B
    assert set(c_fc["categories_bytes"]) == {"parameters", "gradients", "optimizer_state"}
    assert c_fc["categories_bytes"]["optimizer_state"] == 2 * c_fc["categories_bytes"]["parameters"]


def test_backward_allocations_belong_to_the_module_whose_backward_makes_them():
    """Gradients and backward temporaries are attributed by module; attribution changes no figure."""
    from memprof.budget import parse_budget
    from memprof.simulation.rules import cuda_rules
    from memprof.simulation.tracing import trace

    t = trace(RunSpec("test-vit", "sgd"), cuda_rules(parse_budget("titan-x")))
    phase, made_in = "setup", {}
    for ev in t.events:
        if ev[0] == PHASE:
            phase = ev[1]
        elif ev[0] == ALLOC:
            made_in[ev[1]] = phase
    backward = [sid for sid, p in made_in.items() if p == "backward" and t.category[sid] == "temporaries"]
    assert sum(1 for sid in backward if t.module[sid].startswith("visual.transformer.resblocks.")) > len(backward) / 2
    grads = [sid for sid in made_in if t.category[sid] == "gradients"]
    assert grads and all(t.module[sid] for sid in grads)
    assert not any(t.module[sid].endswith(("ls_1", "ls_2")) for sid in backward)  # identity modules hold nothing


@pytest.mark.gpu
def test_recorded_and_predicted_snapshots_agree_within_the_fidelity_error(tmp_path):
    """On a GPU: the recorded snapshot's trace gives back torch.cuda's measured peaks, the predicted one the
    prediction's, and the two snapshots differ by no more than the fidelity table's error (+0.5 points)."""
    from memprof.backends.cuda import measure

    status, measured = measure(RunSpec("vit-b-16", "sgd-fe", budget="device"), snapshot_dir=str(tmp_path),
                               nvml_period_ms=0)
    _, pred = with_files(RunSpec("vit-b-16", "sgd-fe", budget="h200"), snapshot_dir=str(tmp_path))
    assert status == "ok" and os.path.basename(measured["snapshot_file"]).endswith("@cuda.pickle")
    real = trace_peaks(load_snapshot(measured["snapshot_file"]), strict=False)
    ours = trace_peaks(load_snapshot(pred["snapshot_file"]))
    assert real.peak_reserved_bytes == measured["peak_reserved_bytes"]
    assert abs(real.peak_allocated_bytes - measured["peak_allocated_bytes"]) <= 4096  # blocks made before recording
    for field, got_real, got_ours in (("peak_allocated_bytes", real.peak_allocated_bytes, ours.peak_allocated_bytes),
                                      ("peak_reserved_bytes", real.peak_reserved_bytes, ours.peak_reserved_bytes)):
        fidelity = abs(pred[field] - measured[field]) / measured[field]
        assert abs(got_ours - got_real) / got_real <= fidelity + 0.005, field
