"""`memprof fit`: the search on synthetic peaks (exact answers, with controls), and agreement with direct
predictions at the reported batch (fits) and the next one (does not)."""

import dataclasses

import pytest

from memprof import cli
from memprof.planning.fit import Probe, fit_config, linear_fit, search
from memprof.simulation.simulate import predict
from memprof.spec import RunSpec


def linear(fixed, per, budget, fail=()):
    calls = []

    def probe(b):
        calls.append(b)
        peak = fixed + per * b
        return Probe(b, "oom" if peak > budget or b in fail else "ok", peak)

    return probe, calls


@pytest.mark.parametrize("fixed, per, budget, expect", [
    (100, 10, 1000, 90), (100, 10, 105, None), (0, 1, 1, 1), (500, 7, 10_000, 1357), (100, 1000, 1200, 1),
])
def test_search_finds_the_exact_largest_batch(fixed, per, budget, expect):
    probe, calls = linear(fixed, per, budget)
    result = search(probe, budget)
    assert result.max_batch_size == expect
    if expect:
        assert result.at_max.fits and (expect + 1) in calls and not result.next_up.fits
    assert len(calls) <= 8  # interpolation, not a scan


def test_search_says_when_it_hits_the_bound():
    probe, _ = linear(1, 1, 10**12)
    result = search(probe, 10**12, max_batch_size=300)
    assert result.max_batch_size == 300 and result.capped


def test_peaks_that_are_not_monotone_are_said():
    """Batch 90 (where the interpolation lands) needs far more than its neighbours: the answer stays below it
    and the result says the peaks are not monotone; the linear case (negative control) is monotone."""
    def probe(b):
        peak = 100 + 10 * b + (5000 if b == 90 else 0)
        return Probe(b, "oom" if peak > 1000 else "ok", peak)

    result = search(probe, 1000)
    assert result.max_batch_size == 89 and not result.monotone
    assert search(linear(100, 10, 1000)[0], 1000).monotone


def test_a_broken_probe_stops_the_search_and_says_why():
    def probe(b):
        return Probe(b, "error", None, error="RuntimeError: boom") if b > 2 else Probe(b, "ok", b)

    result = search(probe, 10**9)
    assert result.max_batch_size == 2 and "RuntimeError: boom" in result.failed


def test_linear_fit_by_hand():
    a, b, residual = linear_fit([(1, 12.0), (2, 14.0), (4, 18.0)])
    assert (a, b, residual) == pytest.approx((10.0, 2.0, 0.0))
    assert linear_fit([(1, 5.0)]) is None


def _agrees(spec, budget):
    from memprof.backends.registry import get

    spec = dataclasses.replace(spec, budget=budget)
    status, metrics = fit_config(spec, get("simulate").probe(spec), get("simulate"))
    best = metrics["max_batch_size"]
    assert status == "ok" and best >= 1
    at, _ = predict(dataclasses.replace(spec, budget=budget, batch_size=best))
    above, _ = predict(dataclasses.replace(spec, budget=budget, batch_size=best + 1))
    assert (at, above) == ("ok", "oom")
    return best


def test_fit_agrees_with_direct_predictions_on_the_test_model():
    assert _agrees(RunSpec("test-vit", "adamw"), "500MiB") > 50


@pytest.mark.slow
def test_fit_agrees_with_direct_predictions_on_vit_b16():
    assert 50 < _agrees(RunSpec("vit-b-16", "sgd-fe"), "titan-x") < 200


def test_fit_command_and_its_bad_input(tmp_path, capsys):
    code = cli.main(["fit", "--models", "test-vit", "--optims", "sgd", "--budget", "1GiB", "--backend", "simulate",
                     "--jobs", "1", "--no-progress", "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Largest micro-batch that fits" in out and (tmp_path / "o" / "fit.png").stat().st_size > 0
    for args, expect in ((["--batch-size", "4"], "fit searches the batch size: drop --batch-size 4"),
                         (["--max-batch-size", "0"], "--max-batch-size 0: use at least 1"),
                         (["--backend", "cpu"], "fit probes with the simulation")):
        code = cli.main(["fit", "--models", "test-vit", "--optims", "sgd", *args, "--out", str(tmp_path / "x")])
        _, err = capsys.readouterr()
        assert code == 2 and expect in err and "Traceback" not in err


def test_a_budget_too_small_for_anything_names_what_fits(tmp_path, capsys):
    code = cli.main(["fit", "--models", "test-vit", "--optims", "adamw", "--budget", "401MiB", "--backend",
                     "simulate", "--jobs", "1", "--no-progress", "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and "too small for batch 1 of every configuration" in err and "Traceback" not in err


# --- headroom and what the table shows ---------------------------------------------------------------------

GIB, MIB = 1 << 30, 1 << 20


class _Predicted:
    source = "predicted"


def _synthetic(batch):
    peak = GIB + batch * 100 * MIB
    from memprof.budget import parse_budget

    return {"status": "ok" if peak <= parse_budget("12GiB").usable_bytes else "oom",
            "metrics": {"peak_reserved_bytes": peak}}


def test_headroom_keeps_that_share_of_usable_memory_free():
    from memprof.budget import parse_budget

    usable = parse_budget("12GiB").usable_bytes
    spec = RunSpec("test-vit", "sgd", budget="12GiB")
    _, plain = fit_config(spec, _synthetic, _Predicted())
    _, kept = fit_config(spec, _synthetic, _Predicted(), headroom="10%")
    assert plain["max_batch_size"] == (usable - GIB) // (100 * MIB)
    assert kept["max_batch_size"] == (round(0.9 * usable) - GIB) // (100 * MIB)
    assert kept["next_batch_status"] == "over headroom" and kept["search_headroom_bytes"] == round(0.1 * usable)
    _, sized = fit_config(spec, _synthetic, _Predicted(), headroom="1GiB")
    assert sized["max_batch_size"] == (usable - 2 * GIB) // (100 * MIB)
    _, none_kept = fit_config(spec, _synthetic, _Predicted(), headroom="0%")  # negative control: nothing kept
    assert none_kept["max_batch_size"] == plain["max_batch_size"]


@pytest.mark.parametrize("value, expect", [("5x", "give a share of the card's usable memory (5%) or a size"),
                                           ("60%", "at most half the card's usable memory"),
                                           ("20GiB", "at most half")])
def test_bad_headroom_is_one_line(tmp_path, capsys, value, expect):
    code = cli.main(["fit", "--models", "test-vit", "--optims", "sgd", "--budget", "titan-x", "--headroom", value,
                     "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert code == 2 and expect in err and len(err.strip().splitlines()) == 1, err


def _fit_record(fits: str, notes_long: bool = False) -> dict:
    model = "timm:vit_huge_patch14_clip_224.laion2b_ft_in12k_in1k" if notes_long else "vit-l-14"
    return {"key": f"{model}/sgd/ckpt-off/32bit/bs1/fp32/steps2/rtx4090@simulate#fit", "task": "fit", "status": "ok",
            "source": "predicted", "environment": {"device": "cpu-simulated"},
            "spec": {"model": model, "optim": "sgd", "grad_ckpt": False, "state_bits": 32, "budget": "rtx4090",
                     "precision": "fp32"},
            "metrics": {"max_batch_size": 51, "peak_reserved_bytes": 23.51 * GIB, "peak_reserved_bytes_upper":
                        23.9 * GIB, "fits": fits, "next_batch_status": "oom", "search_budget_bytes": 23.6 * GIB,
                        "search_headroom_bytes": 0, "monotone": not notes_long, "probes": [{}] * 6}}


def test_the_fit_table_shows_may_not_fit_and_the_headroom_that_surely_fits():
    from memprof.reports.planner import render_fit

    for width in (None, 100):
        shown = render_fit([_fit_record("may not fit")], width)
        assert "may not" in shown and "--headroom 2% gives a batch that surely fits" in shown
        calm = render_fit([_fit_record("yes")], width)  # negative control: a band within the card
        assert "| may not" not in calm and "  may not " not in calm and "--headroom 2%" not in calm
        assert "99.6" in calm  # the answer's share of usable memory


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_terminal_fit_table_fits_the_terminal(width):
    from memprof.reports.planner import render_fit

    records = [_fit_record("may not fit", notes_long=False), _fit_record("may not fit", notes_long=True)]
    records[1]["spec"]["model"] = "vit-h-14"
    shown = render_fit(records, width)
    assert max(len(line) for line in shown.splitlines()) <= width, shown
    assert max(len(line) for line in render_fit(records).splitlines()) > width  # the file keeps every column
