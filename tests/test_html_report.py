"""The offline HTML report: valid HTML, every image embedded and decodable, nothing loaded from a network;
a headless Chromium opens it where one is installed. Timelines: predicted and measured on one figure."""

import base64
import io
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from memprof.cli import main
from memprof.reports.html import markdown_to_html, render_html, write_html_report
from memprof.reports.timeline import load_timeline, plot_timeline

VOID = {"meta", "img", "br", "link", "hr", "input"}


class Audit(HTMLParser):
    """Checks nesting and collects what the page would load."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.loads, self.links, self.text = [], [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link", "iframe", "object", "embed") or "style" in a and "url(" in a["style"]:
            self.loads.append(tag)
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def audit(text: str) -> Audit:
    a = Audit()
    a.feed(text)
    a.close()
    return a


def decodes_as_png(src: str) -> bool:
    import matplotlib.image

    prefix = "data:image/png;base64,"
    if not src.startswith(prefix):
        return False
    try:
        img = matplotlib.image.imread(io.BytesIO(base64.b64decode(src[len(prefix):], validate=True)), format="png")
    except Exception:
        return False
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`memprof run` on the test model, two optimizers, with predicted snapshots: the report comes with it."""
    out = tmp_path_factory.mktemp("run")
    rc = main(["run", "--models", "test-vit", "--optims", "adamw,sgd-fe", "--out", str(out / "run"), "--snapshot",
               str(out / "snap"), "--no-progress", "--jobs", "1"])
    assert rc == 0
    return out / "run"


def test_run_writes_report_timelines_and_snapshots(run_dir):
    assert (run_dir / "report.html").exists() and (run_dir / "table4.md").exists()
    records = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    for rec in records:
        m = rec["metrics"]
        assert os.path.exists(m["snapshot_file"]) and (run_dir / m["timeline_file"]).exists()
        assert (run_dir / m["timeline_file"]).with_suffix(".png").exists()
        assert len(json.dumps(rec)) < 8000  # one small line per configuration: series live in timelines/
        series = load_timeline(run_dir / m["timeline_file"])
        top = max(map(sum, zip(*series["categories_bytes"].values())))
        assert top == m["peak_allocated_bytes"] == series["peak"]["allocated_bytes"]
        assert max(series["reserved_bytes"]) == m["peak_reserved_bytes"]


def test_report_is_valid_offline_html_with_decodable_images(run_dir):
    text = (run_dir / "report.html").read_text()
    a = audit(text)
    assert a.errors == [] and a.stack == []
    assert a.loads == []  # no script, stylesheet or frame: nothing is fetched
    assert len(a.images) == 2 and all(decodes_as_png(src) for src in a.images)
    assert all(h.startswith(("#", "https://pytorch.org", "../snap/")) for h in a.links), a.links
    body = " ".join(a.text)
    for needle in ("Peak memory per optimizer and model", "One view", "Largest holders at the peak",
                   "Timelines", "predicted", "pytorch.org/memory_viz", "visual.transformer.resblocks.0.mlp.c_fc"):
        assert needle in body, needle
    assert text.count("<details class='snapview' open>") == 2 and "Offline view of" in body  # one per snapshot


def test_audit_catches_a_broken_page(run_dir):
    """Negative control: a network script, a corrupt image and a broken nesting are each caught."""
    text = (run_dir / "report.html").read_text()
    assert audit(text.replace("<body>", "<body><script src='https://cdn.example/x.js'></script>", 1)).loads
    src = audit(text).images[0]
    assert not decodes_as_png(src[:-400] + "A" * 400)
    assert audit(text.replace("</table>", "</div>", 1)).errors


def test_fit_and_advise_and_fidelity_are_included_when_present(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "fit.md").write_text("# What fits\n\n| card | fits |\n|---|---|\n| titan-x | yes |\n")
    (copy / "advise.md").write_text("# Advice\n\n- use SGD (freeze-embed)\n")
    measured = []
    for line in (copy / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.update(source="measured", key=rec["key"].replace("@simulate", "@cuda"))
        rec["environment"]["device"] = "NVIDIA H200"
        rec["metrics"] = {k: int(v * 1.02) if k.startswith("peak_") and isinstance(v, int) else v
                          for k, v in rec["metrics"].items() if k not in ("snapshot_file", "timeline_file")}
        measured.append(json.dumps(rec))
    other = tmp_path / "measured"
    other.mkdir()
    (other / "results.jsonl").write_text("\n".join(measured) + "\n")
    text = render_html(str(copy), str(copy / "report.html"), pair_dir=str(other))
    a = audit(text)
    body = " ".join(a.text)
    assert a.errors == [] and "What fits" in body and "use SGD (freeze-embed)" in body
    assert "Simulation fidelity" in body and "-1.96" in body  # predicted = measured / 1.02
    assert len(a.images) == 2 and all(decodes_as_png(s) for s in a.images)


def test_measured_series_from_a_snapshot_goes_on_the_same_figure(run_dir, tmp_path):
    """A measured record with a snapshot is drawn as a series; without one, as peak marks (said in the
    figure); both figures decode and differ."""
    from memprof.reports.snapshot import load_snapshot
    from memprof.reports.timeline import measured_series

    rec = json.loads((run_dir / "results.jsonl").read_text().splitlines()[0])
    series = load_timeline(run_dir / rec["metrics"]["timeline_file"])
    meas = measured_series(load_snapshot(rec["metrics"]["snapshot_file"]), series["alloc_x"])
    assert meas["peak_allocated_bytes"] == rec["metrics"]["peak_allocated_bytes"]
    assert len(meas["x"]) == len(meas["allocated_bytes"]) and meas["x"] == sorted(meas["x"])
    with_series, with_marks = io.BytesIO(), io.BytesIO()
    plot_timeline(with_series, "t", series, measured=meas)
    plot_timeline(with_marks, "t", series, measured_peaks=rec["metrics"])
    assert with_series.getvalue() != with_marks.getvalue()
    for buf in (with_series, with_marks):
        assert decodes_as_png("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())


def test_paper_grid_report_has_the_paper_beside_ours(tmp_path):
    """From the committed paper-grid records (no timelines recorded then): the claims table is there."""
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "data" / "paper_grid.jsonl", tmp_path / "results.jsonl")
    path = write_html_report(str(tmp_path))
    a = audit(Path(path).read_text())
    body = " ".join(a.text)
    assert a.errors == [] and a.loads == [] and a.images == []
    assert "The paper's claims beside ours" in body and "AdamW runs out of memory at 12 GB" in body
    assert "no timeline was recorded" in body


def test_markdown_subset():
    html = markdown_to_html("# T\n\nsome **bold** `code` and \\* star\n\n| a | b |\n|---|---|\n| 1 | <x> |\n\n- one\n- two\n")
    assert "<h1>T</h1>" in html and "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "* star" in html and "<td>&lt;x&gt;</td>" in html and "<li>two</li>" in html


def test_report_command(run_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0
    assert out.exists() and capsys.readouterr().out.strip() == str(out)
    assert main(["report", str(tmp_path)]) == 2  # no results.jsonl there
    assert "holds no results.jsonl" in capsys.readouterr().err
    assert main(["report", str(run_dir), "-o", str(tmp_path)]) == 2  # a directory is not a file
    assert main(["run", "--backend", "cpu", "--models", "test-vit", "--snapshot", str(tmp_path / "s"),
                 "--out", str(tmp_path / "c")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no headless Chromium here (apt-get install chromium)")
def test_headless_chromium_opens_the_report(run_dir, tmp_path):
    """Chromium loads the page with the network off: the DOM holds the report and the screenshot is not
    blank."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    url = (run_dir / "report.html").resolve().as_uri()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9",
             "--proxy-bypass-list=<-loopback>"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "Largest holders at the peak" in dom.stdout
    assert dom.stdout.count("data:image/png;base64,") == 2
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1400,3000", url], capture_output=True,
                   timeout=120, check=True)
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))
    assert img.shape[0] == 3000 and img.std() > 0.05


def test_a_capped_report_says_which_timelines_it_left_out(run_dir, tmp_path):
    """A run draws at most RUN_TIMELINES figures and names the command that draws the rest; uncapped (the
    negative control) every configuration gets its figure."""
    from memprof.reports.html import render_html

    capped = render_html(str(run_dir), str(tmp_path / "r.html"), write_pngs=False, max_timelines=1)
    full = render_html(str(run_dir), str(tmp_path / "r.html"), write_pngs=False)
    assert capped.count("alt='memory timeline of") == 1 and "1 more timelines are not drawn" in capped
    assert full.count("alt='memory timeline of") == 2 and "not drawn" not in full
    assert f"memprof report {tmp_path}" in capped
