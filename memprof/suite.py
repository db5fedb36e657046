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

KEYS = {"backend": str, "models": str, "optims": str, "grad_ckpt": str, "state_bits": (str, int),
        "batch_size": (str, int), "steps": int, "budget": str, "num_classes": int, "pretrained": str, "paged": bool,
        "precision": str, "optim_impl": str, "optim_in_backward": str, "resident": str, "preset": str,
        "freeze": str, "input_shape": str, "parallel": str, "world_size": int, "bucket_cap_mb": (int, float),
        "grad_as_bucket_view": str, "reshard_after_forward": str, "timeout_s": (int, float),
        "nvml_period_ms": (int, float), "snapshot": str}
# run options a [[run]] does not set: they belong to the `memprof suite` command (one output directory, one
# executor, one progress bar for every run) or to another command (fit's search bound)
COMMAND_OPTIONS = ("out", "resume", "retry_failed", "progress", "jobs", "executor", "ray_address", "max_batch_size", "headroom")


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
            if not isinstance(value, KEYS[key]) or (isinstance(value, bool) and KEYS[key] is not bool):
                raise UsageError(f"{path}:{line}: '{key}' has the wrong type ({type(value).__name__})")
        out.append(SuiteRun(_line_of(text, i, None), dict(run), {k: _line_of(text, i, k) for k in run}))
    return out
