"""The implied per-process overhead: X from two records by hand, and records that move X (negative control)."""

import copy
from pathlib import Path

import pytest

from memprof.reports.overhead import implied_overhead, overhead_rows, pct_with, render_overhead
from memprof.results import read_records

DATA = Path(__file__).parent / "data"
GIB = 1 << 30


def records():
    return read_records(str(DATA / "paper_grid.jsonl"))


def _rec(recs, model, optim):
    return next(r for r in recs if r["spec"]["model"] == model and r["spec"]["optim"] == optim
                and r["spec"]["state_bits"] == 32)


def test_x_makes_the_papers_percentage_exact():
    x = implied_overhead(3.0, 2.0, 16)  # (3 + x) / (2 + x) = 1.16  ->  x = (3 - 2.32) / 0.16 = 4.25
    assert x == pytest.approx(4.25)
    assert pct_with(3.0, 2.0, x) == pytest.approx(16)


def test_x_from_two_records_by_hand():
    recs = records()
    a = _rec(recs, "vit-b-16", "adamw")["metrics"]["peak_reserved_bytes"]
    b = _rec(recs, "vit-b-16", "sgd-fe")["metrics"]["peak_reserved_bytes"]
    row = next(r for r in overhead_rows(recs) if (r["model"], r["optim"]) == ("vit-b-16", "sgd-fe"))
    assert row["implied_bytes"] == pytest.approx((a - 1.16 * b) / 0.16)
    assert row["ours_pct"] == pytest.approx(round(100 * (a / b - 1), 1))


def test_a_changed_record_moves_x():
    """Negative control: AdamW's figure 1 GiB larger moves X by 1 GiB / 0.16."""
    recs = records()
    before = next(r for r in overhead_rows(recs) if (r["model"], r["optim"]) == ("vit-b-16", "sgd-fe"))
    moved = copy.deepcopy(recs)
    _rec(moved, "vit-b-16", "adamw")["metrics"]["peak_reserved_bytes"] += GIB
    after = next(r for r in overhead_rows(moved) if (r["model"], r["optim"]) == ("vit-b-16", "sgd-fe"))
    assert after["implied_bytes"] - before["implied_bytes"] == pytest.approx(GIB / 0.16)


def test_vit_h_range_is_where_the_oom_pattern_holds():
    recs = records()
    row = next(r for r in overhead_rows(recs) if r["model"] == "vit-h-14" and r["optim"] == "sgd-fe")
    a = _rec(recs, "vit-h-14", "adamw")["metrics"]["peak_reserved_bytes"]
    fe = _rec(recs, "vit-h-14", "sgd-fe")["metrics"]["peak_reserved_bytes"]
    assert row["x_low_bytes"] == 12 * GIB - a and row["x_high_bytes"] == 12 * GIB - fe
    assert row["consistent"]


def test_one_overhead_for_both_claims_is_judged():
    rows = {(r["model"], r["optim"]): r for r in overhead_rows(records())}
    nomom = rows[("vit-b-16", "sgd-fe-nomom")]
    x = rows[("vit-b-16", "sgd-fe")]["implied_bytes"]
    assert nomom["pct_with_fe_overhead"] == pytest.approx(
        round(pct_with(nomom["adamw_bytes"], nomom["other_bytes"], x), 1))
    text = render_overhead({"today": records()})
    assert "implied X (GiB)" in text and "vit-l-14" in text
