"""Result records: one JSON object per configuration, appended to a JSONL file as each one finishes.

A record holds the spec (what was run), the status, where its figures come from (`source`:
"predicted" or "measured"), the metrics with units in their field names, and the environment.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata

SCHEMA_VERSION = 1
RESULTS_FILE = "results.jsonl"
STATUSES = ("ok", "oom", "error", "crashed", "skipped")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(backend: str, device: str) -> dict:
    return {
        "backend": backend,
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": _version("torch"),
        "open_clip_torch": _version("open_clip_torch"),
        "timm": _version("timm"),
        "memprof": _version("memprof"),
    }


def make_record(spec, status: str, source: str, env: dict, metrics: dict | None = None,
                error: str | None = None, skip_reason: str | None = None, elapsed_s: float | None = None) -> dict:
    assert status in STATUSES, status
    return {
        "schema_version": SCHEMA_VERSION,
        "key": spec.key,
        "spec": spec.to_dict(),
        "status": status,
        "source": source,
        "metrics": metrics or {},
        "error": error,
        "skip_reason": skip_reason,
        "environment": env,
        "elapsed_s": None if elapsed_s is None else round(elapsed_s, 3),
    }


def append(path: str, record: dict) -> None:
    """Append one record and flush it to disk, so a crash or Ctrl-C loses nothing already finished."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def load(path: str) -> list[dict]:
    """Records from a JSONL file or from a run directory's results.jsonl; later records of a key win."""
    if os.path.isdir(path):
        path = os.path.join(path, RESULTS_FILE)
    records: dict[str, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                records[rec["key"]] = rec
    return list(records.values())
