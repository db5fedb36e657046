"""What `memprof list` prints fits a 100-column terminal, trailing padding included (a terminal wraps on it)."""

import pytest
from tabulate import tabulate

from memprof import cli
from memprof.reports.table4 import fit_table


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
