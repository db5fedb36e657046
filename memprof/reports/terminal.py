"""Tables for a terminal: fitted to its width (memprof.cli prints them; files keep the full text)."""

from __future__ import annotations

import shutil
import textwrap

from tabulate import tabulate

WIDTH = 100  # the most columns a line for the terminal takes (fewer on a narrower terminal)
WHOLE_WORD = 16  # words up to this long never split when a table is fitted (a class name such as timm.optim.Lamb)


def terminal_width() -> int:
    """The terminal's width, at most WIDTH (WIDTH when there is no terminal)."""
    return min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)


def wrapped(text: str, indent: str = "", width: int | None = None) -> str:
    """`text` as lines of the terminal's width, the first beginning with `indent`, the rest indented two more;
    names and paths (words without spaces) never split."""
    return textwrap.fill(text, width or terminal_width(), initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False)


def fit_table(rows: list, headers: list, width: int, tablefmt: str = "simple") -> str:
    """A table for the terminal, `width` columns wide at most where it can be: headers wrap to their
    column, and the widest prose columns wrap (tabulate's maxcolwidths) until the rendered table fits. Words
    up to WHOLE_WORD long split only where the table cannot fit otherwise; names (cells without spaces) never
    split. Files keep the full text."""
    cells = [[str(c) for c in row] for row in rows]
    heads = [max([len(w) for w in str(h).replace("-", "- ").split()] or [1]) for h in headers]
    whole = [max([heads[i]] + [min(len(w), WHOLE_WORD) for r in cells for w in r[i].split()])
             for i in range(len(headers))]  # a column's longest word up to WHOLE_WORD
    limits = [max([whole[i]] + [len(r[i]) for r in cells]) for i in range(len(headers))]
    prose = [any(" " in r[i] for r in cells) for i in range(len(headers))]  # wraps at spaces; names would break

    def render() -> str:  # without the padding tabulate leaves at a line's end: a terminal wraps on it too
        return "\n".join(line.rstrip() for line in tabulate(
            cells, headers=headers, tablefmt=tablefmt, maxcolwidths=limits, maxheadercolwidths=limits,
            disable_numparse=True).splitlines())

    def shrink(floor: list) -> bool:  # only prose wraps: a name split in two is worse than a wide table
        candidates = [i for i in range(len(limits)) if prose[i] and limits[i] > max(10, floor[i])]
        if candidates:
            limits[max(candidates, key=limits.__getitem__)] -= 1
        return bool(candidates)

    for floor in (whole, heads):  # whole words first; split them only if the table cannot fit so
        while sum(limits) + 2 * len(headers) > width and shrink(floor):  # the widest prose first
            pass
        text = render()
        while max(len(line) for line in text.splitlines()) > width and shrink(floor):  # what padding adds
            text = render()
        if max(len(line) for line in text.splitlines()) <= width:
            break
    return text
