"""What a new user meets first: help that renders, bad input as one line that names the flag and the fix,
nothing accepted silently, output that fits the terminal, a Table 4 picture that stays readable."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memprof import cli
from memprof.reports.table4 import render_markdown, render_terminal, table_rows
from memprof.reports.terminal import fit_table
from memprof.results import read_records

DATA = Path(__file__).parent / "data"
RUN = ["run", "--models", "test-vit", "--optims", "sgd", "--jobs", "1", "--no-progress", "--backend", "simulate"]


def main(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memprof: error:") and "Traceback" not in err, err
    return lines[0]


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_subcommand_help_renders():
    parsers = list(_parsers(cli.build_parser()))
    assert len(parsers) >= 10
    for p in parsers:
        assert p.format_help()


def test_a_bare_percent_breaks_plain_argparse_but_not_ours():
    """Negative control: the help text that crashed `memprof --help` crashes argparse's own formatter."""
    plain = argparse.ArgumentParser(prog="x")
    plain.add_argument("--fail", help="default: peak_allocated:0%, peak_reserved:0%")
    with pytest.raises((ValueError, TypeError)):
        plain.format_help()
    ours = cli._Parser(prog="x")
    ours.add_argument("--fail", default=3, help="default: peak_allocated:0%, and %(default)s")
    assert "peak_allocated:0%, and 3" in ours.format_help()


def test_help_in_a_fresh_process():
    for args in (["--help"], ["-h"], ["compare", "--help"]):
        r = subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage: memprof" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, expect", [
    (["--timeout-s", "nan", "--backend", "cpu"], "--timeout-s nan: give a finite number"),
    (["--timeout-s", "inf", "--backend", "cpu"], "--timeout-s inf: give a finite number"),
    (["--snapshot", "/proc/memprof-x"], "--snapshot /proc/memprof-x is not writable"),
    (["--nvml-period-ms", "5"], "--nvml-period-ms applies to the cuda backend"),
    (["--out", ""], "--out is empty"),
    (["--budget", "-1GiB"], "--budget needs a value (a value that starts with '-' must be attached with '='"),
    (["--budget=-1GiB"], "--budget -1GiB: a size must be positive"),
    (["--budget", "titanx"], "did you mean titan-x"),
    (["--budget", "12GiB@99.9"], "compute capability"),
    (["--retry-failed"], "--retry-failed needs --out DIR"),
])
def test_bad_run_input_names_the_flag(capsys, tmp_path, args, expect):
    code, _, err = main(capsys, *RUN, *args)
    assert code == 2 and expect in error_line(err)


@pytest.mark.parametrize("args, expect", [
    (["--lr-sgd", "nan"], "--lr-sgd nan: a learning rate must be a finite number"),
    (["--lr-adaptive", "inf"], "--lr-adaptive inf: a learning rate must be a finite number"),
])
def test_bad_accuracy_input_names_the_flag(capsys, args, expect):
    code, _, err = main(capsys, "accuracy", "--optims", "sgd", "--state-bits", "32", *args)
    assert code == 2 and expect in error_line(err)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="assumes no CUDA GPU is present")
def test_accuracy_backend_cuda_without_a_gpu_names_its_own_flag(capsys):
    code, _, err = main(capsys, "accuracy", "--accuracy-backend", "cuda", "--optims", "sgd", "--state-bits", "32")
    assert code == 2 and "--accuracy-backend cuda needs a CUDA GPU" in error_line(err)


def test_repeated_values_run_once_and_say_so(capsys, tmp_path):
    code, _, err = main(capsys, *RUN, "--batch-size", "1,1,2,2", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert err.count("--batch-size repeats 1, 2: each runs once") == 1
    assert sorted(r["spec"]["batch_size"] for r in read_records(str(tmp_path / "o"))) == [1, 2]


def test_a_budget_on_the_cpu_backend_says_what_it_does(capsys, tmp_path):
    code, _, err = main(capsys, *RUN, "--backend", "cpu", "--budget", "titan-x", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "caps live tensor bytes at the card's usable memory (emulated on the host" in err


def test_suite_errors_point_at_the_key_line(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[run]]\nmodels = "test-vit"\n\n[[run]]\nmodels = "test-vit"\noptims = "sgd"\n'
                   'batch_size = "0"\nbudget = "titan-x"\n')
    code, _, err = main(capsys, "suite", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{bad}:7: --batch-size 0" in error_line(err)
    bad.write_text('[[run]]\nmodels = "test-vit"\n\n[[run]]\nmodels = "test-vit"\noptims = "sgd"\nbudget = "tit"\n')
    code, _, err = main(capsys, "suite", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{bad}:7:" in error_line(err)


@pytest.mark.parametrize("content, expect", [
    ("[1, 2]", "a JSON list, not a baseline"),
    ('{"kind": "memprof-baseline"}', "without a 'benchmarks' list"),
    ('{"kind": "memprof-baseline", "benchmarks": [{"name": "x"}]}', "benchmarks[0] lacks a name or a 'stats'"),
    ('{"benchmarks": 3, "machine_info": {}}', "'benchmarks' is not a list"),
    ('{"hello": 1}', "neither a memprof baseline nor pytest-benchmark JSON"),
])
def test_malformed_baselines_are_named(capsys, tmp_path, content, expect):
    path = tmp_path / "b.json"
    path.write_text(content)
    code, _, err = main(capsys, "compare", str(path), str(DATA / "paper_grid.jsonl"))
    assert code == 2 and expect in error_line(err)


def test_a_directory_where_a_baseline_file_is_expected(capsys, tmp_path):
    code, _, err = main(capsys, "compare", str(tmp_path), str(DATA / "paper_grid.jsonl"))
    assert code == 2 and "has no results.jsonl" in error_line(err)
    code, _, err = main(capsys, "baseline", "save", str(DATA / "paper_grid.jsonl"), "-o", str(tmp_path))
    assert code == 2 and "is a directory: give a file path" in error_line(err)


def test_output_to_a_closed_pipe_is_quiet():
    r = subprocess.run(f"{sys.executable} -m memprof list models | head -n 1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


# --- output a user reads ----------------------------------------------------------------------------------

def records():
    return read_records(str(DATA / "paper_grid.jsonl"))


@pytest.mark.parametrize("width", [80, 100])
def test_the_terminal_table_fits_the_terminal(width):
    text = render_terminal(records(), "reserved", None, width)
    assert "AdamW" in text and "OOM (predicted)" in text
    assert max(len(line) for line in text.splitlines()) <= width


def test_unfitted_tables_would_not_fit():
    """Negative control: the same rows rendered at their natural width are wider than 80 columns."""
    rows = [[r["config"], r["setting"]] for r in table_rows(records())]
    assert max(len(line) for line in fit_table(rows, ["config", "setting"], 10_000).splitlines()) > 80
    assert max(len(line) for line in fit_table(rows, ["config", "setting"], 80).splitlines()) <= 80


def test_list_models_fits_the_terminal():
    r = subprocess.run([sys.executable, "-m", "memprof", "list", "models"], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "COLUMNS": "80"})
    assert r.returncode == 0 and "ViT-B-32" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_an_oom_cell_under_allocated_does_not_mix_metrics():
    md = render_markdown(records(), "allocated")
    cell = next(line for line in md.splitlines() if line.startswith("| AdamW ") and "OOM" in line)
    # the verdict is on reserved against the card's usable memory (the card minus the context), said so
    assert "allocated " in cell and "reserved 12.39 GiB of 11.61 GiB usable on titan-x" in cell and "needs" not in cell


def test_a_leaner_method_reserving_more_is_explained():
    recs = records()
    md = render_markdown(recs)
    assert "## Why a leaner method can reserve more" in md and "allocated 0.98 GiB vs 0.98 GiB" in md
    fixed = []
    for r in recs:  # negative control: where the reserved order holds there is nothing to explain
        r = json.loads(json.dumps(r))
        m = r["metrics"]
        if "peak_reserved_bytes" in m and r["spec"]["optim"] in ("sgd-fe", "adamw-fe", "sgd-fe-nomom"):
            m["peak_reserved_bytes"] = 0
        fixed.append(r)
    assert "Why a leaner method" not in render_markdown(fixed)


def test_claims_have_a_stated_tolerance():
    from memprof.reports.table4 import CLAIM_TOLERANCE_POINTS, claim_verdict

    row = {"status": "ok", "adamw_status": "ok", "adamw_extra_pct": 59.0}
    assert claim_verdict("vit-b-16", 16, row).startswith("differs: +43 points")
    row["adamw_extra_pct"] = 16 + CLAIM_TOLERANCE_POINTS
    assert claim_verdict("vit-b-16", 16, row).startswith("agrees")
    row["adamw_extra_pct"] = -5.0
    assert "opposite direction" in claim_verdict("vit-b-16", 16, row)
    assert f"within {CLAIM_TOLERANCE_POINTS} points" in render_markdown(records())


def test_the_plot_keeps_every_configuration_readable(tmp_path):
    """Every configuration gets its own row, skipped ones included (with their status written in), and the
    figure grows with the number of rows so labels never overlap."""
    from PIL import Image

    from memprof.reports.table4 import plot_rows, render_plot

    recs = records()
    recs[0] = {**recs[0], "status": "skipped", "metrics": {}, "skip_reason": "test"}
    rows = plot_rows(recs)
    assert len(rows) == len(recs) and ("skipped" in [note for _, note in rows])
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    render_plot(recs[:4], str(small))
    render_plot(recs * 3, str(big))
    h_small, h_big = Image.open(small).size[1], Image.open(big).size[1]
    assert h_big / len(recs * 3) >= 0.25 * 110 and h_big > 5 * h_small


def test_bad_input_is_refused_without_importing_torch():
    """Validation answers before torch and open_clip load (seconds on 2 cores): a misspelled model, here."""
    code = ("import sys; from memprof.cli import main; rc = main(['run', '--models', 'vit-b-61', '--out', 'x']); "
            "print(rc, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if __import__("torch").cuda.is_available():  # with a GPU, the backend check itself asks torch
        pytest.skip("a GPU is present: the backend check imports torch")
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr
    assert "did you mean vit-b-16" in r.stderr


def test_gpu_check_asks_torch_where_nvml_sees_a_device(monkeypatch):
    """Negative control of the shortcut: where NVML counts a device, torch decides."""
    import pynvml
    import torch

    from memprof.backends import nvml as plan

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plan.gpu_present()
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    assert not plan.gpu_present()


def test_open_clip_names_read_like_open_clip(monkeypatch, tmp_path):
    """The config files open_clip lists, without importing it; a JSON that is not a model config is left out."""
    import importlib.util
    import json as _json

    import open_clip

    from memprof.model_sources import open_clip as sources

    sources.open_clip_names.cache_clear()
    monkeypatch.delitem(sys.modules, "open_clip")
    assert sources.open_clip_names() == tuple(open_clip.list_models())
    configs = tmp_path / "open_clip" / "model_configs"
    configs.mkdir(parents=True)
    full = {"embed_dim": 1, "vision_cfg": {}, "text_cfg": {}}
    for name, cfg in {"ViT-B-16": full, "ViT-B-4": full, "notes": {"embed_dim": 1}}.items():
        (configs / f"{name}.json").write_text(_json.dumps(cfg))
    spec = importlib.util.spec_from_file_location("open_clip", configs.parent / "__init__.py",
                                                  submodule_search_locations=[str(configs.parent)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "open_clip" else None)
    sources.open_clip_names.cache_clear()
    try:
        assert sources.open_clip_names() == ("ViT-B-4", "ViT-B-16")  # natural order; "notes" is no config
    finally:
        sources.open_clip_names.cache_clear()


def test_a_suite_sets_every_run_option_a_run_takes(tmp_path):
    """Every option of `memprof run` is a suite key, unless it belongs to the suite command itself; a suite setting
    the parallel and model-source options plans the same configurations as the run's options."""
    from memprof.plan import RUN_OPTIONS, plan_run, run_options
    from memprof.suite import COMMAND_OPTIONS, KEYS, load_suite

    assert sorted(set(RUN_OPTIONS) - set(KEYS) - set(COMMAND_OPTIONS)) == []
    assert "parallel" in KEYS and "max_batch_size" not in KEYS  # control: the partition is not everything in both
    suite = tmp_path / "s.toml"
    suite.write_text('[[run]]\nbackend = "simulate"\nmodels = "test-vit"\noptims = "sgd-fe"\nparallel = "ddp"\n'
                     'world_size = 8\nbucket_cap_mb = 5\nfreeze = "conv1"\n')
    (run,) = load_suite(str(suite))
    from_suite = plan_run(run_options(**run.options, out=str(tmp_path / "a"), progress=False))
    from_cli = plan_run(run_options(models="test-vit", optims="sgd-fe", backend="simulate", parallel="ddp", world_size=8,
                                    bucket_cap_mb=5.0, freeze="conv1", out=str(tmp_path / "b"), progress=False))
    assert [e.spec.key for e in from_suite.entries] == [e.spec.key for e in from_cli.entries]
    assert "ddp8+cap5" in from_suite.entries[0].spec.key
