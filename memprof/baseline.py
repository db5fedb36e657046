"""Baselines and regression checks, with pytest-benchmark's envelope and `--benchmark-compare-fail` rules.

A baseline is JSON: machine_info, commit_info, datetime, version, versions (torch, open_clip, timm),
backends, and one entry per configuration in `benchmarks` (name = the config key, params = the spec,
status, source, device, `stats` = every numeric metric). `compare` checks named fields with thresholds
(`peak_allocated:1%`, `step_ms:20%`, or absolute `peak_reserved:1048576`). A measured figure regresses when
it grows past the threshold (bigger is worse); a predicted one, from a deterministic simulator, when it
moves past it in either direction (a shrinking prediction can be a rule that stopped applying), until the
baseline is updated in the same commit. Every regression is collected and reported once; a configuration
that newly fails (oom, error, crashed, skipped) is a regression, and so is one missing from the current
results unless allowed; nothing in common is a usage error. Versions are read from the records (what ran),
and differences are warned about.
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
from memprof.records import SCHEMA_VERSION
from memprof.results import read_records

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
DEFAULT_FAIL = ("peak_allocated:0%", "peak_reserved:0%", "peak_live:0%")
VERSIONED = ("torch", "open_clip_torch", "timm")
BREAKDOWN = "breakdown_at_peak_bytes"  # an entry's allocated bytes at the peak by category, beside its stats
GIB = 1 << 30


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def record_versions(records: list[dict]) -> dict:
    """torch/open_clip/timm as the records say they ran (several versions joined by ' | ')."""
    out = {}
    for key in VERSIONED:
        seen = sorted({str(r["environment"].get(key)) for r in records})
        out[key] = " | ".join(seen) if seen else None
    return out


def make_baseline(records: list[dict]) -> dict:
    from memprof.results import environment

    env = environment("", "")
    entries = []
    for r in sorted(records, key=lambda r: r["key"]):
        stats = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        entry = {"name": r["key"], "params": r["spec"], "status": r["status"], "source": r["source"],
                 "backend": r["environment"]["backend"], "device": r["environment"].get("device"), "stats": stats}
        breakdown = r["metrics"].get("breakdown_at_peak_bytes")
        if isinstance(breakdown, dict):  # what a regression's growth is made of (explain_growth)
            entry[BREAKDOWN] = {k: v for k, v in breakdown.items() if isinstance(v, int) and not isinstance(v, bool)}
        entries.append(entry)
    return {
        "kind": "memprof-baseline",
        "schema_version": SCHEMA_VERSION,
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": env["memprof"],
        "machine_info": {"node": platform.node(), "machine": platform.machine(), "python_version": env["python"],
                         "platform": env["platform"], "cpu_count": os.cpu_count()},
        "commit_info": {"id": _git("rev-parse", "HEAD"), "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
                        "dirty": bool(_git("status", "--porcelain"))},
        "versions": record_versions(records),
        "backends": sorted({e["backend"] for e in entries}),
        "benchmarks": entries,
    }


def _from_pytest_benchmark(data: dict, path: str) -> dict:
    """pytest-benchmark's JSON as baseline entries: stats (seconds) and numeric extra_info."""
    entries = []
    if not isinstance(data["benchmarks"], list) or not all(
            isinstance(b, dict) and isinstance(b.get("name"), str) for b in data["benchmarks"]):
        raise UsageError(f"{path}: pytest-benchmark JSON whose 'benchmarks' is not a list of named entries")
    for b in data["benchmarks"]:
        stats = {k: v for k, v in (b.get("stats") or {}).items() if isinstance(v, (int, float))}
        stats.update({k: v for k, v in (b.get("extra_info") or {}).items() if isinstance(v, (int, float))})
        entries.append({"name": b.get("fullname") or b["name"], "params": b.get("params"), "status": "ok",
                        "source": "measured", "backend": "pytest-benchmark", "device": None, "stats": stats})
    versions = {"torch": None, "open_clip_torch": None, "timm": None}
    return {"kind": "pytest-benchmark", "versions": versions, "backends": ["pytest-benchmark"],
            "machine_info": data.get("machine_info", {}), "commit_info": data.get("commit_info", {}),
            "benchmarks": entries}


def _check_baseline(data, path: str) -> dict:
    """A baseline's shape, checked: every entry a dict with a name, a status and numeric stats."""
    entries = data.get("benchmarks")
    if not isinstance(entries, list):
        raise UsageError(f"{path}: a baseline without a 'benchmarks' list: save one with `memprof baseline save`")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("stats"), dict):
            raise UsageError(f"{path}: benchmarks[{i}] lacks a name or a 'stats' object: save the baseline again "
                             f"with `memprof baseline save`")
        wrong = next((k for k, v in e["stats"].items()
                      if not (v is None or isinstance(v, (int, float)) and not isinstance(v, bool))), None)
        if wrong is not None:
            shown = json.dumps(e["stats"][wrong])[:60]
            raise UsageError(f"{path}: benchmarks[{i}] ({e['name']}) stats '{wrong}' is {shown}, not a number: "
                             f"restore it, or save the baseline again with `memprof baseline save`")
        e.setdefault("status", "ok")
    return data


def not_a_baseline(path: str) -> str | None:
    """Why the file at `path` is not a memprof baseline (None when it is one): what `baseline save -o` would
    overwrite."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError) as exc:
        return f"unreadable: {getattr(exc, 'strerror', None) or exc}"
    except ValueError:
        return "not a JSON document (a results.jsonl, or another file)"
    if isinstance(data, dict) and data.get("kind") == "memprof-baseline":
        return None
    if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
        return "pytest-benchmark JSON"
    return f"a JSON {type(data).__name__} without kind 'memprof-baseline'"


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
        if not isinstance(data, dict):
            raise UsageError(f"{path}: a JSON {type(data).__name__}, not a baseline: give a baseline saved by "
                             f"`memprof baseline save`, or pytest-benchmark JSON")
        if data.get("kind") == "memprof-baseline":
            return _check_baseline(data, path)
        if "benchmarks" in data and "machine_info" in data:
            return _check_baseline(_from_pytest_benchmark(data, path), path)
        raise UsageError(f"{path} is neither a memprof baseline nor pytest-benchmark JSON: save one with "
                         f"`memprof baseline save`")
    return make_baseline(read_records(path))


@dataclass(frozen=True)
class Threshold:
    field: str  # the stats key
    name: str  # as given
    value: float
    percent: bool

    def exceeded(self, base: float, current: float, both_ways: bool = False) -> bool:
        """Past the threshold: grown by more than it (bigger is worse), or, `both_ways`, moved by more."""
        limit = abs(base) * self.value / 100 if self.percent else self.value
        delta = current - base
        return (abs(delta) if both_ways else delta) > limit


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
    configs: int = 0  # configurations present in both


def _change(nbytes: float, base: float) -> str:
    """A change in bytes, in GiB, and in % of `base`: '+0.50 GiB (+10.0%)'."""
    pct = f" ({100 * nbytes / base:+.1f}%)" if base else " (new)"
    return f"{nbytes / GIB:+.2f} GiB{pct}"


def explain_growth(b: dict, c: dict) -> str:
    """Which categories of the breakdown at the peak (activations, optimizer state, ...) moved between two
    entries, largest change first, each in GiB and % of its baseline figure; or why that cannot be said."""
    old, new = b.get(BREAKDOWN), c.get(BREAKDOWN)
    if not old or not new:
        missing = " and ".join(w for w, x in (("the baseline", old), ("the current results", new)) if not x)
        return (f"by category: unknown, no breakdown at the peak in {missing} (a measured run has none; a baseline "
                f"saved before memprof kept one has none: save it again)")
    moved = sorted(((cat, new.get(cat, 0) - old.get(cat, 0), old.get(cat, 0)) for cat in dict.fromkeys([*old, *new])),
                   key=lambda t: -abs(t[1]))
    moved = [m for m in moved if m[1]]
    if not moved:
        return "by category: no category moved at the peak (the allocator's rounding or cache did)"
    grew = [m for m in moved if m[1] > 0]
    head = (f"{grew[0][0].replace('_', ' ')} grew most, {_change(grew[0][1], grew[0][2])}" if grew
            else f"{moved[0][0].replace('_', ' ')} shrank most, {_change(moved[0][1], moved[0][2])}")
    rest = [f"{cat.replace('_', ' ')} {_change(d, base)}" for cat, d, base in moved if (cat, d, base) != (grew or moved)[0]]
    return f"at the allocated peak, by category: {head}" + (f"; {', '.join(rest[:3])}" if rest else "")


def _deterministic(b: dict, c: dict) -> bool:
    """Both figures predicted (the simulation gives the same figure every run): a change either way counts."""
    return b.get("source") == "predicted" and c.get("source") == "predicted"


def compare(base: dict, current: dict, thresholds: list[Threshold], allow_missing: bool = False) -> Comparison:
    rows, regressions, notes = [], [], []
    for key in VERSIONED:
        b, c = base.get("versions", {}).get(key), current.get("versions", {}).get(key)
        if b != c:
            notes.append(f"warning: {key} differs: baseline {b}, current {c}")
    if base.get("backends") != current.get("backends"):
        notes.append(f"warning: backends differ: baseline {base.get('backends')}, current {current.get('backends')}")
    b_entries = {e["name"]: e for e in base["benchmarks"]}
    c_entries = {e["name"]: e for e in current["benchmarks"]}
    common = sorted(set(b_entries) & set(c_entries))
    if not common:
        raise UsageError("baseline and current have no configuration in common: compare results of the same grid "
                         "(the names are the record keys, e.g. vit-b-16/adamw/.../titan-x@simulate)")
    known = {k for e in list(b_entries.values()) + list(c_entries.values()) for k in e["stats"]}
    for t in thresholds:
        if t.field not in known:
            raise UsageError(f"--fail {t.name}: no configuration has that field; use one of "
                             f"{', '.join(FIELDS)} or a stats field such as {', '.join(sorted(known)[:4])}")
    for name in sorted(set(b_entries) - set(c_entries)):
        if allow_missing:
            notes.append(f"missing in current (allowed): {name}")
        else:
            regressions.append(f"{name}: missing in current (a dropped configuration; --allow-missing accepts it)")
            rows.append([name, "present", "yes", "missing", "", "REGRESSION"])
    for name in sorted(set(c_entries) - set(b_entries)):
        notes.append(f"new in current (no baseline): {name}")
    for name in common:
        b, c = b_entries[name], c_entries[name]
        if c["status"] in FAILED and b["status"] not in FAILED:
            regressions.append(f"{name}: newly {c['status']} (baseline {b['status']})")
            rows.append([name, "status", b["status"], c["status"], "", "REGRESSION"])
            continue
        both_ways = _deterministic(b, c)
        for t in thresholds:
            bv, cv = b["stats"].get(t.field), c["stats"].get(t.field)
            if bv is None:
                continue
            if cv is None:
                regressions.append(f"{name}: {t.name} is missing now (baseline {bv})")
                rows.append([name, t.name, bv, "missing", "", "REGRESSION"])
                continue
            delta = f"{100 * (cv - bv) / bv:+.2f}%" if bv else ""
            bad = t.exceeded(bv, cv, both_ways)
            if bad:
                how = "grew" if cv > bv else "shrank (a deterministic prediction moved: if intended, update the baseline)"
                limit = f"past {t.value:g}{'%' if t.percent else ''}"
                if t.field.endswith("_bytes"):  # in GiB and %, and what it is made of (a line of its own)
                    from memprof.budget import format_size

                    regressions.append(f"{name}: {t.name} {how} by {_change(cv - bv, bv).lstrip('+-')}: "
                                       f"{format_size(bv)} -> "
                                       f"{format_size(cv)} ({bv} -> {cv} B), {limit}\n    {explain_growth(b, c)}")
                else:
                    regressions.append(f"{name}: {t.name} {how}: {bv} -> {cv} ({delta}), {limit}")
            if t.field.endswith("_bytes"):  # sizes as a person reads them (the regression line gives bytes too)
                from memprof.budget import format_size

                rows.append([name, t.name, format_size(bv), format_size(cv), delta, "REGRESSION" if bad else "ok"])
            else:
                rows.append([name, t.name, bv, cv, delta, "REGRESSION" if bad else "ok"])
    return Comparison(rows, regressions, notes, len(common))


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
