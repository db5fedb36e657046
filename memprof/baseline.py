"""Baselines and regression checks, with pytest-benchmark's envelope and `--benchmark-compare-fail` rules.

A baseline is JSON: machine_info, commit_info, datetime, version, versions (torch, open_clip, timm),
backends, and one entry per configuration in `benchmarks` (name = the config key, params = the spec,
status, source, device, `stats` = every numeric metric). `compare` checks named fields with thresholds
(`peak_allocated:1%`, `step_ms:20%`, or absolute `peak_reserved:1048576`): bigger is worse; every
regression is collected and reported once; a configuration that newly fails (oom, error, crashed) is a
regression; one missing on either side is reported; version or backend differences are warned about.
pytest-benchmark JSON files are read too (fields: their stats, e.g. `min`, `mean`, and extra_info).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass

from memprof.errors import UsageError
from memprof.results import SCHEMA_VERSION, load

# short names for the command line -> fields of a memprof record's metrics
FIELDS = {
    "peak_allocated": "peak_allocated_bytes",
    "peak_reserved": "peak_reserved_bytes",
    "peak_live": "peak_live_bytes",
    "nvml_process": "nvml_process_peak_bytes",
    "step_ms": "step_ms_median",
    "state_bytes": "optimizer_state_bytes",
}
FAILED = ("oom", "error", "crashed", "skipped")  # a configuration that stops producing figures


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_baseline(records: list[dict]) -> dict:
    from memprof.results import environment

    env = environment("", "")
    entries = []
    for r in sorted(records, key=lambda r: r["key"]):
        stats = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        entries.append({"name": r["key"], "params": r["spec"], "status": r["status"], "source": r["source"],
                        "backend": r["environment"]["backend"], "device": r["environment"].get("device"),
                        "stats": stats})
    return {
        "kind": "memprof-baseline",
        "schema_version": SCHEMA_VERSION,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": env["memprof"],
        "machine_info": {"node": platform.node(), "machine": platform.machine(), "python_version": env["python"],
                         "platform": env["platform"], "cpu_count": os.cpu_count()},
        "commit_info": {"id": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
                        "dirty": bool(_git("status", "--porcelain"))},
        "versions": {k: env[k] for k in ("torch", "open_clip_torch", "timm")},
        "backends": sorted({e["backend"] for e in entries}),
        "benchmarks": entries,
    }


def _from_pytest_benchmark(data: dict) -> dict:
    """pytest-benchmark's JSON as baseline entries: stats (seconds) and numeric extra_info."""
    entries = []
    for b in data.get("benchmarks", []):
        stats = {k: v for k, v in b.get("stats", {}).items() if isinstance(v, (int, float))}
        stats.update({k: v for k, v in b.get("extra_info", {}).items() if isinstance(v, (int, float))})
        entries.append({"name": b.get("fullname") or b["name"], "params": b.get("params"), "status": "ok",
                        "source": "measured", "backend": "pytest-benchmark", "device": None, "stats": stats})
    versions = {"torch": None, "open_clip_torch": None, "timm": None}
    return {"kind": "pytest-benchmark", "versions": versions, "backends": ["pytest-benchmark"],
            "machine_info": data.get("machine_info", {}), "commit_info": data.get("commit_info", {}),
            "benchmarks": entries}


def load_any(path: str) -> dict:
    """A baseline JSON, a pytest-benchmark JSON, or memprof results (results.jsonl or a run directory)."""
    if not os.path.exists(path):
        raise UsageError(f"no baseline or results at {path}: save one with `memprof baseline save RESULTS -o {path}`")
    if os.path.isfile(path) and path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path} is not readable JSON ({exc}): give a baseline saved by memprof") from None
        if data.get("kind") == "memprof-baseline":
            return data
        if "benchmarks" in data and "machine_info" in data:
            return _from_pytest_benchmark(data)
        raise UsageError(f"{path} is neither a memprof baseline nor pytest-benchmark JSON")
    try:
        return make_baseline(load(path))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{path} is not a memprof results file ({exc})") from None


@dataclass(frozen=True)
class Threshold:
    field: str  # the stats key
    name: str  # as given
    value: float
    percent: bool

    def exceeded(self, base: float, current: float) -> bool:
        limit = base * self.value / 100 if self.percent else self.value
        return current - base > limit


_THRESHOLD = re.compile(r"^([A-Za-z_][\w.]*):(\d+(?:\.\d+)?)(%?)$")


def parse_threshold(text: str) -> Threshold:
    """`FIELD:N%` (relative) or `FIELD:N` (absolute, in the field's unit), as pytest-benchmark's
    --benchmark-compare-fail."""
    m = _THRESHOLD.match(text.strip())
    if not m:
        raise UsageError(f"--fail '{text}': use FIELD:N% or FIELD:N, e.g. peak_allocated:1% or step_ms:20%")
    name = m.group(1)
    return Threshold(FIELDS.get(name, name), name, float(m.group(2)), bool(m.group(3)))


@dataclass
class Comparison:
    rows: list  # [name, field, base, current, delta %, verdict]
    regressions: list  # text per regression
    notes: list  # missing configs, version/backend differences


def compare(base: dict, current: dict, thresholds: list[Threshold]) -> Comparison:
    rows, regressions, notes = [], [], []
    for key in ("torch", "open_clip_torch", "timm"):
        b, c = base.get("versions", {}).get(key), current.get("versions", {}).get(key)
        if b != c:
            notes.append(f"warning: {key} differs: baseline {b}, current {c}")
    if base.get("backends") != current.get("backends"):
        notes.append(f"warning: backends differ: baseline {base.get('backends')}, current {current.get('backends')}")
    b_entries = {e["name"]: e for e in base["benchmarks"]}
    c_entries = {e["name"]: e for e in current["benchmarks"]}
    known = {k for e in list(b_entries.values()) + list(c_entries.values()) for k in e["stats"]}
    for t in thresholds:
        if t.field not in known:
            raise UsageError(f"--fail {t.name}: no configuration has that field; use one of "
                             f"{', '.join(FIELDS)} or a stats field such as {', '.join(sorted(known)[:4])}")
    for name in sorted(set(b_entries) - set(c_entries)):
        notes.append(f"missing in current: {name}")
    for name in sorted(set(c_entries) - set(b_entries)):
        notes.append(f"new in current (no baseline): {name}")
    for name in sorted(set(b_entries) & set(c_entries)):
        b, c = b_entries[name], c_entries[name]
        if c["status"] in FAILED and b["status"] not in FAILED:
            regressions.append(f"{name}: newly {c['status']} (baseline {b['status']})")
            rows.append([name, "status", b["status"], c["status"], "", "REGRESSION"])
            continue
        for t in thresholds:
            bv, cv = b["stats"].get(t.field), c["stats"].get(t.field)
            if bv is None:
                continue
            if cv is None:
                regressions.append(f"{name}: {t.name} is missing now (baseline {bv})")
                rows.append([name, t.name, bv, "missing", "", "REGRESSION"])
                continue
            delta = f"{100 * (cv - bv) / bv:+.2f}%" if bv else ""
            bad = t.exceeded(bv, cv)
            if bad:
                regressions.append(f"{name}: {t.name} {bv} -> {cv} ({delta}), over {t.value:g}{'%' if t.percent else ''}")
            rows.append([name, t.name, bv, cv, delta, "REGRESSION" if bad else "ok"])
    return Comparison(rows, regressions, notes)


def diff_text(old: dict, new: dict) -> str:
    """What changed between two baselines, every numeric field (for `baseline save`)."""
    from tabulate import tabulate

    o = {e["name"]: e for e in old["benchmarks"]}
    rows = []
    for e in new["benchmarks"]:
        prev = o.get(e["name"])
        if prev is None:
            rows.append([e["name"], "(new)", "", ""])
            continue
        if prev["status"] != e["status"]:
            rows.append([e["name"], "status", prev["status"], e["status"]])
        for k, v in sorted(e["stats"].items()):
            if k in prev["stats"] and prev["stats"][k] != v and not k.startswith(("step_ms", "host_max_rss")):
                rows.append([e["name"], k, prev["stats"][k], v])
    for name in sorted(set(o) - {e["name"] for e in new["benchmarks"]}):
        rows.append([name, "(removed)", "", ""])
    return tabulate(rows, headers=["config", "field", "old", "new"]) if rows else "no change"
