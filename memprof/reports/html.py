"""One self-contained HTML report of a run directory: `memprof report RUN_DIR [-o report.html]`.

It holds Table 4 with everything table4.md says (the paper beside ours, the one-view table, the largest
holders at the peak, the rules), the fidelity table when the records (or a paired run) hold both
measurements and predictions (else a fidelity.md found in the directory), fit.md / advise.md when present,
each configuration's timeline (memprof.reports.timeline), links to its snapshots and an offline view of each
(snapshot_view: its reserved memory at the peak as inline SVG, its largest blocks; torch's memory_viz needs the
network). Images are embedded as base64 PNG; the page loads nothing (no script, no stylesheet, no font from a
network), so it opens offline.
Timeline PNGs are also written beside their JSON in RUN_DIR/timelines/.
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import os
import re
from collections import OrderedDict

from memprof.vocabulary import Source

REPORT_FILE = "report.html"
EXTRA_FILES = (("fit.md", "What fits"), ("advise.md", "Advice"))
VIEWER_URL = "https://pytorch.org/memory_viz"

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1500px;padding:0 16px;color:#222}
h1{font-size:24px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:34px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:12.5px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}code{background:#f3f3f3;padding:0 3px;border-radius:3px}
img{max-width:100%;border:1px solid #ddd}.fig{margin:10px 0 26px}.note{color:#555;font-size:12.5px}
.snapview{margin:6px 0 12px}.snapview svg{display:block;margin:6px 0}
.pred{color:#1f5fa8;font-weight:600}.meas{color:#a8521f;font-weight:600}nav li{margin:1px 0}
"""


# --- markdown (the subset memprof's renderers write) -------------------------------------------------

def _inline(text: str) -> str:
    out = html.escape(text.replace("\\*", "*"), quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"(https?://[^\s)<]+)", r'<a href="\1">\1</a>', out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    head, body = _cells(lines[0]), [_cells(ln) for ln in lines[2:]]
    th = "".join(f"<th>{_inline(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>"


def markdown_to_html(text: str, shift: int = 0) -> str:
    """Headings (shifted down `shift` levels), pipe tables, '- ' lists and paragraphs; inline code, bold,
    escaped stars and bare links. Everything else is escaped text."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = min(6, len(line) - len(line.lstrip("#")) + shift)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|"):
            j = i
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            block = lines[i:j]
            out.append(_table(block) if len(block) >= 2 and set(block[1].replace("|", "").strip()) <= set("-: ")
                       else "<p>" + "<br>".join(_inline(b) for b in block) + "</p>")
            i = j
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "- ", "|")):
                para.append(_inline(lines[i]))
                i += 1
            out.append("<p>" + "<br>".join(para) + "</p>")
    return "\n".join(out)


# --- figures -----------------------------------------------------------------------------------------

def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _timeline_png(config: str, pred: tuple | None, meas: tuple | None) -> tuple[bytes, list[str]]:
    """The figure for one configuration (PNG bytes) and notes on what it shows."""
    from memprof.reports.snapshot import load_snapshot
    from memprof.reports.timeline import load_timeline, measured_series, plot_timeline

    notes, predicted, measured, measured_peaks = [], None, None, None
    if pred is not None:
        rec, base = pred
        path = os.path.join(base, rec["metrics"]["timeline_file"])
        if os.path.exists(path):
            try:
                predicted = load_timeline(path)
                if not isinstance(predicted, dict):
                    raise ValueError(f"a JSON {type(predicted).__name__}, not a timeline")
            except (OSError, ValueError) as exc:  # truncated or edited: the report goes on without it
                predicted = None
                notes.append(f"predicted timeline {path} is unreadable ({exc}); rerun the configuration to redraw it")
        else:
            notes.append(f"predicted timeline {path} is missing")
    if meas is not None:
        rec, _base = meas
        snap = rec["metrics"].get("snapshot_file")
        if snap and os.path.exists(snap):
            measured = measured_series(load_snapshot(snap), predicted["alloc_x"] if predicted else None)
        else:
            measured_peaks = rec["metrics"]
    sources = " and ".join(s for s, x in (("predicted", predicted), ("measured", meas)) if x is not None)
    title = f"{config}\n{sources}" + (f", budget {predicted['budget']['device']}"
                                        if predicted and predicted.get("budget") else "")
    buf = io.BytesIO()
    try:
        plot_timeline(buf, title, predicted, measured, measured_peaks)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # valid JSON, but not what memprof writes
        if predicted is None:
            raise
        notes.append(f"predicted timeline {path} is not one memprof wrote ({type(exc).__name__}: {exc}); rerun the "
                     f"configuration to redraw it")
        buf = io.BytesIO()
        plot_timeline(buf, config, None, measured, measured_peaks)
    return buf.getvalue(), notes


def _holders_html(rec: dict) -> str:
    holders = rec["metrics"].get("top_modules_at_peak") or []
    if not holders:
        return ""
    from memprof.budget import format_size

    items = "".join(f"<li><code>{html.escape(h['module'])}</code> {format_size(h['bytes'])}</li>" for h in holders[:5])
    return f"<p class='note'>Largest holders at the predicted peak:</p><ol class='note'>{items}</ol>"


SNAPSHOT_ROWS_MIN, SNAPSHOT_ROWS_MAX = 4, 30  # the snapshot map's rows: all reserved memory folded into them
SNAPSHOT_BLOCKS_LISTED = 10


def snapshot_view(path: str, source: str = "predicted") -> str:
    """An offline view of one snapshot at its peak of allocated bytes (memprof.reports.snapshot.peak_view):
    an inline SVG of the live segments, each a row as wide as its size, its blocks coloured by category (the
    palette of every memprof picture), and a table of the largest blocks with what made them. HTML and SVG
    only: no script, nothing fetched."""
    from memprof.budget import format_size
    from memprof.reports.palette import CACHE_COLOR, CATEGORY_COLORS, category_label
    from memprof.reports.snapshot import frame_category, load_snapshot, peak_view

    try:
        view = peak_view(load_snapshot(path))
    except Exception as exc:  # a snapshot memprof cannot read: the report goes on, saying so
        return f"<p class='note'>No offline view of {html.escape(os.path.basename(path))}: {html.escape(str(exc))}</p>"
    if view.entry < 0:
        return "<p class='note'>This snapshot's trace is empty: nothing to show at a peak.</p>"
    # every segment, end to end (largest first) in one address space folded into rows of equal bytes: a map
    # of all reserved memory, each block where it sits in its segment
    segs = view.segments
    total = sum(size for _, size in segs) or 1
    widest = max(size for _, size in segs) if segs else 1
    n_rows = min(SNAPSHOT_ROWS_MAX, max(SNAPSHOT_ROWS_MIN, -(-total // widest)))
    per_row = -(-total // n_rows)
    width, row, gap = 900, 14, 3
    offset, place = 0, {}
    for addr, size in segs:
        place[addr] = offset
        offset += size
    starts = sorted(place)
    size_of = dict(segs)

    def pieces(pos: int, length: int) -> list:
        out = []
        while length > 0:
            r, x = divmod(pos, per_row)
            take = min(length, per_row - x)
            out.append((r, width * x / per_row, width * take / per_row))
            pos, length = pos + take, length - take
        return out

    def rect(pos, length, fill, tip, extra="", least=0.6):
        return "".join(f"<rect x='{x:.1f}' y='{r * (row + gap)}' width='{max(least, w):.1f}' height='{row}' "
                       f"fill='{fill}'{extra}><title>{tip}</title></rect>" for r, x, w in pieces(pos, length))

    rects, cats = [], {}
    for addr, size in segs:
        rects.append(rect(place[addr], size, CACHE_COLOR, f"segment {format_size(size)} (grey: reserved, not allocated)",
                          " stroke='#fff' stroke-width='1'", least=1.0))
    for addr, nbytes, frames in view.blocks:
        cat = frame_category(frames)
        cats[cat] = cats.get(cat, 0) + nbytes
        j = bisect.bisect_right(starts, addr) - 1
        if j < 0 or addr >= starts[j] + size_of[starts[j]]:
            continue  # (a block outside every live segment: not in a trace memprof reads)
        tip = html.escape(f"{format_size(nbytes)} {frames[0]['name'] if frames else ''} "
                          f"{frames[0]['filename'] if frames else ''}".strip())
        rects.append(rect(place[starts[j]] + addr - starts[j], nbytes, CATEGORY_COLORS.get(cat, "#8c8cc8"), tip))
    height = n_rows * (row + gap)
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='reserved memory at the peak'>{''.join(rects)}</svg>")
    more = (f"<p class='note'>Each row is {format_size(per_row)} of the {format_size(total)} reserved; segments "
            f"(largest first, white edges) run end to end across rows.</p>")
    legend = " ".join(f"<span style='display:inline-block;width:10px;height:10px;background:"
                      f"{CATEGORY_COLORS.get(c, '#8c8cc8')}'></span> {html.escape(category_label(c) if c else 'unknown')} "
                      f"{format_size(b)}" for c, b in sorted(cats.items(), key=lambda kv: -kv[1]))
    rows = "".join(
        f"<tr><td>{format_size(nbytes)}</td><td>{html.escape(category_label(frame_category(fr)) if frame_category(fr) else '')}"
        f"</td><td><code>{html.escape(fr[0]['name'] if fr else '')}</code></td><td><code>"
        f"{html.escape(fr[0]['filename'] if fr else '')}</code></td><td>{html.escape(fr[1]['name'] if len(fr) > 1 else '')}"
        f"</td></tr>" for _addr, nbytes, fr in view.blocks[:SNAPSHOT_BLOCKS_LISTED])
    cls = "pred" if source == "predicted" else "meas"
    return (f"<details class='snapview' open><summary>Offline view of the <span class='{cls}'>{html.escape(source)}</span> "
            f"snapshot <code>{html.escape(os.path.basename(path))}</code> at its "
            f"peak (drawn here from the file: no viewer, no network)</summary>"
            f"<p class='note'>At trace entry {view.entry + 1} of {view.entries}: {format_size(view.allocated_bytes)} "
            f"allocated in {len(view.blocks)} block{'s' if len(view.blocks) != 1 else ''}, "
            f"{format_size(view.reserved_bytes)} reserved in {len(view.segments)} "
            f"segment{'s' if len(view.segments) != 1 else ''}" + (" (blocks live before the recording began are not listed)"
                                                  if view.before_recording else "")
            + f". A coloured block is allocated (the bytes requested, where they sit in their segment), grey is "
            f"reserved but free. Requested bytes by category: {legend}.</p>{svg}{more}"
            f"<table><thead><tr><th>requested</th><th>category</th><th>op</th><th>module</th><th>when</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></details>")


def _snapshot_links(recs: list[tuple], out_dir: str) -> str:
    links, views = [], []
    for rec, _base in recs:
        path = rec["metrics"].get("snapshot_file")
        if not path:
            continue
        if os.path.exists(path):
            views.append(snapshot_view(path, rec["source"]))
        rel = os.path.relpath(path, out_dir) if os.path.exists(path) else path
        cls, what = ("pred", "predicted") if rec.source == Source.PREDICTED else ("meas", "measured")
        links.append(f"<li><span class='{cls}'>{what}</span> snapshot: <a href='{html.escape(rel)}'>"
                     f"{html.escape(os.path.basename(path))}</a>" + ("" if os.path.exists(path) else " (missing)")
                     + "</li>")
    if not links:
        return ""
    return ("<ul class='note'>" + "".join(links) + "</ul>" + "".join(views)
            + f"<p class='note'>Offline, the view above is drawn from the snapshot itself. For torch's full viewer "
            f"(every allocation over time, stacks), open <a href='{VIEWER_URL}'>{VIEWER_URL}</a> in a browser with a "
            "network connection and drop the file on the page (it stays on your machine); <code>python -m "
            "torch.cuda._memory_viz trace_plot FILE -o trace.html</code> writes a page that also loads the viewer "
            "from the network, so it shows nothing offline.</p>")


# --- the page ----------------------------------------------------------------------------------------

def _load(run_dir: str, pair_dir: str | None) -> list[tuple]:
    from memprof.results import read_records

    out = [(r, run_dir) for r in read_records(run_dir)]
    if pair_dir:
        out += [(r, pair_dir) for r in read_records(pair_dir)]
    return out


def render_html(run_dir: str, out_path: str, pair_dir: str | None = None, write_pngs: bool = True,
                max_timelines: int | None = None) -> str:
    """The report's HTML text (see the module docstring)."""
    from memprof.results import load_verdicts
    from memprof.reports.fidelity import render_fidelity
    from memprof.reports.table4 import default_metric, paper_settings, render_markdown, run_records

    loaded = _load(run_dir, pair_dir)
    records = [r for r, _ in loaded]
    out_dir = os.path.dirname(os.path.abspath(out_path))
    metric = default_metric(records)
    runs = run_records(records)  # a fit's records are reported in its own section (fit.md), not as Table 4
    sections = [("table4", "Table 4 and what it rests on" if paper_settings(runs) else "Peak memory and what it rests on",
                 markdown_to_html(render_markdown(runs, metric, load_verdicts(run_dir) or None), shift=1))] if runs else []
    measured = [r for r in records if r.source == Source.MEASURED]
    predicted = [r for r in records if r.source == Source.PREDICTED]
    if measured and predicted:
        sections.append(("fidelity", "Fidelity", markdown_to_html(render_fidelity(measured, predicted), shift=1)))
    elif os.path.exists(os.path.join(run_dir, "fidelity.md")):
        with open(os.path.join(run_dir, "fidelity.md"), encoding="utf-8") as fh:
            sections.append(("fidelity", "Fidelity", markdown_to_html(fh.read(), shift=1)))
    for name, title in EXTRA_FILES:
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                content = markdown_to_html(fh.read(), shift=1)
            png = os.path.splitext(path)[0] + ".png"
            if os.path.exists(png):  # fit.png: the probes against the budget, each answer's headroom
                with open(png, "rb") as fh:
                    content += (f"<div class='fig'><img alt='{html.escape(title)}' src='{_png_uri(fh.read())}'></div>")
            sections.append((name.split(".")[0], title, content))
    sections.append(("timelines", "Timelines", _timelines(loaded, out_dir, write_pngs, max_timelines)))
    nav = "".join(f"<li><a href='#{sid}'>{html.escape(title)}</a></li>" for sid, title, _ in sections)
    sources = sorted({r["source"] for r in records})
    body = "\n".join(f"<section id='{sid}'><h2>{html.escape(title)}</h2>\n{content}</section>"
                     for sid, title, content in sections)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>memprof report: "
            f"{html.escape(os.path.basename(os.path.abspath(run_dir)))}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>memprof report</h1><p class='note'>Run directory <code>{html.escape(os.path.abspath(run_dir))}</code>"
            + (f" with <code>{html.escape(os.path.abspath(pair_dir))}</code>" if pair_dir else "")
            + f"; {len(records)} configurations; figures {' and '.join(sources) or 'none'}.</p>"
            f"<nav><ul>{nav}</ul></nav>\n{body}\n</body></html>\n")


def _timelines(loaded: list[tuple], out_dir: str, write_pngs: bool, limit: int | None = None) -> str:
    from memprof.reports.timeline import TIMELINE_DIR

    groups: OrderedDict = OrderedDict()
    searches = sum(rec.task == "fit" for rec, _ in loaded)
    loaded = [(rec, base) for rec, base in loaded if rec.task != "fit"]  # a fit's probes keep no timeline
    for rec, base in sorted(loaded, key=lambda rb: rb[0].key):
        groups.setdefault(rec.config, []).append((rec, base))
    parts, skipped, undrawn = [], [], []
    for config, recs in groups.items():
        runs = [(r, b) for r, b in recs if r.status.ran]
        pred = next(((r, b) for r, b in runs if r.source == Source.PREDICTED and r.metrics.get("timeline_file")), None)
        meas = next(((r, b) for r, b in runs if r.source == Source.MEASURED), None)
        if pred is None and meas is None:
            why = recs[0][0].status if not runs else "no timeline was recorded (a run before timelines existed)"
            skipped.append(f"<li><code>{html.escape(config)}</code>: {html.escape(why)}</li>")
            continue
        if limit is not None and len(parts) >= limit:
            undrawn.append(config)
            continue
        png, notes = _timeline_png(config, pred, meas)
        if write_pngs and pred is not None:
            _save_png(png, os.path.join(pred[1], pred[0]["metrics"]["timeline_file"]))
        status = ", ".join(f"<span class='{'pred' if r.source == Source.PREDICTED else 'meas'}'>{r.source}</span> "
                           f"{html.escape(r.status)}" for r, _ in runs)
        parts.append(f"<div class='fig'><h3>{html.escape(config)}</h3><p class='note'>{status}"
                     + "".join(f"; {html.escape(n)}" for n in notes) + "</p>"
                     f"<img alt='memory timeline of {html.escape(config)}' src='{_png_uri(png)}'>"
                     + (_holders_html(pred[0]) if pred else "") + _snapshot_links(runs, out_dir) + "</div>")
    intro = ("<p class='note'>Memory over the training steps' events: allocated bytes stacked by category, "
             "reserved bytes as a line, phase bands, the peak and the budget card's usable memory. Predicted "
             f"series come from the allocator model (files in <code>{TIMELINE_DIR}/</code>); measured ones from a "
             "GPU snapshot's trace when the cuda backend ran with <code>--snapshot</code>, else only the measured "
             "peaks are marked.</p>")
    tail = f"<p>No timeline:</p><ul>{''.join(skipped)}</ul>" if skipped else ""
    if searches:
        tail += (f"<p class='note'>{searches} <code>memprof fit</code> searches: a search's probes keep no timeline "
                 "(fit.png shows them); <code>memprof run --batch-size N</code> draws one at a batch it found.</p>")
    if undrawn:  # each figure costs a fraction of a second: a large grid's run draws the first ones only
        tail += (f"<p class='note'>{len(undrawn)} more timelines are not drawn here, to keep the run quick: "
                 f"<code>memprof report {html.escape(os.path.abspath(out_dir))}</code> draws every one "
                 f"({html.escape(', '.join(undrawn[:3]))}{', ...' if len(undrawn) > 3 else ''}).</p>")
    return intro + "\n".join(parts) + tail


def _save_png(data: bytes, timeline_json: str) -> None:
    path = os.path.splitext(timeline_json)[0] + ".png"
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError:
        pass  # a read-only run directory still gets its report (the image is embedded)


def write_html_report(run_dir: str, out_path: str | None = None, pair_dir: str | None = None,
                      max_timelines: int | None = None) -> str:
    """Render and write the report (default RUN_DIR/report.html), with at most `max_timelines` timeline
    figures (None: all); returns its path."""
    from memprof.results import write_text

    out_path = out_path or os.path.join(run_dir, REPORT_FILE)
    write_text(out_path, render_html(run_dir, out_path, pair_dir, max_timelines=max_timelines))
    return out_path
