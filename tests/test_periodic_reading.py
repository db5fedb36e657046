"""What a 15 s NVML sampler (the paper's W&B system metrics) would have recorded, from a 5 ms series."""

from memprof.backends.nvml import periodic_reading

MB = 1 << 20


def series(values_by_ms):
    return [[t, b, b] for t, b in values_by_ms]


def test_a_short_spike_is_usually_missed():
    """A 40 s run at 1 GB with a 0.5 s spike to 2 GB: one reading in 15 s rarely lands on the spike."""
    s = series([(t, 2000 * MB if 20_000 <= t < 20_500 else 1000 * MB) for t in range(0, 40_001, 5)])
    r = periodic_reading(s)
    assert r["peak_bytes"] == 2000 * MB and r["lowest_recorded_bytes"] == 1000 * MB
    assert r["readings_at_most"] == 3 and abs(r["share_of_time_near_peak"] - 0.5 / 40) < 1e-3


def test_a_plateau_at_the_peak_is_always_caught():
    """Negative control: memory at its peak the whole time; every phase of the sampler records the peak."""
    s = series([(t, 1500 * MB) for t in range(0, 40_001, 5)])
    r = periodic_reading(s)
    assert r["lowest_recorded_bytes"] == r["peak_bytes"] == 1500 * MB and r["share_of_time_near_peak"] == 1.0


def test_a_run_shorter_than_the_period_may_get_no_reading():
    s = series([(t, 1000 * MB) for t in range(0, 3_001, 5)])
    r = periodic_reading(s)
    assert r["readings_at_most"] == 1 and 0.75 < r["share_of_phases_with_no_reading"] < 0.85
    assert periodic_reading([[0, 5, 5]]) is None


def test_the_report_shows_it_for_measured_records_only():
    from memprof.reports.table4 import render_sampler_effect

    s = series([(t, 1000 * MB) for t in range(0, 20_001, 5)])
    rec = {"key": "k", "source": "measured", "metrics": {"nvml_15s_sampler": periodic_reading(s)}}
    assert "What a 15 s sampler would have recorded" in render_sampler_effect([rec])
    assert render_sampler_effect([{**rec, "source": "predicted"}]) == ""
