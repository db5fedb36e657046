"""Suites as files: TOML with one `[[run]]` table per grid, each run like `memprof run` with those options.

    [[run]]
    backend = "simulate"     # simulate | cpu | cuda | auto
    models = "paper"
    optims = "paper"
    grad_ckpt = "off,on"

Unknown keys or values are an error naming the file and the line of the key (values are validated by
memprof.plan, as for `memprof run`).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass

from memprof.errors import UsageError
from memprof.options import OPTIONS, SUITE, SUITE_KEYS, SWITCH

KEYS = {**SUITE_KEYS, "preset": str}  # a [[run]]'s keys: every grid option of the table, and a preset
# run options a [[run]] does not set: they belong to the `memprof suite` command (one output directory, one
# executor, one progress bar for every run) or to another command (fit's search bound and headroom)
COMMAND_OPTIONS = tuple(o.name for o in OPTIONS if SUITE not in o.commands)


@dataclass(frozen=True)
class SuiteRun:
    line: int  # of its [[run]] header
    options: dict
    key_lines: dict  # option -> line of its key

    def line_of(self, option: str | None) -> int:
        """The line an error about `option` points at: its key's, else the [[run]] header's."""
        return self.key_lines.get(option, self.line)


def _line_of(text: str, run_index: int, key: str | None) -> int:
    """1-based line of `key` inside the run_index-th [[run]] table (or of the table header)."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*run\s*\]\]", line)]
    if run_index >= len(headers):
        return 1
    start = headers[run_index]
    end = headers[run_index + 1] if run_index + 1 < len(headers) else len(lines)
    if key is not None:
        for i in range(start, end):
            if re.match(rf"\s*{re.escape(key)}\s*=", lines[i]):
                return i + 1
    return start + 1


def load_suite(path: str) -> list[SuiteRun]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise UsageError(f"suite {path}: {exc.strerror}; give a suite file such as suites/ci.toml") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise UsageError(f"{path} starts with a UTF-8 byte-order mark: save it without (UTF-8 without BOM; TOML "
                         f"files are plain UTF-8)")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UsageError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8")
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    extra = sorted(set(data) - {"run", "description"})
    if extra:
        line = next((i + 1 for i, s in enumerate(text.splitlines()) if re.match(rf"\s*\[?{extra[0]}\b", s)), 1)
        raise UsageError(f"{path}:{line}: unknown key '{extra[0]}': a suite has [[run]] tables and a description")
    runs = data.get("run")
    if not isinstance(runs, list) or not runs:
        raise UsageError(f"{path}: no [[run]] tables: add at least one")
    out = []

    for i, run in enumerate(runs):
        for key, value in run.items():
            line = _line_of(text, i, key)
            if key not in KEYS:
                raise UsageError(f"{path}:{line}: unknown key '{key}' (known: {', '.join(KEYS)})")
            types = KEYS[key] if isinstance(KEYS[key], tuple) else (KEYS[key],)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise UsageError(f"{path}:{line}: '{key}' has the wrong type ({type(value).__name__})")
        options = {k: ("on" if v else "off") if isinstance(v, bool) and KEYS[k] == SWITCH else v for k, v in run.items()}
        out.append(SuiteRun(_line_of(text, i, None), options, {k: _line_of(text, i, k) for k in run}))
    return out
