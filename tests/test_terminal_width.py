"""What `memprof list` prints fits a 100-column terminal, trailing padding included (a terminal wraps on it)."""

import pytest
from tabulate import tabulate

from memprof import cli
from memprof.reports.terminal import fit_table


@pytest.mark.parametrize("what", ["models", "optims", "budgets", "backends"])
def test_list_fits_100_columns(capsys, monkeypatch, what):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["list", what]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100, out


def test_fit_table_counts_the_padding_tabulate_leaves_at_line_ends():
    rows = [["adamw", "torch AdamW, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 " * 3, ""],
            ["sgd", "short", ""]]
    headers = ["name", "description", "freeze-embed"]
    assert max(len(line) for line in fit_table(rows, headers, 60).splitlines()) <= 60
    # negative control: as tabulate lays it out, the empty last column pads every line past the width
    plain = tabulate(rows, headers=headers, maxcolwidths=[None, 44, None])
    assert max(len(line) for line in plain.splitlines()) > 60


@pytest.mark.slow  # over 5 s on 2 cores: the slow set (CI gates on it too)
def test_what_a_newcomer_runs_fits_100_columns(capsys, monkeypatch, tmp_path):
    """run, fit, advise and compare at 100 columns, on the test model: no line of what they print (stdout and
    stderr) is wider than the terminal."""
    monkeypatch.setenv("COLUMNS", "100")
    common = ["--models", "test-vit", "--backend", "simulate", "--no-progress", "--jobs", "1"]
    runs = [["run", *common, "--optims", "paper", "--out", str(tmp_path / "run")],
            ["fit", *common, "--optims", "sgd,adamw", "--budget", "1GiB", "--out", str(tmp_path / "fit")],
            ["advise", *common, "--optims", "adamw", "--budget", "423MiB", "--state-bits", "32", "--out",
             str(tmp_path / "advise")],
            ["compare", str(tmp_path / "run"), str(tmp_path / "run")]]
    wide = []
    for argv in runs:
        code = cli.main(argv)
        out, err = capsys.readouterr()
        assert code in (0, 1), (argv, err)
        wide += [(argv[0], line) for line in (out + err).splitlines() if len(line) > 100]
    assert wide == []
