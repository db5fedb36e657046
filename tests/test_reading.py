"""What a person reads (issue 24): the OOM cell names the card and its usable memory; the pictures (Table 4's
bars, the timelines, fit.png) share one palette, keep their legend off the bars, judge the budget on the figure
the table shows, label every bar apart and show a fit's doubt; reports frame only the paper's grid around the
paper; `compare` names the category that grew; a snapshot has an offline view in the HTML report. Each check
has a negative control: the check run on the old (broken) output fails. Rendering only: no prediction runs."""

import copy
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


# --- pictures ---------------------------------------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved while the test runs (kept open to be inspected)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def keep(self, *args, **kwargs):
        saved.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    yield saved
    plt.close("all")


def legend_colors(fig) -> dict:
    """legend label -> facecolor (hex) of every patch or polygon handle in the figure's legends."""
    from matplotlib.colors import to_hex

    out = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            if hasattr(handle, "get_facecolor"):
                out[text.get_text()] = to_hex(handle.get_facecolor())
    return out


def same_category_colors(a: dict, b: dict) -> list:
    """Category labels both figures name whose colours differ (empty: one palette)."""
    from memprof.reports.palette import CATEGORY_COLORS, category_label

    labels = [category_label(c) for c in CATEGORY_COLORS]
    return [lab for lab in labels if lab in a and lab in b and a[lab] != b[lab]] + \
        [lab for lab in labels if lab not in a or lab not in b]


def _timeline_figure(figures, tmp_path):
    from memprof.reports.timeline import plot_timeline

    n = 6
    series = {"x": list(range(n)), "reserved_bytes": [GIB] * n, "phases": [[0, "forward", 1]], "n_events": n,
              "categories_bytes": {c: [1 << 26] * n for c in
                                   ("parameters", "gradients", "optimizer_state", "activations", "temporaries",
                                    "workspace", "communication")}}
    plot_timeline(str(tmp_path / "t.png"), "t", series)
    return figures[-1]


def test_table4_and_timelines_share_one_palette(figures, tmp_path):
    from memprof.reports.table4 import render_plot

    render_plot(paper(), str(tmp_path / "t4.png"))
    table4 = legend_colors(figures[-1])
    timeline = legend_colors(_timeline_figure(figures, tmp_path))
    assert same_category_colors(table4, timeline) == []


def test_palette_check_fails_on_two_palettes(figures, tmp_path):
    """Negative control: main's Table 4 drew its categories in matplotlib's default cycle."""
    from matplotlib.colors import to_hex

    from memprof.reports.palette import category_label
    from memprof.simulation import CATEGORIES

    timeline = legend_colors(_timeline_figure(figures, tmp_path))
    default_cycle = {category_label(c): to_hex(f"C{i}") for i, c in enumerate(CATEGORIES)}
    assert same_category_colors(default_cycle, timeline)


def legend_covers_a_bar(fig) -> bool:
    """Does a legend drawn inside an axes overlap any bar (or a bar's note)?"""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        if not ax.get_window_extent(renderer).overlaps(box):
            continue  # beside the axes
        for artist in list(ax.patches) + list(ax.texts):
            if artist.get_window_extent(renderer).overlaps(box):
                return True
    return False


def test_table4_legend_covers_no_bar(figures, tmp_path):
    from memprof.reports.table4 import render_plot

    for recs in (paper(), [r for r in paper() if r["spec"]["state_bits"] == 32], paper()[:2]):
        render_plot(recs, str(tmp_path / "t4.png"))
        assert not legend_covers_a_bar(figures[-1])


def test_legend_check_fails_on_the_old_placement(figures, tmp_path):
    """Negative control: main's legend, in the lower right corner of the axes, sat on ViT-H/14's OOM bar."""
    from memprof.reports.table4 import render_plot

    render_plot([r for r in paper() if r["spec"]["state_bits"] == 32], str(tmp_path / "t4.png"))
    fig = figures[-1]
    ax = fig.axes[0]
    ax.legend(fontsize=7, loc="lower right")
    assert legend_covers_a_bar(fig)


def bar_ends(fig) -> dict:
    """y tick label -> where that row's bars end (GiB)."""
    ax = fig.axes[0]
    labels = {round(t): lab.get_text() for t, lab in zip(ax.get_yticks(), ax.get_yticklabels())}
    ends = {}
    for p in ax.patches:
        row = labels[round(p.get_y() + p.get_height() / 2)]
        ends[row] = max(ends.get(row, 0), p.get_x() + p.get_width())
    return ends


def test_table4_bars_end_at_the_reserved_figure_and_the_budget_is_usable_memory(figures, tmp_path):
    """The table shows peak reserved; the OOM verdict is reserved past usable memory: a bar ends at peak
    reserved and the budget line stands at the card's usable memory, so the OOM bar is the one that crosses it."""
    from memprof.reports.table4 import render_plot

    recs = [r for r in paper() if r["spec"]["state_bits"] == 32]
    render_plot(recs, str(tmp_path / "t4.png"))
    fig = figures[-1]
    ends = bar_ends(fig)
    assert ends["vit-h-14 · adamw"] == pytest.approx(
        next(r for r in recs if r["key"].startswith("vit-h-14/adamw/"))["metrics"]["peak_reserved_bytes"] / GIB)
    lines = [ln for ln in fig.axes[0].get_lines() if "usable" in ln.get_label()]
    assert len(lines) == 1 and lines[0].get_xdata()[0] == pytest.approx(12 - 400 / 1024)
    crossing = sorted(row for row, end in ends.items() if end > lines[0].get_xdata()[0])
    assert crossing == ["vit-h-14 · adamw"]
    assert "usable (for peak reserved)" in lines[0].get_label() and "titan-x (12 GiB)" in lines[0].get_label()


def test_bar_check_fails_on_allocated_bars_and_the_whole_card(figures, tmp_path):
    """Negative control: main's bars ended at peak allocated and its line stood at the whole 12 GiB."""
    from memprof.reports.table4 import render_plot

    recs = [r for r in paper() if r["spec"]["state_bits"] == 32]
    for r in recs:
        r["metrics"]["peak_reserved_bytes"] = r["metrics"]["peak_allocated_bytes"]  # no cache segment drawn
    render_plot(recs, str(tmp_path / "t4.png"))
    ends = bar_ends(figures[-1])
    assert ends["vit-h-14 · adamw"] != pytest.approx(
        next(r for r in paper() if r["key"].startswith("vit-h-14/adamw/"))["metrics"]["peak_reserved_bytes"] / GIB)


def _precisions():
    """ViT-B/16 AdamW at fp32 and (the same record relabelled) bf16-amp."""
    fp32 = next(r for r in paper() if r["key"].startswith("vit-b-16/adamw/ckpt-off/32bit"))
    bf16 = copy.deepcopy(fp32)
    bf16["spec"]["precision"] = "bf16-amp"
    bf16["key"] = bf16["key"].replace("/fp32/", "/bf16-amp/")
    return [fp32, bf16]


def test_fp32_and_bf16_bars_carry_different_labels():
    from memprof.reports.table4 import plot_labels

    labels, common = plot_labels(_precisions())
    assert sorted(labels) == ["vit-b-16 · adamw · bf16-amp", "vit-b-16 · adamw · fp32"]
    assert "titan-x" in common and "bs1" in common  # what every bar shares is said once, in the title
    # any two configurations the label's slots cannot tell apart carry their keys
    twins = _precisions()[:1] * 2
    twins[1] = copy.deepcopy(twins[0])
    twins[1]["spec"]["freeze"], twins[1]["key"] = "embed", twins[0]["key"] + "+freeze"
    assert len(set(plot_labels(twins)[0])) == 2


def test_label_check_fails_on_the_old_label():
    """Negative control: main's label (model · optim · bsN · [source]) is the same for fp32 and bf16."""
    def old(r):
        s = r["spec"]
        return " · ".join([s["model"], s["optim"], f"bs{s['batch_size']}", f"[{r['source']}]"])

    assert len({old(r) for r in _precisions()}) == 1


def _far_search():
    """A fit whose search ran out to batch 4096 (a small model: still fits at the bound)."""
    far = copy.deepcopy(fits()[0])
    far["metrics"]["probes"].append({"batch_size": 4096, "status": "ok", "peak_reserved_bytes": 20 * GIB})
    far["metrics"]["max_batch_size"], far["metrics"]["capped_at_max_batch_size"] = 4096, True
    return far


def batch_axis_ok(ax) -> bool:
    """The batch axis starts above 0 and labels no batch below 1."""
    low, high = ax.get_xlim()
    return low > 0 and all(t >= 1 for t in ax.get_xticks() if low <= t <= high)


def test_fit_png_starts_at_batch_one_and_shows_may_not_fit(figures, tmp_path):
    from memprof.reports.planner import may_not_fit, plot_fit

    recs = fits()
    assert [may_not_fit(r["metrics"]) for r in recs] == [False, False, False, True]
    plot_fit(recs, str(tmp_path / "fit.png"))
    fig = figures[-1]
    ax, near = fig.axes
    fig.canvas.draw()
    assert batch_axis_ok(ax)
    plot_fit(recs + [_far_search()], str(tmp_path / "fit.png"))
    figures[-1].canvas.draw()
    assert batch_axis_ok(figures[-1].axes[0])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("may not fit" in lab for lab in labels) == 2  # SGD's line, and the key
    assert "rtx4090 (24 GiB): 23.61 GiB usable" in labels
    assert [t.get_text() for t in near.get_yticklabels()][-1] == "vit-l-14/sgd @ 51 (may not fit)"
    assert "1 of 4 answers may not fit" in ax.get_title()
    # the record's own field wins where it has one (a bool fits with may_not_fit beside it)
    assert may_not_fit({"fits": True, "may_not_fit": True}) and not may_not_fit({"fits": True, "may_not_fit": False})


def test_fit_png_check_fails_on_the_old_axis():
    """Negative control: main's axis (symlog, linear below 8) ran to negative batch sizes."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    for r in fits() + [_far_search()]:
        probes = r["metrics"]["probes"]
        ax.plot([p["batch_size"] for p in probes], [p["peak_reserved_bytes"] / GIB for p in probes], marker=".")
    ax.set_xscale("symlog", linthresh=8)
    fig.canvas.draw()
    assert not batch_axis_ok(ax)
    plt.close(fig)


# --- the paper's framing belongs to the paper's grid ---------------------------------------------------------

PAPER_FRAMING = ("Table 4", "how much more memory AdamW needs", "AdamW +", "AdamW OOM", "micro-batch",
                 "The paper's claims", "implied", "agrees", "differs")


def paper_framing_in(text: str) -> list:
    """The phrases of the paper's framing found in a report."""
    return [p for p in PAPER_FRAMING if p in text]


def user_grid():
    """A user's grid: ViT-B/16 and a model of their own (ViT-B/16's records relabelled), AdamW and SGD variants."""
    recs = [r for r in paper() if r["spec"]["model"] == "vit-b-16" and r["spec"]["state_bits"] == 32]
    mine = copy.deepcopy(recs)
    for r in mine:
        r["spec"]["model"], r["key"] = "my-vit", r["key"].replace("vit-b-16/", "my-vit/")
    return recs + mine


def test_a_users_grid_gets_a_plain_table_of_its_own_axes():
    from memprof.reports.table4 import render_markdown, render_terminal

    for text in (render_markdown(user_grid()), render_terminal(user_grid(), "reserved", None, 100)):
        assert paper_framing_in(text) == [], text
        assert "batch size 1" in text and "my-vit" in text and "1.85 GiB" in text
    assert render_markdown(user_grid()).startswith("# Peak memory per optimizer and model")


def test_the_paper_grid_keeps_the_papers_framing():
    """The same check finds the framing where it belongs (and so fails on a report that frames any grid)."""
    from memprof.reports.table4 import render_markdown

    assert paper_framing_in(render_markdown(paper())) == list(PAPER_FRAMING)
    # a subset of the paper's grid (its models and optimizers at micro-batch 1) is still the paper's
    sub = [r for r in paper() if r["spec"]["model"] == "vit-b-16"]
    assert "The paper's claims" in render_markdown(sub) and "AdamW +" in render_markdown(sub)


def test_the_framing_check_fails_on_mains_report_of_a_users_grid():
    """Negative control: main's rendering of the user's grid, as it read (micro-batch header, AdamW columns)."""
    old = ("# Table 4: peak memory per optimizer and model\n\n## micro-batch 1, fp32, gradient checkpointing off, "
           "budget titan-x: predicted (cpu-simulated)\n| SGD | 1.14 GiB, AdamW +62% | 1.14 GiB, AdamW +62% |")
    assert paper_framing_in(old)


def test_a_fit_report_is_not_framed_as_table4(tmp_path):
    """A fit's records say batch 1 in their spec but hold the figures at the largest batch that fits: no Table
    4 of them, no implied overhead (main printed 'implied X = -23.52 GiB'); the HTML report shows fit.md and
    fit.png."""
    import shutil

    from memprof.reports.html import render_html
    from memprof.reports.planner import write_fit_reports
    from memprof.reports.table4 import render_markdown, table_rows

    from memprof.reports.table4 import render_terminal

    assert table_rows(fits()) == [] and "implied" not in render_markdown(fits())
    assert render_terminal(fits(), "reserved", None, 100).startswith("No run records here")
    shutil.copy(DATA / "fit_vit_l14_rtx4090.jsonl", tmp_path / "results.jsonl")
    write_fit_reports(fits(), str(tmp_path))
    page = render_html(str(tmp_path), str(tmp_path / "report.html"), write_pngs=False)
    # (fit.md's own "largest micro-batch that fits" is a fit's term, not the paper's framing)
    assert paper_framing_in(page.replace("micro-batch that fits", "")) == [] and "Largest micro-batch that fits" in page
    assert page.count("data:image/png;base64,") == 1  # fit.png (no timelines were recorded)


def test_claims_columns_are_distinct_on_every_metric():
    """The paper-2022 preset tables nvml-process: its two figure columns were both 'ours (nvml-process)'."""
    from memprof.reports.table4 import METRICS, claim_headers, render_markdown

    for metric in METRICS:
        headers = claim_headers(metric)
        assert len(set(headers)) == len(headers), headers
    md = render_markdown(paper(), "nvml-process")
    assert "ours: NVML process peak" in md and "ours: peak reserved" in md


def test_column_check_fails_on_mains_headers():
    """Negative control: main's headers for the nvml-process metric."""
    metric = "nvml-process"
    old = ["setup", "model", "paper", f"ours ({metric})", "ours (nvml-process)", "verdict"]
    assert len(set(old)) != len(old)


# --- compare names the category that grew ------------------------------------------------------------------

def _grown(category="activations", by=300 << 20):
    """The paper grid, and the same with ViT-B/16 SGD (freeze-embed) holding `by` more bytes of `category` at
    its peak (allocated and reserved grow with it)."""
    old, new = paper(), paper()
    rec = next(r for r in new if r["key"].startswith("vit-b-16/sgd-fe/ckpt-off/32bit"))
    m = rec["metrics"]
    m["breakdown_at_peak_bytes"][category] += by
    m["peak_allocated_bytes"] += by
    m["peak_reserved_bytes"] += by
    return old, new, rec["key"]


def names_category(line: str, category: str, gib: float) -> bool:
    return f"{category} grew most, +{gib:.2f} GiB" in line and "GiB (+" in line


@pytest.mark.parametrize("category", ["activations", "optimizer_state"])
def test_compare_says_which_category_grew_in_gib_and_percent(category):
    from memprof.baseline import DEFAULT_FAIL, compare, make_baseline, parse_threshold

    old, new, key = _grown(category)
    result = compare(make_baseline(old), make_baseline(new), [parse_threshold(t) for t in DEFAULT_FAIL])
    lines = [r for r in result.regressions if r.startswith(key + ": peak_reserved")]
    assert len(lines) == 1, result.regressions
    line = lines[0]
    label = category.replace("_", " ")
    assert names_category(line, label, 300 / 1024), line
    base = next(r for r in old if r["key"] == key)["metrics"]
    pct = 100 * (300 << 20) / base["breakdown_at_peak_bytes"][category]
    assert f"{label} grew most, +0.29 GiB ({pct:+.1f}%)" in line
    grown = 100 * (300 << 20) / base["peak_reserved_bytes"]
    assert f"grew by 0.29 GiB ({grown:+.1f}%)" in line


def test_compare_says_when_categories_are_unknown():
    """A baseline saved without breakdowns (as main saved them, e.g. reports/baselines/ci.json): said, not
    guessed."""
    from memprof.baseline import BREAKDOWN, compare, make_baseline, parse_threshold

    old, new, key = _grown()
    base = make_baseline(old)
    for e in base["benchmarks"]:
        e.pop(BREAKDOWN, None)
    line = compare(base, make_baseline(new), [parse_threshold("peak_reserved:0%")]).regressions[0]
    assert "by category: unknown, no breakdown at the peak in the baseline" in line


def test_category_check_fails_on_mains_message():
    """Negative control: main's line, raw bytes only."""
    old, new, key = _grown()
    b = next(r for r in old if r["key"] == key)["metrics"]["peak_reserved_bytes"]
    main_line = f"{key}: peak_reserved grew: {b} -> {b + (300 << 20)} (+25.29%), past 0%"
    assert not names_category(main_line, "activations", 300 / 1024)


# --- an offline view of a snapshot ---------------------------------------------------------------------------

MIB = 1 << 20


def _tiny_snapshot():
    """A 2 MiB segment; 1 MiB of activations, then 0.5 MiB of optimizer state (the peak, 1.5 MiB); the
    activations freed."""
    from memprof.reports.snapshot import BASE_ADDR

    def frames(cat):
        return [{"filename": "visual.block", "line": 0, "name": "aten.mm.default"},
                {"filename": "memprof (predicted)", "line": 1, "name": f"{cat}, forward step 1"}]

    a = BASE_ADDR
    trace = [{"action": "segment_alloc", "addr": a, "size": 2 * MIB, "frames": []},
             {"action": "alloc", "addr": a, "size": MIB, "frames": frames("activations")},
             {"action": "alloc", "addr": a + MIB, "size": MIB // 2, "frames": frames("optimizer_state")},
             {"action": "free_requested", "addr": a, "size": MIB, "frames": []},
             {"action": "free_completed", "addr": a, "size": MIB, "frames": []}]
    for i, e in enumerate(trace):
        e.update(stream=0, time_us=i)
    return {"segments": [], "device_traces": [trace]}


def offline_view_in(page: str) -> bool:
    """A snapshot view a browser draws offline: inline SVG blocks, a table of blocks, nothing loaded."""
    return ("<svg" in page and "<rect" in page and "<th>requested</th>" in page and "<script" not in page
            and "src='http" not in page)


def test_a_snapshot_has_an_offline_view(tmp_path):
    import pickle

    from memprof.reports.html import snapshot_view
    from memprof.reports.palette import CATEGORY_COLORS
    from memprof.reports.snapshot import peak_view

    snap = _tiny_snapshot()
    view = peak_view(snap)
    assert (view.entry, view.allocated_bytes, view.reserved_bytes) == (2, 3 * MIB // 2, 2 * MIB)
    assert [size for _a, size, _f in view.blocks] == [MIB, MIB // 2]
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    page = snapshot_view(str(path))
    assert offline_view_in(page)
    assert "1.5 MiB allocated in 2 blocks, 2.0 MiB reserved in 1 segment" in page
    assert CATEGORY_COLORS["activations"] in page and CATEGORY_COLORS["optimizer_state"] in page
    assert "https://pytorch.org/memory_viz" not in page  # the view itself needs no viewer
    assert "Offline view of the <span class='pred'>predicted</span> snapshot" in page  # labelled predicted
    assert "<span class='meas'>measured</span>" in snapshot_view(str(path), "measured")


def test_offline_view_check_fails_on_mains_links():
    """Negative control: main's report gave links and the viewer's address only."""
    main_html = ("<ul class='note'><li><span class='pred'>predicted</span> snapshot: <a href='s.pickle'>s.pickle</a>"
                 "</li></ul><p class='note'>Open a snapshot in <a href='https://pytorch.org/memory_viz'>"
                 "https://pytorch.org/memory_viz</a> (drop the file on the page)</p>")
    assert not offline_view_in(main_html)


def test_the_committed_baseline_can_say_which_category_grew():
    """reports/baselines/ci.json keeps each configuration's breakdown at the peak (added from a fresh CI run
    whose peaks equal the baseline's), so a gate failure against it names the category."""
    from memprof.baseline import BREAKDOWN, load_any

    base = load_any(str(Path(__file__).resolve().parents[1] / "reports" / "baselines" / "ci.json"))
    ran = [e for e in base["benchmarks"] if e["status"] in ("ok", "oom")]
    assert ran and all(e.get(BREAKDOWN) for e in ran)


def test_fit_png_keeps_usable_memory_under_headroom(figures, tmp_path):
    """With --headroom (main's search_headroom_bytes) the search budget is usable memory minus the headroom:
    the usable line stays at the card's usable memory, the headroom's line is drawn apart (main's plot would
    have called the reduced budget 'usable')."""
    from memprof.reports.planner import plot_fit

    recs = fits()
    for r in recs:
        m = r["metrics"]
        m["search_headroom_bytes"] = int(0.05 * m["search_budget_bytes"])
        m["search_budget_bytes"] -= m["search_headroom_bytes"]
    plot_fit(recs, str(tmp_path / "fit.png"))
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert "rtx4090 (24 GiB): 23.61 GiB usable" in labels
    assert any(lab.startswith("usable minus --headroom 1.18 GiB: 22.43 GiB") for lab in labels)
