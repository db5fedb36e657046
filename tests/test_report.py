"""Report rendering against a golden file, and the cells that must say what they are."""

import csv
import io
import json
import os
from pathlib import Path

from memprof.reports.table4 import render_csv, render_json, render_markdown, table_rows, write_reports
from memprof.results import read_records as load

DATA = Path(__file__).parent / "data"


def records():
    return load(str(DATA / "paper_grid.jsonl"))


def test_markdown_matches_golden():
    """After an intended rendering change, regenerate the golden file as tests/data/README.md says."""
    assert render_markdown(records()) == (DATA / "table4.golden.md").read_text()


def test_golden_catches_a_changed_figure():
    """Negative control: one record's peak changed by 1% changes the rendered table."""
    recs = records()
    rec = next(r for r in recs if r["key"].startswith("vit-b-16/sgd-fe/"))
    rec["metrics"]["peak_reserved_bytes"] = int(rec["metrics"]["peak_reserved_bytes"] * 1.01)
    assert render_markdown(recs) != (DATA / "table4.golden.md").read_text()


def test_every_figure_is_labelled_predicted():
    md = render_markdown(records())
    assert "predicted (cpu-simulated)" in md
    assert "OOM (predicted)" in md  # ViT-H/14 AdamW at 12 GB


def test_report_states_bytes_per_parameter_and_the_8bit_check():
    md = render_markdown(records())
    assert "| AdamW, 8-bit states" in md and "Bytes per trainable parameter" in md
    assert md.count("below fp32 SGD with momentum") == 3 and "NOT below" not in md


def test_percentages_are_adamw_over_the_row():
    rows = {(r["model"], r["optim"]): r for r in table_rows(records(), "allocated") if r["state_bits"] == 32}
    adamw = rows[("vit-b-16", "adamw")]["allocated_bytes"]
    fe = rows[("vit-b-16", "sgd-fe")]["allocated_bytes"]
    assert rows[("vit-b-16", "sgd-fe")]["adamw_extra_pct"] == round(100 * (adamw / fe - 1), 1)


def test_csv_and_json_carry_raw_numbers():
    rows = list(csv.DictReader(io.StringIO(render_csv(records()))))
    assert len(rows) == 24 and {"reserved_bytes", "adamw_extra_pct", "source", "state_bits"} <= set(rows[0])
    data = json.loads(render_json(records()))
    assert data["metric"] == "reserved" and len(data["rows"]) == 24  # 3 models x 4 methods x 32/8-bit


def test_write_reports_writes_all_formats(tmp_path):
    paths = write_reports(records(), str(tmp_path))
    assert sorted(paths) == ["csv", "json", "md", "png"]
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rule_descriptions_are_read_without_torch():
    """Reports name the rules from the rules' source text: the same summaries and sources as the classes, and
    rendering Table 4 imports no torch (a subprocess: this one has torch already)."""
    import subprocess
    import sys

    from memprof.simulation import rule_descriptions
    from memprof.simulation.rules import RULES

    described = rule_descriptions()
    assert {n: described[n] for n in RULES} == {n: (c.summary, c.source) for n, c in RULES.items()}
    assert described["ddp-gradient-buckets"][0] == "DistributedDataParallel's gradient buckets (see the module docstring)."
    code = ("import sys; from memprof.reports.table4 import render_markdown; from memprof.results import read_records; "
            f"render_markdown(read_records({str(DATA / 'paper_grid.jsonl')!r})); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False", r.stderr
