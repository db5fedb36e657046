"""What a person reads (issue 24): the OOM cell names the card and its usable memory; the pictures (Table 4's
bars, the timelines, fit.png) share one palette, keep their legend off the bars, judge the budget on the figure
the table shows, label every bar apart and show a fit's doubt; reports frame only the paper's grid around the
paper; `compare` names the category that grew; a snapshot has an offline view in the HTML report. Each check
has a negative control: the check run on the old (broken) output fails. Rendering only: no prediction runs."""

import copy
import json
from pathlib import Path

import pytest

from memprof.results import read_records as load

DATA = Path(__file__).parent / "data"
GIB = 1 << 30


def paper():
    return load(str(DATA / "paper_grid.jsonl"))


def fits():
    return load(str(DATA / "fit_vit_l14_rtx4090.jsonl"))


def _cell(records, metric="reserved", model="vit-h-14", optim="adamw"):
    from memprof.reports.table4 import _cell as cell, table_rows

    row = next(r for r in table_rows(records, metric)
               if (r["model"], r["optim"], r["state_bits"]) == (model, optim, 32))
    return cell(row, metric)


# --- the OOM cell -----------------------------------------------------------------------------------------

def names_card_and_usable(cell: str, card: str, usable_gib: float) -> bool:
    return f"usable on {card}" in cell and f"of {usable_gib:.2f} GiB" in cell and " over" not in cell


def test_oom_cell_says_usable_memory_and_the_card():
    cell = _cell(paper())
    assert cell.startswith("OOM (predicted): needs 12.39 GiB")
    assert names_card_and_usable(cell, "titan-x (12 GiB)", 12 - 400 / 1024), cell
    # the NVML view is judged against the whole card, the context included; other metrics name reserved
    assert _cell(paper(), "nvml-process") == "OOM (predicted): needs 12.79 GiB of titan-x (12 GiB), CUDA context included"
    assert "reserved 12.39 GiB of 11.61 GiB usable on titan-x (12 GiB)" in _cell(paper(), "allocated")


def test_oom_cell_reads_the_card_from_the_record():
    """The card and its usable memory come from the record (here edited to a 16 GiB card with a measured 500 MiB
    context), not from a constant."""
    recs = paper()
    rec = next(r for r in recs if r["key"].startswith("vit-h-14/adamw/ckpt-off/32bit"))
    rec["spec"]["budget"], rec["metrics"]["budget_bytes"] = "16GiB", 16 * GIB
    rec["metrics"]["context_bytes"] = 500 << 20
    assert names_card_and_usable(_cell(recs), "a 16 GiB card", 16 - 500 / 1024)


def test_oom_cell_check_fails_on_the_old_cell():
    """Negative control: main's cell ("needs 12.42 GiB, 0.81 GiB over") names neither card nor usable memory."""
    assert not names_card_and_usable("OOM (predicted): needs 12.42 GiB, 0.81 GiB over", "titan-x (12 GiB)", 11.61)
